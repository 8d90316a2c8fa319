"""The per-replica step and the compiled multi-step loops that drive it.

Three tiers, kept apart:
  * `_replica_train_step`: one replica's GradientTape step on its slice of a
    global batch (runs inside `strategy.run`); with `jit_compile`, its
    forward and backward pass are compiled by XLA;
  * `_train_loop`: a `tf.function` running `num_steps` global steps with a
    `tf.range` loop over an iterator of global batches; `num_steps` is a
    tensor, so a loop of another length does not retrace;
  * the eager outer loop, which lives in `controller.py`.

The compiled loop reads whole global batches from a plain tf.data iterator and
slices them across replicas itself, instead of going through
`strategy.experimental_distribute_dataset`: on CPU replicas the distributed
iterator's per-step machinery cost more than the step of the reference model
(slicing here gave about 2x the examples/second on one replica and 1.7x on
two). Every worker reads the same global batches, so replica r gets the same
slice whatever the worker topology.
"""

from typing import Optional

import keras
import tensorflow as tf

from dist_train.loop import losses
from dist_train.loop import precision


class Trainer:
  """Owns the model, optimizer and metrics of one run, and its compiled loops.

  The model and optimizer must have been created under `strategy.scope()`;
  the metrics are created under it here. A LossScaleOptimizer (mixed_float16)
  gets a scaled loss and gradients whose overflow every replica sees.

  With `jit_compile`, XLA compiles each replica's forward and backward pass.
  The gradient all-reduce and the optimizer update stay outside the compiled
  cluster: under MirroredStrategy they synchronise replicas through
  `merge_call`, which XLA cannot compile (Keras, for the same reason, turns
  XLA off in `fit` under tf.distribute).
  """

  def __init__(self, *, strategy: tf.distribute.Strategy, model: keras.Model,
               optimizer: keras.optimizers.Optimizer, add_loss_reduction: str,
               clip_norm: Optional[float] = None, jit_compile: bool = False):
    self.strategy = strategy
    self.model = model
    self.optimizer = optimizer
    self._add_loss_reduction = add_loss_reduction
    self._clip_norm = clip_norm
    self._loss_scaling = isinstance(optimizer,
                                    keras.optimizers.LossScaleOptimizer)
    self._gradients_fn = self._replica_gradients
    self._logits_fn = self._eval_logits
    if jit_compile:
      self._gradients_fn = tf.function(self._gradients_fn, jit_compile=True)
      self._logits_fn = tf.function(self._logits_fn, jit_compile=True)
    with strategy.scope():
      self.train_metrics = {
          "loss": keras.metrics.Mean(name="loss"),
          "accuracy": keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
      }
      self.eval_metrics = {
          "loss": keras.metrics.Mean(name="loss"),
          "accuracy": keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
      }
    self._train_loop = tf.function(self._train_loop_fn)
    self._eval_loop = tf.function(self._eval_loop_fn)
    self._train_loop_calls = 0

  # Tier 1: one replica, one step.

  def _replica_gradients(self, features, labels, global_num_examples):
    """Forward and backward pass of one replica; no cross-replica op."""
    with tf.GradientTape() as tape:
      logits, add_losses = losses.call_collecting_add_losses(
          self.model, features, training=True)
      # The loss stays float32 whatever the model computes in.
      logits = tf.cast(logits, tf.float32)
      per_example_loss = keras.losses.sparse_categorical_crossentropy(
          labels, logits, from_logits=True)
      loss = losses.replica_loss(
          per_example_loss=per_example_loss,
          global_num_examples=global_num_examples,
          add_losses=add_losses,
          weight_regularization=losses.regularization_losses(self.model),
          num_replicas=self.strategy.num_replicas_in_sync,
          add_loss_reduction=self._add_loss_reduction)
      total_loss = loss.total  # Inside the tape, so that it is recorded.
      # Multiplied by the loss scale under mixed_float16, else unchanged.
      scaled_loss = self.optimizer.scale_loss(total_loss)
    gradients = tape.gradient(scaled_loss, self.model.trainable_variables)
    return gradients, per_example_loss, logits, losses.pack_terms(loss.terms())

  def _replica_train_step(self, batch, global_num_examples):
    features, labels = batch
    gradients, per_example_loss, logits, terms = self._gradients_fn(
        features, labels, global_num_examples)
    if self._loss_scaling:
      gradients = precision.all_replicas_finite_or_nan(gradients)
    if self._clip_norm is not None:
      gradients = self._clip_summed_gradients(gradients)
    # The optimizer all-reduces (sums) the gradients across replicas; a
    # LossScaleOptimizer first divides them by the loss scale.
    self.optimizer.apply_gradients(
        zip(gradients, self.model.trainable_variables))
    self.train_metrics["loss"].update_state(per_example_loss)
    self.train_metrics["accuracy"].update_state(labels, logits)
    return terms

  def _clip_summed_gradients(self, gradients):
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
      norm /= self.optimizer.dynamic_scale
    scale = self._clip_norm / tf.maximum(norm, self._clip_norm)
    return [None if g is None else g * scale for g in gradients]

  def _eval_logits(self, features):
    return tf.cast(self.model(features, training=False), tf.float32)

  def _replica_eval_step(self, batch):
    features, labels = batch
    logits = self._logits_fn(features)
    per_example_loss = keras.losses.sparse_categorical_crossentropy(
        labels, logits, from_logits=True)
    self.eval_metrics["loss"].update_state(per_example_loss)
    self.eval_metrics["accuracy"].update_state(labels, logits)

  # Tier 2: many global steps in one compiled call.

  def _split_global_batch(self, batch):
    """The per-replica slices of a global batch of n examples.

    Replica r of R gets rows [n * r // R, n * (r + 1) // R): slices differ by
    at most one example, and a replica gets none when n < R.
    """
    num_examples = tf.shape(batch[1])[0]

    def replica_slice(context):
      r, num_replicas = (context.replica_id_in_sync_group,
                         context.num_replicas_in_sync)
      begin = num_examples * r // num_replicas
      end = num_examples * (r + 1) // num_replicas
      return tf.nest.map_structure(lambda t: t[begin:end], batch)

    return self.strategy.experimental_distribute_values_from_function(
        replica_slice)

  def _checked_labels(self, batch):
    """The batch, after checking every label is in [0, classes).

    On CPU the cross-entropy kernel rejects such labels itself; on GPU it
    returns NaN instead, so the check is explicit. It runs on the global
    batch, outside any XLA cluster (XLA compiles no assertion).
    """
    features, labels = batch
    num_classes = self.model.outputs[0].shape[-1] if self.model.outputs else None
    if num_classes is None:
      return batch
    outside = tf.logical_or(labels < 0, labels >= num_classes)
    check = tf.debugging.Assert(
        tf.logical_not(tf.reduce_any(outside)),
        ["label", tf.boolean_mask(labels, outside)[:1],
         f"is outside [0, {num_classes}) ({num_classes} classes)"],
        summarize=1)
    with tf.control_dependencies([check]):
      return features, tf.identity(labels)

  def _train_loop_fn(self, iterator, num_steps):
    """Runs `num_steps` global steps; returns the mean of each loss term."""
    loss_sums = tf.zeros([len(losses.ReplicaLoss.NAMES)])
    for _ in tf.range(num_steps):
      batch = self._checked_labels(next(iterator))
      # The examples actually in this global step, so that a partial last
      # batch is scaled exactly.
      global_num_examples = tf.cast(tf.shape(batch[1])[0], tf.float32)
      per_replica = self.strategy.run(
          self._replica_train_step,
          args=(self._split_global_batch(batch), global_num_examples))
      loss_sums += self.strategy.reduce(tf.distribute.ReduceOp.SUM,
                                        per_replica, axis=None)
    return losses.unpack_terms(loss_sums / tf.cast(num_steps, tf.float32))

  def _eval_loop_fn(self, iterator, num_steps):
    for _ in tf.range(num_steps):
      self.strategy.run(self._replica_eval_step,
                        args=(self._split_global_batch(next(iterator)),))

  # The interface the outer loop uses.

  def train_steps(self, iterator, num_steps: int) -> dict:
    """Runs `num_steps` global steps from `iterator`, an iterator over
    (features, labels) global batches (`iter(dataset)`).

    Returns:
      The mean over those steps of the global-batch loss (`loss`) and of its
      terms (`cross_entropy`, `regularization`, `add_loss`), as floats.
    """
    means = self._train_loop(iterator, tf.constant(num_steps, tf.int32))
    self._train_loop_calls += 1
    return {name: float(value) for name, value in means.items()}

  def eval_steps(self, dataset: tf.data.Dataset, num_steps: int) -> dict:
    """One pass over a dataset of global batches; returns the metric values."""
    for metric in self.eval_metrics.values():
      metric.reset_state()
    self._eval_loop(iter(dataset), tf.constant(num_steps, tf.int32))
    return metric_results(self.eval_metrics)

  @property
  def train_traces(self) -> int:
    """How often the training loop was traced; 0 before its first call."""
    return self._train_loop.experimental_get_tracing_count()

  @property
  def train_loop_calls(self) -> int:
    """How many compiled training loops `train_steps` has run."""
    return self._train_loop_calls

  def learning_rate(self) -> float:
    return float(self.optimizer.learning_rate.numpy())

  def reset_train_metrics(self):
    for metric in self.train_metrics.values():
      metric.reset_state()

  def train_metric_results(self) -> dict:
    return metric_results(self.train_metrics)


def metric_results(metrics: dict) -> dict:
  """Reads metrics in cross-replica context, which aggregates all replicas."""
  return {name: float(metric.result()) for name, metric in metrics.items()}
