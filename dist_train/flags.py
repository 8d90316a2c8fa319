"""Every command-line flag, defined in one place, and their conversion to a Config.

Only `main` (and launch entry points) import this module; the library takes a
`Config`.
"""

import dataclasses

from absl import flags

from dist_train import config as config_lib

flags.DEFINE_string(
    "model_dir", None,
    "Directory for checkpoints and TensorBoard events; rerunning with the same "
    "directory resumes from its latest checkpoint.")
flags.DEFINE_enum(
    "mode", "train_and_evaluate", config_lib.MODES,
    "train: train only. evaluate: restore the latest checkpoint, evaluate the "
    "validation split, write <model_dir>/eval_results.json. "
    "train_and_evaluate: train with a validation pass every epoch.")
flags.DEFINE_string(
    "dataset", "mnist_sample",
    "mnist: the full data set (mnist.npz or the IDX files in --data_dir, else "
    "the Keras cache, else a download). mnist_sample: 5,000 real digits "
    "shipped with the package. synthetic: deterministic random data of the "
    "same shapes. package.module:function: a user dataset_fn (see README).")
flags.DEFINE_string(
    "model", "mlp",
    "mlp: the reference MLP. cnn: a small convolutional net on 28x28x1. "
    "package.module:function: a user model_fn(config) -> keras.Model.")
flags.DEFINE_string(
    "data_dir", None, "Directory holding mnist.npz for --dataset=mnist.")
flags.DEFINE_integer(
    "num_validation_examples", 10000,
    "How many examples at the end of the training split are held out for "
    "validation.")
flags.DEFINE_integer(
    "num_train_examples", None,
    "Use only the first N training examples (after the validation hold-out); "
    "for synthetic data, how many to generate. Default: all.")
flags.DEFINE_integer(
    "global_batch_size", 64,
    "Examples per optimizer step, summed over all replicas.")
flags.DEFINE_integer("epochs", 3, "Passes over the training data.")
flags.DEFINE_float("learning_rate", 1e-3, "Learning rate.")
flags.DEFINE_enum(
    "optimizer", "sgd", config_lib.OPTIMIZERS,
    "sgd, momentum (SGD with --momentum), adam, adamw (Adam with decoupled "
    "--weight_decay).")
flags.DEFINE_float("momentum", 0.9, "Momentum of --optimizer=momentum.")
flags.DEFINE_float("weight_decay", 0.004,
                   "Decoupled weight decay of --optimizer=adamw.")
flags.DEFINE_enum(
    "lr_schedule", "constant", config_lib.LR_SCHEDULES,
    "constant; cosine (to 0 at the last step); step (times "
    "--lr_decay_factor at each of --lr_boundaries).")
flags.DEFINE_integer(
    "warmup_steps", 0,
    "Linear warmup: the rate of step s < N is learning_rate * (s + 1) / N.")
flags.DEFINE_list(
    "lr_boundaries", [],
    "Global steps where --lr_schedule=step decays the rate. Default: at 50% "
    "and 75% of the run.")
flags.DEFINE_float("lr_decay_factor", 0.1,
                   "Factor of --lr_schedule=step at each boundary.")
flags.DEFINE_float(
    "clip_norm", None,
    "Clip the global norm of the gradient summed over all replicas to this.")
flags.DEFINE_integer(
    "shuffle_buffer", 1024, "Size of the training shuffle buffer.")
flags.DEFINE_integer(
    "seed", 0, "Seed for weight initialisation, shuffling and synthetic data.")
flags.DEFINE_integer(
    "log_every_steps", 200,
    "Log the loss, examples seen and throughput every N optimizer steps.")
flags.DEFINE_integer(
    "steps_per_loop", 100,
    "Optimizer steps run inside one compiled call; loops also end at log "
    "intervals and epoch ends.")
flags.DEFINE_integer(
    "keep_checkpoints", 5, "How many recent checkpoints to keep.")
