"""Trains one configuration with N logical CPU replicas and saves the result.

Run as its own process (one process can form only one collective group size):

    python tests/parity_run.py --case=reference_sum --cpu_replicas=2 --output=F.npz

Writes the final trainable weights (in model order) and the last epoch's
train and validation metrics to an .npz file.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def keras_activity_model(config):
  """An MLP whose hidden layer has a Keras activity_regularizer (a mean)."""
  import keras  # pylint: disable=import-outside-toplevel
  l2 = keras.regularizers.L2(config.kernel_l2)
  inputs = keras.Input(shape=(784,))
  x = keras.layers.Dense(32, activation="relu", kernel_regularizer=l2,
                         activity_regularizer=keras.regularizers.L2(1e-3),
                         name="dense_1")(inputs)
  outputs = keras.layers.Dense(10, kernel_regularizer=l2,
                               name="predictions")(x)
  return keras.Model(inputs, outputs)


# Each case: Config overrides and the model function. 700 training examples
# in global batches of 64 give 11 steps an epoch, the last with 60 examples
# (uneven across 4 replicas: 15 each, and 2 replicas: 30 each); 2 epochs give
# 22 steps.
CASES = {
    # The reference model with the reference add_loss layer (a sum).
    "reference_sum": dict(activity_regularization=1e-4,
                          add_loss_reduction="sum", model="reference"),
    # A Keras activity_regularizer (a mean over the batch).
    "keras_mean": dict(add_loss_reduction="mean", model="keras_activity"),
    # Global-norm clipping of the cross-replica gradient sum.
    "reference_clip": dict(activity_regularization=1e-4,
                           add_loss_reduction="sum", clip_norm=0.05,
                           model="reference"),
    # A user dataset_fn and model_fn (tests/plugin_fixtures.py): 300
    # examples in batches of 32, the last with 12; 20 steps.
    "user_plugins": dict(dataset="tests.plugin_fixtures:blobs",
                         global_batch_size=32, model="blobs"),
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
COMMON = dict(dataset="synthetic", num_validation_examples=150, epochs=2,
              learning_rate=0.05, kernel_l2=1e-3, seed=3, log_every_steps=4,
              steps_per_loop=3)


def cli_flags(case, **overrides):
  """The `dist_train.main` flags that train `case` (a reference-model case).

  For runs through the command line, such as the multi-worker parity tests.
  """
  settings = dict(COMMON, num_train_examples=700, global_batch_size=64,
                  **CASES[case])
  if settings.pop("model") != "reference":
    raise ValueError(f"case {case} needs a model_fn the command line lacks")
  settings.update(overrides)
  return [f"--{name}={value}" for name, value in settings.items()]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--case", choices=sorted(CASES), required=True)
  parser.add_argument("--cpu_replicas", type=int, required=True)
  parser.add_argument("--output", required=True)
  parser.add_argument("--num_train_examples", type=int, default=700)
  parser.add_argument("--global_batch_size", type=int, default=64)
  args = parser.parse_args()

  import numpy as np  # pylint: disable=import-outside-toplevel
  from dist_train import config as config_lib  # pylint: disable=import-outside-toplevel
  from dist_train.models import mnist  # pylint: disable=import-outside-toplevel
  from dist_train import train  # pylint: disable=import-outside-toplevel

  overrides = dict(CASES[args.case])
  from tests import plugin_fixtures  # pylint: disable=import-outside-toplevel
  model_fn = {"reference": mnist.create_model,
              "keras_activity": keras_activity_model,
              "blobs": plugin_fixtures.blob_model}[overrides.pop("model")]
  config = config_lib.Config(
      model_dir=tempfile.mkdtemp(prefix="parity_"),
      num_train_examples=args.num_train_examples,
      global_batch_size=overrides.pop("global_batch_size",
                                      args.global_batch_size),
      cpu_replicas=args.cpu_replicas, **{**COMMON, **overrides})
  result = train.train_and_evaluate(config, model_fn=model_fn)
  weights = {f"weight_{i}": v.numpy()
             for i, v in enumerate(result.model.trainable_variables)}
  np.savez(args.output, global_step=result.global_step,
           **{f"train_{k}": v for k, v in result.train_metrics.items()},
           **{f"validation_{k}": v
              for k, v in result.validation_metrics.items()},
           **weights)


if __name__ == "__main__":
  main()
