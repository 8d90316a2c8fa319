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
import shutil
import tempfile
from typing import Optional

from absl import logging
import keras
import tensorflow as tf

from dist_train import errors

BEST_DIR = "best"
METRICS_FILE = "metrics.json"
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
  path = os.path.join(model_dir, BEST_DIR, METRICS_FILE)
  if not tf.io.gfile.exists(path):
    return None
  try:
    with tf.io.gfile.GFile(path) as f:
      return json.load(f)
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
    old = self.directory + ".old"
    if is_chief and not os.path.exists(self.directory) and os.path.exists(old):
      # A run stopped between moving the old best/ aside and renaming the
      # new one into place: the old one is still the best.
      os.rename(old, self.directory)
    written = read_metrics(model_dir)
    self.value = written["value"] if written else None
    self.step = written["global_step"] if written else None

  @property
  def directory(self) -> str:
    return os.path.join(self._model_dir, BEST_DIR)

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
    parent = self._model_dir if self._is_chief else tempfile.gettempdir()
    with errors.phase(f"writing the best model of step {global_step}"):
      partial = tempfile.mkdtemp(prefix=".best_partial_", dir=parent)
      try:
        tf.train.Checkpoint(model=model).write(os.path.join(partial, "ckpt"))
        if not self._is_chief:
          return
        model.save(os.path.join(partial, "model.keras"))
        with open(os.path.join(partial, METRICS_FILE), "w") as f:
          json.dump({"metric": self.metric, "mode": self.mode,
                     "value": value, "global_step": global_step,
                     "metrics": metrics}, f, indent=2)
        old = None
        if os.path.exists(self.directory):
          old = self.directory + ".old"
          shutil.rmtree(old, ignore_errors=True)
          os.rename(self.directory, old)
        os.rename(partial, self.directory)
        partial = None
        if old:
          shutil.rmtree(old, ignore_errors=True)
      finally:
        if partial:
          shutil.rmtree(partial, ignore_errors=True)
    logging.info("New best %s %.4f at step %d: wrote %s", self.metric, value,
                 global_step, self.directory)
