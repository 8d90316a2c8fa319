"""Gradient application: loss scaling, clipping of the summed gradient, and
the optimizer update, shared by dist_train's step and a task's own step."""

from typing import Optional

import keras
import tensorflow as tf

from dist_train.loop import health as health_lib
from dist_train.loop import precision


def add_gradients(accumulated, gradients):
  """accumulated + gradients, elementwise over variables (None when there is
  no gradient); sparse gradients (embeddings) are added as dense ones."""
  if accumulated is None:
    return list(gradients)
  def add(a, g):
    if a is None or g is None:
      return a if g is None else g
    if isinstance(a, tf.IndexedSlices) or isinstance(g, tf.IndexedSlices):
      return tf.convert_to_tensor(a) + tf.convert_to_tensor(g)
    return a + g
  return [add(a, g) for a, g in zip(accumulated, gradients)]


def dense(gradients, variables):
  """Gradients as dense tensors of their variables' static shapes (an
  embedding's IndexedSlices has none): what stands in for an empty share
  is made of zeros of these shapes."""
  return [None if g is None else tf.ensure_shape(tf.convert_to_tensor(g),
                                                 v.shape)
          for g, v in zip(gradients, variables)]


class GradientApplier:
  """Turns one replica's loss into gradients and applies them, once per
  optimizer step, as one device would apply the sum over replicas.

  A LossScaleOptimizer (mixed_float16) gets a scaled loss and gradients
  whose overflow every replica sees.
  """

  def __init__(self, *, optimizer: keras.optimizers.Optimizer,
               clip_norm: Optional[float] = None,
               health: Optional[health_lib.StepHealth] = None):
    """Creates the applier.

    Args:
      optimizer: created under the strategy's scope.
      clip_norm: the global norm the summed gradient is clipped to (None:
        no clipping; `--clip_norm`).
      health: where the step's health is recorded (None: nothing is).
    """
    self._optimizer = optimizer
    self._clip_norm = clip_norm
    self._health = health
    self._loss_scaling = isinstance(optimizer,
                                    keras.optimizers.LossScaleOptimizer)
    if health is not None and clip_norm is None:
      health.observe(optimizer)  # The norm of the sum the optimizer makes.

  def step_started(self, batch) -> None:
    """Marks the start of this replica's step, its share in hand (the
    compute time of `health.StepHealth`)."""
    if self._health is not None:
      self._health.step_started(batch)

  def gradients(self, tape: tf.GradientTape, loss, variables):
    """The gradients of this share's `loss`, scaled as the optimizer expects
    (the loss scale under mixed_float16): every step's, dist_train's and a
    task's own.

    Called after the `with tape:` block, where a product `scale * loss`
    would not be recorded (every gradient None). The scale seeds the
    backward pass instead (`output_gradients`): the gradients of
    `scale * loss` exactly, since the multiplication's gradient with respect
    to `loss` is the scale itself, and the backward pass still runs scaled
    (no float16 underflow).
    """
    loss = tf.convert_to_tensor(loss)
    seed = self._optimizer.scale_loss(tf.ones_like(loss))
    return tape.gradient(loss, variables,
                         output_gradients=tf.cast(seed, loss.dtype))

  def apply(self, gradients, variables) -> None:
    """Applies one replica's gradients; the optimizer sums them over
    replicas (a LossScaleOptimizer first divides them by the loss scale).

    Sparse gradients (an embedding's IndexedSlices) are summed as dense
    ones: TensorFlow all-gathers IndexedSlices across replicas, and a
    collective inside the compiled loop must keep its shape from one step
    to the next, which rows looked up by data of varying lengths (or a
    partial last batch) do not ("Shape mismatch in the collective
    instance").
    """
    gradients = [None if g is None else tf.convert_to_tensor(g)
                 for g in gradients]
    health = self._health
    if health is not None:
      health.gradients_computed(gradients)
    overflow = None
    if self._loss_scaling:
      gradients, overflow = precision.finite_or_nan_and_overflow(gradients)
    summed = norm = None
    if self._clip_norm is not None:
      summed, norm = self._summed_and_norm(gradients)
    if health is not None:
      health.record(norm=norm, clip_norm=self._clip_norm, overflow=overflow,
                    summed=summed)
    if self._clip_norm is not None:
      gradients = self._clipped(gradients, norm)
    self._optimizer.apply_gradients(zip(gradients, variables))

  def _summed_and_norm(self, gradients):
    """The cross-replica sum of the gradients (None where there is none)
    and its global norm, unscaled under loss scaling: one all-reduce, paid
    at every step only when clipping needs the norm."""
    present = [g for g in gradients if g is not None]
    reduced = iter(tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, present))
    summed = [None if g is None else next(reduced) for g in gradients]
    norm = tf.linalg.global_norm([g for g in summed if g is not None])
    if self._loss_scaling:
      scale = self._optimizer.dynamic_scale
      norm /= scale
      if self._health is not None and self._health.keeps_gradients:
        summed = [None if g is None else g / tf.cast(scale, g.dtype)
                  for g in summed]
    return summed, norm

  def _clipped(self, gradients, norm):
    """Scales this replica's gradients so that their cross-replica sum is
    clipped to `clip_norm` by global norm, as one device would clip it.

    The optimizer sums the replicas' gradients; scaling each replica's
    gradients by the same factor scales the sum by it. The factor needs the
    sum's norm (`norm`), hence a second all-reduce, paid only when clipping
    is on. Under loss scaling the norm is that of the unscaled gradients.
    """
    scale = self._clip_norm / tf.maximum(norm, self._clip_norm)
    return [None if g is None else g * scale for g in gradients]
