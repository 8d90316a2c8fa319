"""Warm starts through the Python API: several runs in one process.

    python tests/helpers/warm_start_run.py SOURCE_DIR OUTPUT_DIR -- DIST_TRAIN_FLAGS

DIST_TRAIN_FLAGS (the source run's) give the base Config; each run changes a
few fields and writes to OUTPUT_DIR/<name>. One strategy serves every run (a
process sets its devices once). Prints one JSON line: per run, its global
step and its first and last validation metrics. The new-head run's hidden
layers as training began are saved to OUTPUT_DIR/new_head_initial.npz.
"""

import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from absl import flags
from absl import logging
import keras
import numpy as np
import tensorflow as tf

from dist_train import flags as flags_lib
from dist_train import logs
from dist_train import train
from dist_train.outputs import checkpoints
from tests.helpers import plugin_fixtures

HIDDEN_LAYERS = ("dense_1", "dense_2")


class FirstValidation(keras.callbacks.Callback):
  """The metrics of the run's first evaluation."""

  def __init__(self):
    super().__init__()
    self.metrics = None

  def on_test_end(self, logs=None):
    if self.metrics is None:
      self.metrics = dict(logs)


class SaveInitialWeights(keras.callbacks.Callback):
  """Saves the hidden layers' weights as training begins."""

  def __init__(self, path):
    super().__init__()
    self._path = path

  def on_train_begin(self, logs=None):
    np.savez(self._path, **{
        f"{layer}_{i}": weight for layer in HIDDEN_LAYERS
        for i, weight in enumerate(self.model.get_layer(layer).get_weights())})


def main(argv):
  source_dir, output_dir, separator, *dist_train_flags = argv[1:]
  assert separator == "--", argv
  flags.FLAGS(["warm_start_run", *dist_train_flags])
  base = flags_lib.config_from_flags()
  logs.configure_logging()
  logging.set_verbosity(logging.INFO)
  strategy = train.create_strategy(base)

  # At a rate of 1e-12 the first evaluation (after step 1) shows the weights
  # the run started from.
  tiny_rate = dict(learning_rate=1e-12, eval_every_steps=1, epochs=1)
  prefix = tf.train.latest_checkpoint(checkpoints.checkpoint_dir(source_dir))
  runs = [
      ("from_dir", dict(tiny_rate, init_checkpoint=source_dir), None, []),
      # Its own checkpoint exists now: --init_checkpoint is ignored.
      ("from_dir_resumed", dict(tiny_rate, init_checkpoint=source_dir,
                                epochs=2), None, []),
      ("from_prefix", dict(tiny_rate, init_checkpoint=prefix), None, []),
      ("new_head", dict(init_checkpoint=source_dir, init_skip_mismatch=True,
                        epochs=1), plugin_fixtures.mlp_with_12_classes,
       [SaveInitialWeights(os.path.join(output_dir, "new_head_initial.npz"))]),
  ]
  results = {}
  for name, changes, model_fn, callbacks in runs:
    model_dir = os.path.join(output_dir, name.replace("_resumed", ""))
    config = dataclasses.replace(base, model_dir=model_dir, **changes)
    first = FirstValidation()
    result = train.train_and_evaluate(config, model_fn=model_fn,
                                      strategy=strategy,
                                      callbacks=[first, *callbacks])
    results[name] = {"global_step": result.global_step,
                     "first_validation": first.metrics,
                     "validation": result.validation_metrics}
  print(json.dumps(results))


if __name__ == "__main__":
  main(sys.argv)
