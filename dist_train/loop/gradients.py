"""Gradient application: loss scaling, clipping of the summed gradient, and
the optimizer update, shared by dist_train's step and a task's own step."""

from typing import Optional

import keras
import tensorflow as tf

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
               clip_norm: Optional[float] = None):
    """Creates the applier.

    Args:
      optimizer: created under the strategy's scope.
      clip_norm: the global norm the summed gradient is clipped to (None:
        no clipping; `--clip_norm`).
    """
    self._optimizer = optimizer
    self._clip_norm = clip_norm
    self._loss_scaling = isinstance(optimizer,
                                    keras.optimizers.LossScaleOptimizer)

  def gradients(self, tape: tf.GradientTape, loss, variables):
    """The gradients of this share's `loss`, scaled as the optimizer expects."""
    return tape.gradient(self._optimizer.scale_loss(loss), variables)

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
    if self._loss_scaling:
      gradients = precision.all_replicas_finite_or_nan(gradients)
    if self._clip_norm is not None:
      gradients = self._clip_summed(gradients)
    self._optimizer.apply_gradients(zip(gradients, variables))

  def _clip_summed(self, gradients):
    """Scales this replica's gradients so that their cross-replica sum is
    clipped to `clip_norm` by global norm, as one device would clip it.

    The optimizer sums the replicas' gradients; scaling each replica's
    gradients by the same factor scales the sum by it. The factor needs the
    sum's norm, hence a second all-reduce, paid only when clipping is on.
    Under loss scaling the norm is that of the unscaled gradients.
    """
    summed = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, [g for g in gradients if g is not None])
    norm = tf.linalg.global_norm(summed)
    if self._loss_scaling:
      norm /= self._optimizer.dynamic_scale
    scale = self._clip_norm / tf.maximum(norm, self._clip_norm)
    return [None if g is None else g * scale for g in gradients]
