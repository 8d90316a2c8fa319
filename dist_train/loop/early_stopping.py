"""Early stopping: stop when a validation metric stops improving.

The state (the best value so far and the evaluations since it improved) is
kept in tf.Variables saved with the run's checkpoint, so a resumed run counts
on from where the checkpoint was written. Every worker computes the same
validation metrics (they are aggregated over all replicas), so every worker
decides to stop at the same step.
"""

import math

import tensorflow as tf

from dist_train.outputs import best as best_lib


class NoImprovementCount:
  """Evaluations in a row since a validation metric last improved (by more
  than `min_delta`), and the best value: what early stopping and the
  plateau schedule both count, in variables a checkpoint saves.

  Plain variables: read and assigned only by the eager outer loop.
  """

  def __init__(self, *, metric: str, mode: str, flag: str, name: str,
               min_delta: float = 0.0):
    """Args: `flag` names the metric's flag in errors; `name` prefixes the
    variables (`<name>_best`, `<name>_wait`), as the checkpoint keys them."""
    self.metric = metric
    self.mode = best_lib.resolve_mode(metric, mode)
    self.min_delta = min_delta
    self._flag = flag
    self.best = tf.Variable(float("nan"), dtype=tf.float64, trainable=False,
                            name=f"{name}_best")
    self.wait = tf.Variable(0, dtype=tf.int64, trainable=False,
                            name=f"{name}_wait")
    self.variables = {f"{name}_best": self.best, f"{name}_wait": self.wait}

  def update(self, metrics: dict) -> int:
    """Records an evaluation; returns the evaluations without an improvement
    so far (0 when this one improved)."""
    if self.metric not in metrics:
      raise best_lib.BestModelError(
          f"{self._flag}={self.metric} is not a validation metric; the "
          f"validation metrics are {', '.join(sorted(metrics))}")
    value = float(metrics[self.metric])
    best = float(self.best.numpy())
    if best_lib.improved(value, None if math.isnan(best) else best,
                         mode=self.mode, min_delta=self.min_delta):
      self.best.assign(value)
      self.wait.assign(0)
    else:
      self.wait.assign_add(1)
    return int(self.wait.numpy())


class EarlyStopping:
  """Counts evaluations without an improvement of more than `min_delta`."""

  def __init__(self, *, metric: str, mode: str, patience: int,
               min_delta: float = 0.0):
    self._count = NoImprovementCount(metric=metric, mode=mode,
                                     flag="--best_metric",
                                     name="early_stopping",
                                     min_delta=min_delta)
    self.metric, self.mode = metric, self._count.mode
    self.patience = patience
    self.min_delta = min_delta
    self.best, self.wait = self._count.best, self._count.wait

  @property
  def variables(self) -> dict:
    """What the run's checkpoint saves of this object."""
    return self._count.variables

  def update(self, metrics: dict) -> bool:
    """Records an evaluation; returns whether the run should stop."""
    return self._count.update(metrics) >= self.patience

  def reason(self) -> str:
    return (f"validation {self.metric} has not improved by more than "
            f"{self.min_delta:g} for {int(self.wait.numpy())} evaluations "
            f"(best {float(self.best.numpy()):.4f})")
