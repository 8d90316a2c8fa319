"""Trains dist_train's flags through the Python API, recording the model's
own weights before the first step and after every step, then evaluates the
latest checkpoint with and without the weight average; for tests/e2e/test_ema.py.

    python tests/helpers/ema_run.py OUTPUT.npz --model_dir=D --steps_per_loop=1 ...

The flags are dist_train's (--steps_per_loop=1: a callback sees each step).
OUTPUT.npz holds `raw_<step>_<i>` (trainable variable i after step `step`,
0 before the first), `export_<i>` and `best_<i>` (the trainable weights of
export/model.keras and best/model.keras), `best_step`, the last validation
loss of training (`validation_loss`) and of --mode=evaluate with and without
--eval_with_ema (`evaluate_ema_loss`, `evaluate_raw_loss`).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


def main():
  from absl import flags as absl_flags  # pylint: disable=import-outside-toplevel
  import keras  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from dist_train import flags as flags_lib  # pylint: disable=import-outside-toplevel
  from dist_train import train  # pylint: disable=import-outside-toplevel

  output = sys.argv[1]
  absl_flags.FLAGS([sys.argv[0], *sys.argv[2:]])
  config = flags_lib.config_from_flags()
  raw = {}

  class Record(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
      self._record(0)

    def on_train_batch_end(self, batch, logs=None):
      self._record(batch)

    def _record(self, step):
      for i, variable in enumerate(self.model.trainable_variables):
        raw[f"raw_{step}_{i}"] = variable.numpy()

  strategy = train.create_strategy(config)
  result = train.train_and_evaluate(config, strategy=strategy,
                                    callbacks=[Record()])
  evaluated = {
      with_ema: train.evaluate(config.replace(mode="evaluate",
                                              eval_with_ema=with_ema),
                               strategy=strategy)["loss"]
      for with_ema in (True, False)}

  def weights(path):
    return keras.models.load_model(path).trainable_weights

  exported = weights(os.path.join(config.model_dir, "export", "model.keras"))
  best = weights(os.path.join(config.model_dir, "best", "model.keras"))
  with open(os.path.join(config.model_dir, "best", "metrics.json")) as f:
    best_step = json.load(f)["global_step"]
  np.savez(output, **raw,
           **{f"export_{i}": w.numpy() for i, w in enumerate(exported)},
           **{f"best_{i}": w.numpy() for i, w in enumerate(best)},
           best_step=best_step,
           validation_loss=result.history[-1]["validation"]["loss"],
           evaluate_ema_loss=evaluated[True],
           evaluate_raw_loss=evaluated[False])


if __name__ == "__main__":
  main()
