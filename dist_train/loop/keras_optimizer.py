"""`model.optimizer` for stock Keras callbacks (the Python API's `callbacks`).

dist_train never compiles the model, so Keras callbacks that read or set
`model.optimizer` (ReduceLROnPlateau, LearningRateScheduler,
SwapEMAWeights) would find None. During training the model's `optimizer`
is a `KerasOptimizerView` of the run's optimizer:

* reading anything reads the optimizer itself (`iterations`, `variables`,
  ...), and `learning_rate` is the rate of the next step;
* setting `learning_rate` sets the factor the run's schedule is multiplied
  by (`optimizers.create_rate_scale`), so that the next step's rate is the
  value set. The schedule object of a Keras optimizer cannot be assigned a
  float (Keras raises), and the factor is saved in the checkpoint, so a
  resumed run keeps the rate a callback set;
* with `--ema_decay`, `use_ema` is true and the weight average
  (`ema.WeightAverage`) is what SwapEMAWeights swaps in.

The view is not the optimizer object and is not tracked: a checkpoint or a
`model.keras` of the model alone (best/, the export) holds the weights, as
without it. Every worker calls its callbacks with the same logs
(validation metrics and losses are aggregated over every replica and
worker), so stock callbacks set the same rate at the same step everywhere.
"""

import tensorflow as tf


class KerasOptimizerView:
  """The run's optimizer as Keras callbacks use `model.optimizer`."""

  def __init__(self, *, optimizer, scale: tf.Variable, unscaled_rate_fn,
               average=None, variables=()):
    """Creates the view.

    Args:
      optimizer: the run's optimizer (a LossScaleOptimizer under
        mixed_float16).
      scale: the factor of its learning rate (optimizers.create_rate_scale).
      unscaled_rate_fn: () -> the schedule's rate of the next step before
        `scale`.
      average: the run's ema.WeightAverage, or None.
      variables: the model's trainable variables (what the average is of).
    """
    object.__setattr__(self, "_optimizer", optimizer)
    object.__setattr__(self, "_scale", scale)
    object.__setattr__(self, "_unscaled_rate_fn", unscaled_rate_fn)
    object.__setattr__(self, "_average", average)
    object.__setattr__(self, "_variables", list(variables))

  def __getattr__(self, name):
    if name in ("inner_optimizer", "optimizers"):
      # SwapEMAWeights would look for the average inside these.
      raise AttributeError(name)
    return getattr(self._optimizer, name)

  def __setattr__(self, name, value):
    if name != "learning_rate":
      raise AttributeError(
          f"model.optimizer.{name} cannot be set during a dist_train run; "
          "only learning_rate can")
    # The schedule's rate of the next step times the factor is `value`.
    unscaled = float(self._unscaled_rate_fn())
    if unscaled <= 0:
      raise ValueError(
          f"cannot set the learning rate to {value}: the schedule's rate of "
          f"this step is {unscaled}")
    self._scale.assign(float(value) / unscaled)

  @property
  def learning_rate(self):
    return self._optimizer.learning_rate

  # What SwapEMAWeights reads, with --ema_decay.

  @property
  def use_ema(self) -> bool:
    return self._average is not None

  @property
  def _model_variables_moving_average(self):
    if self._average is None:
      raise AttributeError("_model_variables_moving_average")
    return self._average.averages

  @property
  def _trainable_variables(self):
    return self._variables