flags.DEFINE_integer(
    "checkpoint_every_steps", None,
    "Also checkpoint every N global steps (always at epoch ends).")
flags.DEFINE_enum(
    "on_corrupt_checkpoint", "fail", config_lib.ON_CORRUPT_CHECKPOINT,
    "When the latest checkpoint cannot be read: fail (naming the file), or "
    "fall back to the newest intact one (previous) with a warning.")
flags.DEFINE_bool(
    "export_saved_model", False,
    "Besides <model_dir>/export/model.keras, write a TensorFlow SavedModel to "
    "<model_dir>/export/saved_model.")
flags.DEFINE_enum(
    "mixed_precision", "float32", config_lib.MIXED_PRECISION_POLICIES,
    "Keras dtype policy of the model. mixed_float16 and mixed_bfloat16 "
    "compute in 16 bits with float32 variables; the output layer and the loss "
    "stay float32; mixed_float16 scales the loss (LossScaleOptimizer).")
flags.DEFINE_bool(
    "jit_compile", False,
    "Compile each replica's forward and backward pass with XLA.")
flags.DEFINE_integer(
    "hidden_units", 64, "Width of the two hidden Dense layers.")
flags.DEFINE_float(
    "activity_regularization", 0.0,
    "C > 0 inserts, after dense_1, a layer that calls "
    "add_loss(C * sum(inputs)). 0 leaves it out.")
flags.DEFINE_enum(
    "add_loss_reduction", "mean", config_lib.ADD_LOSS_REDUCTIONS,
    "How add_loss terms computed from a replica's inputs are combined: mean "
    "(each term is a mean over the replica's examples, like Keras activity "
    "regularizers) or sum (each term is a sum over the replica's examples).")
_KERNEL_L2 = flags.DEFINE_float(
    "kernel_l2", 0.0, "L2 kernel regularization factor on every Dense layer.")
flags.DEFINE_enum(
    "strategy", "auto", config_lib.STRATEGIES,
    "auto: multi_worker when the cluster (see --cluster) has several tasks, "
    "else mirrored over all local devices. mirrored: MirroredStrategy. "
    "one_device: a single device (first GPU, else CPU). multi_worker: "
    "MultiWorkerMirroredStrategy over every worker of the cluster.")
flags.DEFINE_integer(
    "num_gpus", None, "Use at most this many local GPUs. Default: all.")
flags.DEFINE_integer(
    "cpu_replicas", None,
    "Hide GPUs and split the CPU into N logical devices, one replica each: "
    "the distributed code paths on any machine.")
flags.DEFINE_enum(
    "cluster", "auto", config_lib.CLUSTERS,
    "Where multi_worker finds its cluster. tf_config: the TF_CONFIG "
    "environment variable. slurm: the srun job step (SlurmClusterResolver). "
    "auto: TF_CONFIG when it is set, else a SLURM step of several tasks.")
flags.DEFINE_enum(
    "collective", "auto", config_lib.COLLECTIVES,
    "Cross-worker all-reduce of multi_worker: auto, ring (gRPC) or nccl "
    "(GPUs).")
flags.DEFINE_float(
    "collective_timeout_s", 300.0,
    "A multi_worker collective that waits longer than this for a peer fails "
    "the run instead of hanging. Must exceed the longest time one worker "
    "spends outside collectives while the others wait.")
flags.DEFINE_integer(
    "slurm_port_base", 8888,
    "With --cluster=slurm, the tasks on a node listen on this port and the "
    "next ones.")

flags.mark_flag_as_required("model_dir")


def config_from_flags() -> config_lib.Config:
  """Returns the typed Config for the parsed flags; raises ConfigError.

  Every Config field has a flag of the same name, so the mapping is by name.
  """
  values = {field.name: flags.FLAGS[field.name].value
            for field in dataclasses.fields(config_lib.Config)}
  return config_lib.Config(**values)
