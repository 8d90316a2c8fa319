"""The run configuration: one frozen, typed object built from flags in `main`.

Each option is defined once, as a field of `Config` with its default, help,
choices and check; the absl flags and the flag table of docs/flags.md are
derived from it. This module imports no TensorFlow, so a bad configuration is
reported in well under a second, before TensorFlow starts.
"""

import dataclasses
import math
import os
from typing import Optional

from dist_train import errors

DATASETS = ("mnist", "mnist_sample", "synthetic")
MODELS = ("mlp", "cnn")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "step", "plateau")
MODES = ("train", "evaluate", "train_and_evaluate", "continuous_eval")
BEST_MODES = ("auto", "max", "min")
STRATEGIES = ("auto", "mirrored", "one_device", "multi_worker")
CLUSTERS = ("auto", "tf_config", "slurm")
COLLECTIVES = ("auto", "ring", "nccl")
ADD_LOSS_REDUCTIONS = ("mean", "sum")
ON_CORRUPT_CHECKPOINT = ("fail", "previous")
MIXED_PRECISION_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
INPUT_PLACEMENTS = ("auto", "device", "prefetch", "host")


# The options whose change on resume changes the mathematics of the run
# (which examples, in which order, through which model, loss and update):
# resuming with another value is refused unless --allow_config_change
# (outputs/run_record.py). Any other option (cadences, placement, replicas
# and workers, where the data lives, --epochs to extend a run, the
# loss-spike recovery, which changes nothing until a spike) may change.
RUN_DEFINING_OPTIONS = (
    "task", "dataset", "num_validation_examples", "num_train_examples",
    "shuffle_buffer", "seed", "global_batch_size", "learning_rate",
    "optimizer", "momentum", "weight_decay", "lr_schedule", "warmup_steps",
    "lr_boundaries", "lr_decay_factor", "grad_accum_steps", "clip_norm",
    "model", "hidden_units", "activity_regularization", "add_loss_reduction",
    "kernel_l2", "mixed_precision", "ema_decay", "ema_warmup_steps",
    "lr_plateau_metric", "lr_plateau_patience", "lr_plateau_factor", "lr_min",
    "train_steps", "batch_norm", "sync_batchnorm")


class ConfigError(errors.DistTrainError, ValueError):
  """A configuration value is impossible; the message names the flag and the value."""


