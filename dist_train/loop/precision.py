"""Mixed precision: the models' dtype policy, and loss scaling for float16.

* `float32`: every layer computes and keeps its variables in float32.
* `mixed_bfloat16`: layers compute in bfloat16 and keep float32 variables.
  bfloat16 has the exponent range of float32, so gradients do not underflow
  and need no loss scaling.
* `mixed_float16`: layers compute in float16 and keep float32 variables.
  Small gradients underflow in float16, so the loss is multiplied by a
  dynamic scale S before differentiation and the gradients are divided by S
  before they are applied (`keras.optimizers.LossScaleOptimizer`); a step
  whose gradients overflow is skipped and S halved.

The output layer and the loss stay float32: the built-in models give their
output layer the float32 policy, and the step casts any model's logits to
float32 before the cross-entropy.

Loss scaling and the global-batch contract (`losses.py`) compose: every
replica multiplies its share of the loss by the same S, and the
LossScaleOptimizer divides each replica's gradients by S before the inner
optimizer sums them across replicas, so the sum is the single-device gradient.
S is a power of two, so scaling and unscaling are exact.

One Keras behaviour needs care. Under MirroredStrategy (whenever it uses
`merge_call`: on CPUs, and on GPUs without XLA), Keras 3.15's
LossScaleOptimizer decides whether a step is finite from the first replica's
*own* gradients, before they are summed: an overflow on another replica is
summed into every weight, which become inf. `all_replicas_finite_or_nan`
makes the overflow of any replica visible to that check.
"""

import contextlib

import keras
import tensorflow as tf

from dist_train import config as config_lib

POLICIES = config_lib.MIXED_PRECISION_POLICIES


@contextlib.contextmanager
def policy_scope(policy: str):
  """Layers created inside use the dtype policy `policy`.

  The global Keras policy is restored on exit; layers keep the policy they
  were created with, so only the model built inside is affected.

  Raises:
    ValueError: `policy` is not one of POLICIES.
  """
  if policy not in POLICIES:
    raise ValueError(
        f"mixed_precision must be one of {'|'.join(POLICIES)}, got {policy!r}")
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy(policy)
  try:
    yield
  finally:
    keras.mixed_precision.set_global_policy(previous)


def needs_loss_scaling(policy: str) -> bool:
  return policy == "mixed_float16"


def wrap_optimizer(optimizer: keras.optimizers.Optimizer,
                   policy: str) -> keras.optimizers.Optimizer:
  """The optimizer to train with under `policy`.

  For mixed_float16, a LossScaleOptimizer with Keras' defaults (initial scale
  2**15, doubled after 2,000 finite steps); call it under the strategy's
  scope, like the optimizer it wraps. Otherwise `optimizer` itself.
  """
  if needs_loss_scaling(policy):
    return keras.optimizers.LossScaleOptimizer(optimizer)
  return optimizer


def all_replicas_finite_or_nan(gradients: list) -> list:
  """Returns the gradients, or all-NaN gradients on every replica if any
  replica's gradients hold an inf or a NaN.

  Call in replica context, before `apply_gradients` of a LossScaleOptimizer:
  then every replica, including the first, whose gradients the optimizer
  checks, sees the overflow, so the step is skipped and the scale halved
  consistently. Costs one scalar all-reduce per step.
  """
  return finite_or_nan_and_overflow(gradients)[0]


def finite_or_nan_and_overflow(gradients: list):
  """(`all_replicas_finite_or_nan(gradients)`, a boolean tensor true when
  the step overflowed on some replica and the optimizer skips it)."""
  present = [g for g in gradients if g is not None]
  local_bad = tf.cast(
      tf.logical_not(tf.reduce_all([tf.reduce_all(tf.math.is_finite(g))
                                    for g in present])), tf.float32)
  any_bad = tf.distribute.get_replica_context().all_reduce(
      tf.distribute.ReduceOp.SUM, local_bad) > 0
  return [None if g is None else
          tf.where(any_bad, tf.constant(float("nan"), g.dtype), g)
          for g in gradients], any_bad
