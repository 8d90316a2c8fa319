"""--lr_schedule=plateau: cut the learning rate when validation stalls.

After each evaluation the rule compares `--lr_plateau_metric` with the best
value so far (as early stopping does, in `--best_mode`'s direction when it
is `--best_metric`, else by its name): once it has not improved for
`--lr_plateau_patience` evaluations in a row, the rate is multiplied by
`--lr_plateau_factor`, never below `--lr_min`, and the count restarts.

The rate is `--learning_rate * scale` (`scale` also multiplies any
`--warmup_steps`), with `scale` a variable the schedule reads inside the
compiled loop, so a cut takes effect from the next step without retracing. Every worker computes the
same validation metrics (aggregated over all replicas), so every worker cuts
at the same step: the decision needs no message of its own, like early
stopping's. `scale`, the best value and the count are saved with the run's
checkpoint, so a resumed run goes on with the same rate and count.
"""

from typing import Optional

from absl import logging
import keras
import tensorflow as tf

from dist_train.loop import early_stopping


class PlateauRule:
  """The rule's state and its update after each evaluation."""

  def __init__(self, *, scale: tf.Variable, metric: str,
               mode: str, patience: int, factor: float,
               base_learning_rate: float, min_learning_rate: float = 0.0):
    """Creates the rule.

    Args:
      scale: the factor of the learning rate the rule cuts
        (optimizers.create_rate_scale), saved with the run by its owner.
      metric: the validation metric watched.
      mode: "min", "max" or "auto" (see best.resolve_mode).
      patience: evaluations without an improvement before a cut.
      factor: the cut, in (0, 1).
      base_learning_rate: --learning_rate.
      min_learning_rate: the rate is never cut below this.
    """
    if not 0.0 < factor < 1.0:
      raise ValueError(f"factor must be in (0, 1), got {factor}")
    if patience < 1:
      raise ValueError(f"patience must be positive, got {patience}")
    self._count = early_stopping.NoImprovementCount(
        metric=metric, mode=mode, flag="--lr_plateau_metric",
        name="lr_plateau")
    self.metric, self.mode = metric, self._count.mode
    self.patience = patience
    self.factor = factor
    self.base_learning_rate = base_learning_rate
    self.min_learning_rate = min_learning_rate
    self.scale = scale
    self.best, self.wait = self._count.best, self._count.wait

  @property
  def variables(self) -> dict:
    """What the run's checkpoint saves of the rule."""
    return self._count.variables

  @property
  def learning_rate(self) -> float:
    """The rate after warmup: --learning_rate times the cuts so far."""
    return self.base_learning_rate * float(self.scale.numpy())

  def update(self, metrics: dict) -> Optional[float]:
    """Records an evaluation; returns the new rate when it cuts, else None."""
    if self._count.update(metrics) < self.patience:
      return None
    self.wait.assign(0)
    floor = self.min_learning_rate / self.base_learning_rate
    scale = max(float(self.scale.numpy()) * self.factor, floor)
    if scale >= float(self.scale.numpy()):
      return None  # At --lr_min already.
    self.scale.assign(scale)
    return self.learning_rate


class CutOnPlateau(keras.callbacks.Callback):
  """The run's hook of the rule: updates it after each evaluation."""

  def __init__(self, rule: PlateauRule, *, global_step_fn):
    super().__init__()
    self.rule = rule
    self._global_step_fn = global_step_fn

  def on_test_end(self, logs=None):
    rate = self.rule.update(logs)
    if rate is not None:
      logging.info(
          "Validation %s has not improved for %d evaluations: learning "
          "rate cut to %g at step %d", self.rule.metric, self.rule.patience,
          rate, self._global_step_fn())