def option(default, help_text: str, *, choices: tuple = (),
           check: Optional[str] = None, shown: Optional[str] = None,
           import_path: bool = False):
  """A Config field that is also a command-line flag of the same name.

  This is the one place an option is defined: `flags.py` derives the absl
  flag from it and `flags.flag_table()` the table of docs/flags.md.

  Args:
    default: the default value.
    help_text: what the option does, for --help and docs/flags.md.
    choices: the allowed values (an enum flag).
    check: "positive" or "non_negative", checked by `validate`.
    shown: how docs/flags.md shows a default of None ("all", "off", ...).
    import_path: besides `choices`, a `package.module:function` is allowed.
  """
  return dataclasses.field(default=default, metadata=dict(
      help=help_text, choices=tuple(choices), check=check, shown=shown,
      import_path=import_path))


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run needs; each field is the flag of the same name.

  Library code below the API takes the values it uses, never absl FLAGS.
  """

  model_dir: Optional[str] = option(
      None, "Checkpoints and TensorBoard events; rerunning with the same "
      "directory resumes from its latest checkpoint.", shown="(required)")
  mode: str = option(
      "train_and_evaluate", "train (no validation pass), evaluate (latest "
      "checkpoint -> <model_dir>/eval_results.json), train_and_evaluate, or "
      "continuous_eval (evaluate each new checkpoint of a training run "
      "beside it).", choices=MODES)
  task: Optional[str] = option(
      None, "A user task_fn(config) -> task as package.module:function (see "
      "docs/tasks.md); default: the built-in classification of "
      "--model on --dataset.", shown="built-in")
  # Data.
  dataset: str = option(
      "mnist_sample", "mnist (mnist.npz or the IDX files in --data_dir, else "
      "the Keras cache), mnist_sample (5,000 real digits shipped with the "
      "package), synthetic, or a user dataset_fn as package.module:function.",
      choices=DATASETS, import_path=True)
  data_dir: Optional[str] = option(
      None, "Folder holding mnist.npz or the MNIST IDX files for "
      "--dataset=mnist.")
  num_validation_examples: int = option(
      10000, "Tail of the built-in training split held out for validation.",
      check="non_negative")
  num_train_examples: Optional[int] = option(
      None, "Use only the first N training examples (synthetic: how many).",
      check="positive", shown="all")
  shuffle_buffer: int = option(1024, "Size of the training shuffle buffer.",
                               check="positive")
  seed: int = option(
      0, "Seed of the weights, the shuffling (per epoch) and synthetic data.")
  input_placement: str = option(
      "auto", "Where each replica's examples come from: device (in-memory "
      "data copied once to every replica's device, each step gathered "
      "there), prefetch (gathered or read on the host, copied to the devices "
      "ahead of the step), host (copied in the step), or auto (host on CPU "
      "replicas; on GPUs device when the in-memory splits fit in "
      "--device_data_max_mb, else prefetch).", choices=INPUT_PLACEMENTS)
  device_data_max_mb: int = option(
      2048, "With --input_placement=auto on GPUs, the largest in-memory data "
      "set (training and validation splits, in MB) copied to every "
      "replica's device.", check="non_negative")
  # Optimisation.
  global_batch_size: int = option(
      64, "Examples per optimizer step, summed over all replicas.",
      check="positive")
  epochs: int = option(
      3, "Passes over the training data; with --train_steps, the run's "
      "length is that instead, and a training set of known size is "
      "reshuffled at each pass.", check="positive")
  train_steps: Optional[int] = option(
      None, "End the run at this global step (optimizer steps), whatever "
      "--epochs says; the training set may then be endless (repeat(), a "
      "generator, files of unknown length), read as one stream. Schedules "
      "count to it.", check="positive", shown="off (--epochs)")
  validation_steps: Optional[int] = option(
      None, "Cap each validation pass at this many global batches (from the "
      "start of the validation set); the validation set may then be "
      "endless.", check="positive", shown="one full pass")
  learning_rate: float = option(1e-3, "Base learning rate.", check="positive")
  optimizer: str = option(
      "sgd", "sgd, momentum (SGD with --momentum), adam, or adamw (Adam with "
      "decoupled --weight_decay).", choices=OPTIMIZERS)
  momentum: float = option(0.9, "Momentum of --optimizer=momentum.",
                           check="non_negative")
  weight_decay: float = option(
      0.004, "Decoupled weight decay of --optimizer=adamw.",
      check="non_negative")
  lr_schedule: str = option(
      "constant", "constant, cosine (to 0 at the last step) or step (times "
      "--lr_decay_factor at each of --lr_boundaries).", choices=LR_SCHEDULES)
  warmup_steps: int = option(
      0, "Linear warmup: the rate of step s < N is learning_rate * (s + 1) / "
      "N.", check="non_negative")
  lr_boundaries: tuple = option(
      (), "Global steps where --lr_schedule=step decays the rate.",
      shown="50%, 75% of the run")
  lr_decay_factor: float = option(
      0.1, "Factor of --lr_schedule=step at each boundary.",
      check="non_negative")
  ema_decay: Optional[float] = option(
      None, "Keep an exponential moving average of the trainable weights "
      "with this decay d in (0, 1), updated after each optimizer step "
      "(loop/ema.py); saved in the checkpoints.", shown="off")
  ema_warmup_steps: int = option(
      0, "With --ema_decay: the decay after n averaging steps is d * min(1, "
      "n / N) (0: d from the first step).", check="non_negative")
  eval_with_ema: bool = option(
      True, "With --ema_decay: validation, best/, the export and "
      "--mode=evaluate use the averaged weights (training always continues "
      "on the model's own).")
  lr_plateau_metric: Optional[str] = option(
      None, "The validation metric --lr_schedule=plateau watches.",
      shown="--best_metric, else loss")
  lr_plateau_patience: int = option(
      2, "--lr_schedule=plateau cuts the rate after this many evaluations "
      "in a row without an improvement.", check="positive")
  lr_plateau_factor: float = option(
      0.5, "--lr_schedule=plateau multiplies the rate by this, in (0, 1), "
      "at each cut.", check="positive")
  lr_min: float = option(
      0.0, "--lr_schedule=plateau never cuts the rate below this.",
      check="non_negative")
  grad_accum_steps: int = option(
      1, "Split each replica's share of the global batch into K "
      "micro-batches, accumulate their gradients and apply them once: the "
      "same update with less activation memory.", check="positive")
  clip_norm: Optional[float] = option(
      None, "Clip the global norm of the gradient summed over all replicas "
      "to this.", check="positive", shown="off")
  sync_batchnorm: Optional[bool] = option(
      None, "Every BatchNormalization layer normalises with the mean and "
      "variance of the whole global batch (all replicas and workers, "
      "combined by example count) and updates its moving statistics once "
      "per step with them: the update one device makes. false keeps each "
      "replica's own statistics. With --grad_accum_steps > 1 the "
      "statistics are each micro-batch's (over all replicas).",
      shown="on with BatchNormalization and several replicas")
  # Model and extra losses.
  model: str = option(
      "mlp", "mlp (the reference model), cnn, or a user model_fn(config) -> "
      "keras.Model as package.module:function.", choices=MODELS,
      import_path=True)
  batch_norm: bool = option(
      False, "--model=cnn: BatchNormalization after each convolution.")
  hidden_units: int = option(64, "Width of the hidden Dense layers.",
                             check="positive")
  activity_regularization: float = option(
      0.0, "C > 0 inserts, after dense_1, the reference layer that calls "
      "add_loss(C * sum(inputs)).", check="non_negative")
  add_loss_reduction: str = option(
      "mean", "How add_loss terms computed from a replica's inputs combine: "
      "mean (each term is a mean over the replica's examples, like Keras "
      "activity regularizers) or sum (a sum over them).",
      choices=ADD_LOSS_REDUCTIONS)
  kernel_l2: float = option(
      0.0, "L2 kernel regularization factor on every Dense layer.",
      check="non_negative")
  # Loop and logging.
  log_every_steps: int = option(
      200, "Console line and TensorBoard scalars every N optimizer steps.",
      check="positive")
  health_scalars: bool = option(
      True, "Training-health scalars at each log step (docs/monitoring.md): "
      "gradient_norm of the summed gradient, weight_norm, clipped_fraction, "
      "loss_scale and skipped_steps, memory, and every worker's time per "
      "step with a warning naming a straggler.")
  histogram_every_steps: Optional[int] = option(
      None, "With --health_scalars, histograms of the weights and of the "
      "summed gradient every N steps (a multiple of --log_every_steps).",
      check="positive", shown="off")
  straggler_warn_ratio: float = option(
      1.5, "Warn when the slowest worker's own time per step (its input and "
      "its forward and backward pass) exceeds this times the median "
      "worker's.", check="positive")
  metrics_file: Optional[str] = option(
      None, "Where the chief appends a JSON line of scalars per log interval "
      "and evaluation; none: no file.", shown="<model_dir>/metrics.jsonl")
  steps_per_loop: int = option(
      100, "Optimizer steps per compiled call; loops also end at log steps, "
      "checkpoint steps and epoch ends.", check="positive")
  keep_checkpoints: int = option(5, "How many recent checkpoints to keep.",
                                 check="positive")
  checkpoint_every_steps: Optional[int] = option(
      None, "Also checkpoint every N global steps (always at epoch ends).",
      check="positive", shown="epoch ends only")
  checkpoint_every_secs: Optional[float] = option(
      None, "Also checkpoint at the first loop boundary after every T "
      "seconds, at one step on every worker (the chief's clock decides).",
      check="positive", shown="off")
  max_runtime_s: Optional[float] = option(
      None, "Stop, saved, at the last loop boundary before T seconds from "
      "the start of this process (less the longest loop and checkpoint "
      "save seen so far), agreed by every worker; exits 75 like SIGTERM, "
      "and the same command resumes.", check="positive", shown="off")
  loss_upper_bound: Optional[float] = option(
      None, "A training loss above this (as a NaN or Inf loss) is a loss "
      "spike: the run exits 3, or recovers with --recovery_max_trials.",
      shown="off")
  recovery_max_trials: int = option(
      0, "On a loss spike, roll back to the latest checkpoint, skip the "
      "global batches from it to the spike and go on, at most N times; 0: "
      "a spike exits 3.", check="non_negative")
  allow_config_change: bool = option(
      False, "Resume even when an option that changes the mathematics of "
      "the run (config.RUN_DEFINING_OPTIONS) differs from "
      "<model_dir>/run.cfg.")
  on_corrupt_checkpoint: str = option(
      "fail", "When the latest checkpoint cannot be read: fail (naming the "
      "file), or fall back to the newest intact one (previous).",
      choices=ON_CORRUPT_CHECKPOINT)
  # Evaluation and model selection (see outputs/best.py).
  eval_every_steps: Optional[int] = option(
      None, "A validation pass every N global steps and at the end.",
      check="positive", shown="every epoch")
  best_metric: Optional[str] = option(
      None, "Keep the model with the best value of this validation metric "
      "(loss, or any metric of the task) in <model_dir>/best/.", shown="off")
  best_mode: str = option(
      "auto", "max or min: which values of --best_metric are better; auto is "
      "min for names ending in loss, error, perplexity, mae or mse, else "
      "max.", choices=BEST_MODES)
  early_stopping_patience: Optional[int] = option(
      None, "Stop after this many evaluations without an improvement of "
      "--best_metric by more than --early_stopping_min_delta.",
      check="positive", shown="off")
  early_stopping_min_delta: float = option(
      0.0, "The least change of --best_metric that counts as an "
      "improvement for early stopping.", check="non_negative")
  init_checkpoint: Optional[str] = option(
      None, "Initialise the model (not the optimizer or step) from a "
      "dist_train model_dir, a checkpoint prefix or a .keras file when "
      "--model_dir has no checkpoint yet.", shown="off")
  init_skip_mismatch: bool = option(
      False, "With --init_checkpoint from a .keras file (or a model_dir "
      "holding one), skip the layers whose weights differ in shape (such as "
      "a new head) and list them, instead of failing.")
  eval_timeout_s: float = option(
      600.0, "--mode=continuous_eval stops after waiting this long for a new "
      "checkpoint.", check="positive")
  profile_steps: tuple = option(
      (), "START,END: capture a TensorFlow profiler trace of global steps "
      "START to END into <model_dir>/train/plugins/profile (TensorBoard's "
      "Profile tab); on the chief only, unless --profile_all_workers.",
      shown="off")
  profile_all_workers: bool = option(
      False, "With --profile_steps, every worker captures its trace (worker "
      "i > 0 into <model_dir>/train/worker_<i>/plugins/profile).")
  export_saved_model: bool = option(
      False, "Besides <model_dir>/export/model.keras, write a TensorFlow "
      "SavedModel to <model_dir>/export/saved_model.")
  # Speed (see loop/precision.py and loop/steps.py).
  mixed_precision: str = option(
      "float32", "Keras dtype policy: mixed_float16 and mixed_bfloat16 "
      "compute in 16 bits with float32 variables (the output layer and the "
      "loss stay float32; mixed_float16 scales the loss).",
      choices=MIXED_PRECISION_POLICIES)
  jit_compile: bool = option(
      False, "Compile each replica's forward and backward pass with XLA.")
  # Distribution.
  strategy: str = option(
      "auto", "auto (multi_worker on a cluster of several tasks, else "
      "mirrored), mirrored, one_device or multi_worker.", choices=STRATEGIES)
  num_gpus: Optional[int] = option(
      None, "Use at most this many local GPUs.", check="non_negative",
      shown="all")
  cpu_replicas: Optional[int] = option(
      None, "Hide GPUs and split the CPU into N logical devices, one replica "
      "each (not with multi_worker).", check="positive")
  # Multi-worker (see distribute/cluster.py).
  cluster: str = option(
      "auto", "Where multi_worker finds its cluster: tf_config, slurm, or "
      "auto (TF_CONFIG if set, else a SLURM step of several tasks).",
      choices=CLUSTERS)
  collective: str = option(
      "auto", "Cross-worker all-reduce of multi_worker: auto, ring (gRPC) or "
      "nccl (GPUs).", choices=COLLECTIVES)
  collective_timeout_s: float = option(
      300.0, "A multi_worker call that waits on peer workers (a compiled "
      "loop after the first, a validation pass, the agreement at a loop "
      "boundary) and lasts longer than this fails the run instead of "
      "hanging.", check="positive")
  slurm_port_base: int = option(
      8888, "With --cluster=slurm, the port of the first task on each node "
      "(the next tasks count up).", check="positive")

  def __post_init__(self):
    # Flags give lists of strings; keep an immutable tuple of ints.
    object.__setattr__(self, "lr_boundaries", _int_tuple(
        "lr_boundaries", self.lr_boundaries))
    object.__setattr__(self, "profile_steps", _int_tuple(
        "profile_steps", self.profile_steps))
    validate(self)

  def replace(self, **changes) -> "Config":
    return dataclasses.replace(self, **changes)


def _int_tuple(name, values):
  try:
    return tuple(int(v) for v in (values or ()))
  except (TypeError, ValueError):
    raise ConfigError(
        f"--{name} must be a comma-separated list of integers, got {values!r}"
    ) from None


def is_import_path(value: str) -> bool:
  """True for a user plug-in given as `package.module:function`."""
  module, _, attribute = value.partition(":")
  return bool(module) and bool(attribute)


def _check_choice_or_import_path(name, value, choices):
  if value in choices or is_import_path(value):
    return
  raise ConfigError(
      f"--{name} must be one of {'|'.join(choices)} or package.module:function, "
      f"got {value!r}")


def _check_choice(name, value, choices):
  if value not in choices:
    raise ConfigError(
        f"--{name} must be one of {'|'.join(choices)}, got {value!r}")


def _check_field(config: Config, field: dataclasses.Field) -> None:
  """The checks an option declares: its choices and its sign."""
  value = getattr(config, field.name)
  meta = field.metadata
  if meta.get("choices"):
    if meta["import_path"]:
      _check_choice_or_import_path(field.name, value, meta["choices"])
    else:
      _check_choice(field.name, value, meta["choices"])
  if meta.get("check") and value is not None:
    if meta["check"] == "positive" and not value > 0:
      raise ConfigError(f"--{field.name} must be positive, got {value}")
    if meta["check"] == "non_negative" and not value >= 0:
      raise ConfigError(f"--{field.name} must be non-negative, got {value}")


def validate(config: Config) -> None:
  """Raises ConfigError naming the first impossible flag value in `config`."""
  if not config.model_dir:
    raise ConfigError("--model_dir is required")
  if os.path.exists(config.model_dir) and not os.path.isdir(config.model_dir):
    raise ConfigError(
        f"--model_dir must be a directory, got the file {config.model_dir}")
  for field in dataclasses.fields(config):
    _check_field(config, field)
  if config.early_stopping_patience is not None and not config.best_metric:
    raise ConfigError(
        "--early_stopping_patience needs --best_metric, the validation metric "
        f"it watches (got --early_stopping_patience="
        f"{config.early_stopping_patience})")
  if config.task is not None and not is_import_path(config.task):
    raise ConfigError(
        f"--task must be package.module:function, got {config.task!r}")
  if any(b <= 0 for b in config.lr_boundaries) or list(
      config.lr_boundaries) != sorted(set(config.lr_boundaries)):
    raise ConfigError("--lr_boundaries must be increasing positive steps, got "
                      f"{','.join(map(str, config.lr_boundaries))}")
  if config.ema_decay is not None and not 0.0 < config.ema_decay < 1.0:
    raise ConfigError(
        f"--ema_decay must be in (0, 1), got {config.ema_decay}")
  if not config.lr_plateau_factor < 1.0:
    raise ConfigError("--lr_plateau_factor must be in (0, 1), got "
                      f"{config.lr_plateau_factor}")
  if config.lr_schedule == "plateau" and config.mode == "train":
    raise ConfigError(
        "--lr_schedule=plateau cuts the rate after validation passes, but "
        "--mode=train runs none: use --mode=train_and_evaluate")
  if config.histogram_every_steps is not None and (
      not config.health_scalars or
      config.histogram_every_steps % config.log_every_steps):
    raise ConfigError(
        "--histogram_every_steps needs --health_scalars and must be a "
        f"multiple of --log_every_steps={config.log_every_steps}, got "
        f"{config.histogram_every_steps}")
  steps = config.profile_steps
  if steps and (len(steps) != 2 or not 0 < steps[0] <= steps[1]):
    raise ConfigError("--profile_steps must be START,END with 0 < START <= "
                      f"END, got {','.join(map(str, steps))}")
  if config.batch_norm and config.model != "cnn":
    raise ConfigError("--batch_norm adds BatchNormalization to --model=cnn, "
                      f"got --model={config.model}")
  if config.cpu_replicas is not None:
    if config.strategy == "one_device":
      raise ConfigError(
          "--cpu_replicas splits the CPU into replicas for a mirrored strategy "
          f"and cannot be combined with --strategy=one_device "
          f"(got --cpu_replicas={config.cpu_replicas})")
    if config.num_gpus:
      raise ConfigError(
          "--cpu_replicas hides all GPUs and cannot be combined with "
          f"--num_gpus={config.num_gpus}")
  if config.loss_upper_bound is not None and not (
      math.isfinite(config.loss_upper_bound) and config.loss_upper_bound > 0):
    raise ConfigError("--loss_upper_bound must be a finite number above 0, "
                      f"got {config.loss_upper_bound}")
  _validate_multi_worker(config)


def _validate_multi_worker(config: Config) -> None:
  """The multi-worker flags; the environment is checked by `cluster`."""
  if not 0 < config.slurm_port_base < 65536:
    raise ConfigError("--slurm_port_base must be a port number, got "
                      f"{config.slurm_port_base}")
  if config.strategy == "multi_worker" and config.cpu_replicas is not None:
    # On CPU, MultiWorkerMirroredStrategy places one replica on each worker
    # and ignores logical CPU devices.
    raise ConfigError(
        "--cpu_replicas cannot be combined with --strategy=multi_worker: on "
        "CPU each worker is one replica, so start more workers instead "
        f"(got --cpu_replicas={config.cpu_replicas})")
  if config.collective != "auto" and config.strategy in ("mirrored",
                                                          "one_device"):
    raise ConfigError(
        f"--collective={config.collective} applies to --strategy=multi_worker "
        f"(or auto on a cluster), not --strategy={config.strategy}")
