"""The best model so far by a validation metric, in <model_dir>/best/.

Whenever an evaluation improves `--best_metric`, the chief writes
<model_dir>/best/: a checkpoint of the model at that step (`ckpt`), the
model as `model.keras`, and `metrics.json` with the step and every validation
metric. The directory is written under a temporary name and renamed into
place, so best/ always holds one complete model. The best value so far is
read back from best/metrics.json at start, so a resumed run never replaces a
better model with a worse one.
"""

import json
import math
import os
import tempfile
from typing import Optional

from absl import logging
import keras
import tensorflow as tf

from dist_train import errors
from dist_train.outputs import model_dir as model_dir_lib

BEST_DIR = model_dir_lib.BEST
METRICS_FILE = model_dir_lib.BEST_METRICS
# Names whose smaller values are better, for --best_mode=auto.
_LOWER_IS_BETTER = ("loss", "error", "perplexity", "mae", "mse")


class BestModelError(errors.DistTrainError):
  """The best model cannot be tracked as asked (e.g. an unknown metric)."""


def resolve_mode(metric: str, mode: str) -> str:
  """"max" or "min"; `auto` is min for losses, errors and perplexities."""
  if mode != "auto":
    return mode
  return "min" if any(metric.endswith(s) for s in _LOWER_IS_BETTER) else "max"


def improved(value: float, best: Optional[float], *, mode: str,
             min_delta: float = 0.0) -> bool:
  """Whether `value` beats `best` by more than `min_delta` in `mode`."""
  if not math.isfinite(value):
    return False
  if best is None:
    return True
  return value > best + min_delta if mode == "max" else (
      value < best - min_delta)


def read_metrics(model_dir: str) -> Optional[dict]:
  """best/metrics.json of `model_dir`, or None when there is none."""
  path = model_dir_lib.best_metrics_file(model_dir)
  try:
    return model_dir_lib.read_json(path)
  except (ValueError, OSError) as e:
    raise BestModelError(f"cannot read {path}: {errors.first_line(e)}; move "
                         "it away to start a new best model") from e


class BestModel:
  """Tracks the best validation value of one metric and writes best/."""

  def __init__(self, model_dir: str, *, metric: str, mode: str,
               is_chief: bool):
    self._model_dir = model_dir
    self.metric = metric
    self.mode = resolve_mode(metric, mode)
    self._is_chief = is_chief
    if is_chief:
      # A run stopped while replacing best/: the old one is still the best.
      model_dir_lib.recover_dir(self.directory)
    written = read_metrics(model_dir)
    self.value = written["value"] if written else None
    self.step = written["global_step"] if written else None

  @property
  def directory(self) -> str:
    return model_dir_lib.best_dir(self._model_dir)

  def update(self, *, global_step: int, metrics: dict,
             model: keras.Model) -> bool:
    """Writes best/ if `metrics` improve the best value; returns whether.

    Raises:
      BestModelError: `metrics` has no such metric.
    """
    if self.metric not in metrics:
      raise BestModelError(
          f"--best_metric={self.metric} is not a validation metric; the "
          f"validation metrics are {', '.join(sorted(metrics))}")
    value = float(metrics[self.metric])
    if not improved(value, self.value, mode=self.mode):
      return False
    self._write(global_step, value, metrics, model)
    self.value, self.step = value, global_step
    return True

  def _write(self, global_step, value, metrics, model):
    """Every worker writes the checkpoint (saving distributed variables may
    need all of them); only the chief keeps it, in place of best/."""
    with errors.phase(f"writing the best model of step {global_step}"):
      if not self._is_chief:
        with tempfile.TemporaryDirectory(prefix="dist_train_best_") as local:
          tf.train.Checkpoint(model=model).write(
              os.path.join(local, model_dir_lib.BEST_CHECKPOINT))
        return
      with model_dir_lib.writing_dir(self.directory) as partial:
        tf.train.Checkpoint(model=model).write(
            os.path.join(partial, model_dir_lib.BEST_CHECKPOINT))
        model.save(os.path.join(partial, model_dir_lib.KERAS_MODEL))
        with open(os.path.join(partial, METRICS_FILE), "w") as f:
          json.dump({"metric": self.metric, "mode": self.mode,
                     "value": value, "global_step": global_step,
                     "metrics": metrics}, f, indent=2)
    logging.info("New best %s %.4f at step %d: wrote %s", self.metric, value,
                 global_step, self.directory)
