"""Optimizers and learning-rate schedules."""

import math
from typing import Sequence

import keras
from keras import ops
import tensorflow as tf

from dist_train import config as config_lib


@keras.saving.register_keras_serializable(package="dist_train")
class LearningRateSchedule(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warmup, then a constant, cosine or step-decayed learning rate.

  The optimizer calls it with the number of updates already applied, so
  `schedule(s)` is the rate of update s + 1.

  * warmup: for s < warmup_steps the rate is base * (s + 1) / warmup_steps, so
    the first update is not wasted at a rate of 0;
  * constant: base;
  * cosine: base * (1 + cos(pi * p)) / 2, with p the fraction of the
    post-warmup steps done, reaching 0 at total_steps;
  * step: base * decay_factor ** (number of boundaries <= s);
  * plateau: base (cut by plateau.py through `scale`).

  Every kind is then multiplied by `scale`, a variable the run changes
  between compiled loops: plateau.py cuts it, and a Keras callback that sets
  `model.optimizer.learning_rate` sets it (keras_optimizer.py). It is 1
  until then, or when none is given (a reloaded schedule).
  """

  def __init__(self, kind, base_learning_rate, *, total_steps, warmup_steps=0,
               boundaries=(), decay_factor=0.1, scale=None):
    if kind not in config_lib.LR_SCHEDULES:
      raise ValueError(f"unknown learning-rate schedule {kind!r}")
    self.kind = kind
    self.base_learning_rate = float(base_learning_rate)
    self.total_steps = int(total_steps)
    self.warmup_steps = int(warmup_steps)
    self.boundaries = tuple(int(b) for b in boundaries)
    self.decay_factor = float(decay_factor)
    self.scale = scale  # Not in get_config: state, saved by the checkpoint.

  def __call__(self, step):
    rate = self.unscaled(step)
    if self.scale is not None:
      rate = rate * ops.cast(self.scale, "float32")
    return rate

  def unscaled(self, step):
    """The rate of update step + 1 before `scale`."""
    step = ops.cast(step, "float32")
    base = self.base_learning_rate
    if self.kind == "cosine":
      decay_steps = max(1, self.total_steps - self.warmup_steps)
      progress = ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
      rate = base * 0.5 * (1.0 + ops.cos(math.pi * progress))
    elif self.kind == "step":
      passed = sum(ops.cast(step >= b, "float32") for b in self.boundaries)
      rate = base * ops.power(self.decay_factor, passed)
    else:
      rate = base * ops.ones_like(step)
    if self.warmup_steps > 0:
      warmup = base * (step + 1.0) / self.warmup_steps
      rate = ops.where(step < self.warmup_steps, warmup, rate)
    return rate

  def get_config(self):
    return {"kind": self.kind, "base_learning_rate": self.base_learning_rate,
            "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
            "boundaries": list(self.boundaries),
            "decay_factor": self.decay_factor}


def create_learning_rate(*, kind: str, base_learning_rate: float,
                         total_steps: int, warmup_steps: int = 0,
                         boundaries: Sequence[int] = (),
                         decay_factor: float = 0.1,
                         scale=None) -> LearningRateSchedule:
  """The schedule of the run; `boundaries` default to 50% and 75% of it;
  `scale` is the variable the rate is multiplied by (`create_rate_scale`).

  A schedule even for a constant rate: the optimizer then saves the same
  objects whatever the schedule, so checkpoints match across schedules.
  """
  boundaries = tuple(boundaries) or (total_steps // 2, (3 * total_steps) // 4)
  return LearningRateSchedule(
      kind, base_learning_rate, total_steps=total_steps,
      warmup_steps=warmup_steps, boundaries=boundaries,
      decay_factor=decay_factor, scale=scale)


def create_rate_scale(strategy):
  """The factor of the learning rate that the run changes between loops
  (the plateau rule, Keras callbacks): 1 at first, saved in the checkpoint;
  created under the strategy's scope, a copy on every replica."""
  with strategy.scope():
    return tf.Variable(1.0, dtype=tf.float32, trainable=False,
                       name="lr_scale")


def create_optimizer(name: str, learning_rate, *, momentum: float = 0.9,
                     weight_decay: float = 0.004) -> keras.optimizers.Optimizer:
  """The optimizer `name` (sgd, momentum, adam, adamw) at `learning_rate`."""
  if name == "sgd":
    return keras.optimizers.SGD(learning_rate=learning_rate)
  if name == "momentum":
    return keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum)
  if name == "adam":
    return keras.optimizers.Adam(learning_rate=learning_rate)
  if name == "adamw":
    return keras.optimizers.AdamW(learning_rate=learning_rate,
                                  weight_decay=weight_decay)
  raise ValueError(f"unknown optimizer {name!r}")
