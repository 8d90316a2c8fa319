"""Trains configurations with N logical CPU replicas and saves what each did.

Run as its own process (one process can form only one device layout); the
cases of one process run one after another on one strategy:

    python tests/helpers/parity_run.py --cases=reference_sum,keras_mean \\
        --cpu_replicas=3 --output_dir=DIR

For each case, DIR/<case>_<replicas>.npz holds the initial and the final value
of every model variable (`initial_<i>`, `weight_<i>`, in model order), the
global step, the last epoch's train and validation metrics, and what the run
says it ran: `num_replicas`, `num_workers` and `loop_calls` from its
RunResult, and `xla_modules`, the XLA modules the run compiled (this
process has XLA dump its modules, so the count comes from the compiler
itself, not from dist_train's names). The case trains
in the model_dir DIR/<case>_<replicas>/.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The activity regularizer of `keras_activity_model`: L2 of the hidden layer's
# outputs, which Keras divides by the batch size (a mean over the batch).
KERAS_ACTIVITY_L2 = 1e-3


def keras_activity_model(config):
  """An MLP whose hidden layer has a Keras activity_regularizer (a mean)."""
  import keras  # pylint: disable=import-outside-toplevel
  l2 = keras.regularizers.L2(config.kernel_l2)
  inputs = keras.Input(shape=(784,))
  x = keras.layers.Dense(
      32, activation="relu", kernel_regularizer=l2,
      activity_regularizer=keras.regularizers.L2(KERAS_ACTIVITY_L2),
      name="dense_1")(inputs)
  outputs = keras.layers.Dense(10, kernel_regularizer=l2,
                               name="predictions")(x)
  return keras.Model(inputs, outputs)


# Each case: Config overrides and the model function. 652 training examples
# in global batches of 65 give 11 steps an epoch: 10 of 65 examples, split
# 32/33 over 2 replicas and 21/22/22 over 3, then 2 examples, split 1/1 and
# 0/1/1, so a replica gets none. 2 epochs give 22 steps.
CASES = {
    # The reference model with the reference add_loss layer (a sum).
    # With the health report on every replica count: the multi-worker runs
    # compare their gradient and weight norms with its one-device run's.
    "reference_sum": dict(activity_regularization=1e-4,
                          add_loss_reduction="sum", health_scalars=True,
                          model="reference"),
    # A Keras activity_regularizer (a mean over the batch).
    "keras_mean": dict(add_loss_reduction="mean", model="keras_activity"),
    # Weight regularization alone, strong enough to dominate the update.
    "reference_l2": dict(kernel_l2=0.05, model="reference"),
    # Global-norm clipping of the cross-replica gradient sum: the global
    # gradient's norm is 1.7 to 3.8 (over 9 on the 1-example batches), so
    # some steps are clipped and others are not.
    "reference_clip": dict(activity_regularization=1e-4,
                           add_loss_reduction="sum", clip_norm=2.3,
                           model="reference"),
    # A user dataset_fn and model_fn (tests/helpers/plugin_fixtures.py): 300
    # examples in batches of 31 (15/16, 10/10/11), the last with 21; 20 steps.
    "user_plugins": dict(dataset="tests.helpers.plugin_fixtures:blobs",
                         global_batch_size=31, model="blobs"),
    # The packaged MNIST digits, for the hand-written reference loop in
    # tests/test_parity.py: the reference model with its sum add_loss and
    # clipping (gradient norms of 0.9 to 1.4 on full batches: about half the
    # steps are clipped), and the Keras activity model (a mean add_loss).
    "sample_sum_clip": dict(dataset="mnist_sample", activity_regularization=1e-4,
                            add_loss_reduction="sum", clip_norm=1.0,
                            model="reference"),
    "sample_mean": dict(dataset="mnist_sample", add_loss_reduction="mean",
                        model="keras_activity"),
    # reference_sum in the speed modes (tests/test_speed_modes.py).
    "reference_steps_per_loop_1": dict(activity_regularization=1e-4,
                                       add_loss_reduction="sum",
                                       steps_per_loop=1, model="reference"),
    "reference_jit": dict(activity_regularization=1e-4,
                          add_loss_reduction="sum", jit_compile=True,
                          model="reference"),
    "reference_bfloat16": dict(activity_regularization=1e-4,
                               add_loss_reduction="sum",
                               mixed_precision="mixed_bfloat16",
                               model="reference"),
    "reference_float16": dict(activity_regularization=1e-4,
                              add_loss_reduction="sum",
                              mixed_precision="mixed_float16",
                              model="reference"),
    # The reference sum layer wrongly declared a mean: replicas must diverge,
    # which shows the parity test can fail.
    "reference_declared_mean": dict(activity_regularization=1e-4,
                                    add_loss_reduction="mean",
                                    model="reference"),
}


# Settings every case shares; each is a Config field and a flag of that name.
COMMON = dict(dataset="synthetic", num_train_examples=652,
              num_validation_examples=150, global_batch_size=65, epochs=2,
              learning_rate=0.05, kernel_l2=1e-3, seed=3, log_every_steps=4,
              steps_per_loop=3, shuffle_buffer=1024)


# The training-health report (--health_scalars, on by default) reads the
# optimizer's summed gradients and times every step, and must change no
# update: every case trains with it on 2 replicas (and reference_sum
# everywhere) and without it on 1 and 3, and the runs are compared. Shared
# with task_parity_run.py.
HEALTH_REPLICAS = 2


def health_scalars(replicas):
  """--health_scalars of a parity run on `replicas` replicas, unless its
  case sets its own."""
  return replicas == HEALTH_REPLICAS


def settings(case):
  """The Config fields of `case`, without its model."""
  return {name: value for name, value in {**COMMON, **CASES[case]}.items()
          if name != "model"}


def cli_flags(case, **overrides):
  """The `dist_train.main` flags that train `case` (a reference-model case).

  For runs through the command line, such as the multi-worker parity tests.
  """
  if CASES[case]["model"] != "reference":
    raise ValueError(f"case {case} needs a model_fn the command line lacks")
  return [f"--{name}={value}"
          for name, value in {**settings(case), **overrides}.items()]


def _count_modules(dump_dir):
  """Distinct XLA modules compiled into `dump_dir`: none without
  --jit_compile, and with it at least one per replica."""
  if not os.path.isdir(dump_dir):
    return 0
  return len({name.split(".")[0] for name in os.listdir(dump_dir)})


def _train_case(case, replicas, output_dir, strategy, xla_dump_dir):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from dist_train import config as config_lib  # pylint: disable=import-outside-toplevel
  from dist_train import train  # pylint: disable=import-outside-toplevel
  from dist_train.models import mnist  # pylint: disable=import-outside-toplevel
  from tests.helpers import plugin_fixtures  # pylint: disable=import-outside-toplevel

  create_model = {"reference": mnist.create_model,
                  "keras_activity": keras_activity_model,
                  "blobs": plugin_fixtures.blob_model}[CASES[case]["model"]]
  initial = []

  def model_fn(config):
    model = create_model(config)
    initial.extend(v.numpy() for v in model.variables)
    return model

  config = config_lib.Config(
      model_dir=os.path.join(output_dir, f"{case}_{replicas}"),
      cpu_replicas=replicas,
      **{"health_scalars": health_scalars(replicas), **settings(case)})
  modules_before = _count_modules(xla_dump_dir)
  result = train.train_and_evaluate(config, model_fn=model_fn,
                                    strategy=strategy)
  np.savez(
      os.path.join(output_dir, f"{case}_{replicas}.npz"),
      global_step=result.global_step, num_replicas=result.num_replicas,
      num_workers=result.num_workers, loop_calls=result.loop_calls,
      xla_modules=(
          _count_modules(xla_dump_dir) - modules_before),
      **{f"train_{k}": v for k, v in result.train_metrics.items()},
      **{f"validation_{k}": v for k, v in result.validation_metrics.items()},
      **{f"initial_{i}": v for i, v in enumerate(initial)},
      **{f"weight_{i}": v.numpy()
         for i, v in enumerate(result.model.variables)})


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--cases", required=True,
                      help="comma-separated names of CASES")
  parser.add_argument("--cpu_replicas", type=int, required=True)
  parser.add_argument("--output_dir", required=True)
  args = parser.parse_args()
  cases = args.cases.split(",")
  unknown = sorted(set(cases) - set(CASES))
  if unknown:
    parser.error(f"unknown cases {unknown}; known: {sorted(CASES)}")

  os.makedirs(args.output_dir, exist_ok=True)
  # Before TensorFlow loads: XLA writes every module it compiles here.
  dump_dir = tempfile.mkdtemp(prefix="xla_", dir=args.output_dir)
  os.environ["XLA_FLAGS"] = " ".join(
      filter(None, [os.environ.get("XLA_FLAGS"), f"--xla_dump_to={dump_dir}"]))

  from dist_train import config as config_lib  # pylint: disable=import-outside-toplevel
  from dist_train import train  # pylint: disable=import-outside-toplevel
  strategy = train.create_strategy(config_lib.Config(
      model_dir=args.output_dir, cpu_replicas=args.cpu_replicas))
  for case in cases:
    _train_case(case, args.cpu_replicas, args.output_dir, strategy, dump_dir)


if __name__ == "__main__":
  main()
