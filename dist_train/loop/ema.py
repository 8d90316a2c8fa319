"""An exponential moving average of the trainable weights (`--ema_decay`).

After each optimizer step the average A of every trainable weight W moves
towards it:

    A <- decay_n * A + (1 - decay_n) * W,
    decay_n = d                          when --ema_warmup_steps is 0,
    decay_n = d * min(1, n / warmup)     otherwise,

with n the number of averaging steps before this one (the global step
before the update, for a run that averaged from its start). A starts as a
copy of the weights when averaging starts: the initial (or warm-started)
weights, or, when a resumed run turns averaging on, the restored weights.
With a warmup, the first update (n = 0) replaces that copy by the weights
after the first step, and the decay grows linearly to d. A step that loss
scaling skips (an overflow under mixed_float16) leaves the weights as they
were and still counts as an averaging step.

Why not Keras' own `use_ema`: its momentum is fixed (the first step copies
the weights, there is no warmup rule); it lives in the optimizer, so a task's
own optimizer (`Task.build_optimizer`) would have to be changed in place;
and its averages join the optimizer's numbered variables, so turning it on
at a resume changes the layout of the optimizer's checkpoint. Here the average is float32
`tf.Variable`s created under the strategy's scope (mirrored: one copy per
replica), updated in the compiled loop right after `strategy.run` with
`strategy.extended.update`, which runs the same arithmetic on each replica's
own copy of the weights, identical on every replica and worker because the
weights are. It is saved in the run's checkpoint with its step count.
"""

import contextlib

from absl import logging
import tensorflow as tf


def decay_at(decay: float, warmup_steps: int, updates):
  """decay_n of the module docstring; `updates` is n (a tensor or int)."""
  if not warmup_steps:
    return tf.constant(decay, tf.float32)
  fraction = tf.minimum(1.0, tf.cast(updates, tf.float32) / warmup_steps)
  return decay * fraction


class WeightAverage:
  """The moving average of a model's trainable weights, in float32."""

  def __init__(self, *, strategy: tf.distribute.Strategy, variables,
               decay: float, warmup_steps: int = 0):
    """Creates the average (created under the strategy's scope here).

    Args:
      strategy: the run's strategy.
      variables: the model's trainable variables.
      decay: d, in (0, 1).
      warmup_steps: steps over which the decay grows linearly to d (0: none).
    """
    if not 0.0 < decay < 1.0:
      raise ValueError(f"decay must be in (0, 1), got {decay}")
    if warmup_steps < 0:
      raise ValueError(
          f"warmup_steps must be non-negative, got {warmup_steps}")
    self._strategy = strategy
    self._variables = list(variables)
    self.decay = float(decay)
    self.warmup_steps = int(warmup_steps)
    with strategy.scope():
      self.averages = [
          tf.Variable(tf.zeros(v.shape, tf.float32), trainable=False,
                      name=f"ema_{i}",
                      aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
          for i, v in enumerate(self._variables)]
      # n of the module docstring, and whether averaging has started (a
      # checkpoint without an average leaves it 0).
      self.updates = tf.Variable(
          0, dtype=tf.int64, trainable=False, name="ema_updates",
          aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
      self.started = tf.Variable(
          False, trainable=False, name="ema_started",
          aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

  @property
  def variables(self) -> dict:
    """What the run's checkpoint saves of the average."""
    return {"ema": {"averages": self.averages, "updates": self.updates,
                    "started": self.started}}

  def start(self, global_step: int) -> None:
    """Starts averaging from the current weights, unless a restored
    checkpoint already holds an average (eagerly, before training)."""
    if bool(self.started.numpy()):
      return
    for average, variable in zip(self.averages, self._variables):
      average.assign(tf.cast(variable, tf.float32))
    self.updates.assign(0)
    self.started.assign(True)
    if global_step:
      logging.info("The weight average (--ema_decay=%g) starts from the "
                   "weights of step %d: the checkpoint has none",
                   self.decay, global_step)

  def update(self) -> None:
    """One averaging step, in cross-replica context (the compiled loop,
    after `strategy.run`)."""
    decay = decay_at(self.decay, self.warmup_steps, self.updates)

    def move(average, weight, decay):
      return average.assign(decay * average +
                            (1.0 - decay) * tf.cast(weight, tf.float32))

    for average, variable in zip(self.averages, self._variables):
      self._strategy.extended.update(
          average, move, args=(_tf_variable(variable), decay), group=False)
    self.updates.assign_add(1)

  @contextlib.contextmanager
  def applied(self):
    """The model holds the average inside the block, its own weights again
    after it (also when the block raises)."""
    raw = [tf.identity(tf.convert_to_tensor(v)) for v in self._variables]
    try:
      for variable, average in zip(self._variables, self.averages):
        variable.assign(tf.cast(average, variable.dtype))
      yield
    finally:
      for variable, value in zip(self._variables, raw):
        variable.assign(value)


def _tf_variable(variable):
  """The tf.Variable (a distributed one) behind a Keras variable."""
  return getattr(variable, "value", variable)


@contextlib.contextmanager
def evaluation_weights(average):
  """The weights evaluation, best/ and the export see: the average when
  `average` (a WeightAverage or None) has started, else the model's own."""
  if average is None or not bool(average.started.numpy()):
    yield
    return
  with average.applied():
    yield
