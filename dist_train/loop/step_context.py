"""What a task's own `train_step(batch, ctx)` may use: the replica's share of
the global objective, gradients applied through the strategy, metrics.

    def train_step(self, batch, ctx):
      features, labels, weights = batch
      with tf.GradientTape() as tape:
        outputs, add_losses = ctx.call(ctx.model, features)
        loss = (ctx.global_mean(my_loss(labels, outputs), weights)
                + ctx.regularization() + ctx.add_loss_share(add_losses))
      ctx.apply_gradients(tape, loss)
      ctx.update_metrics(labels, outputs, weights)
      return {"loss": loss}

`batch` is this replica's share (with gradient accumulation: one
micro-batch of it). `ctx.global_mean` divides by the weight sum of the whole
*global* batch, so the shares add up to the single-device objective however
the batch is split.

On one device with one micro-batch the step runs once, as written. With
several replicas or `--grad_accum_steps=K` (several shares per step) it runs
twice on each share: first to measure the divisors (`ctx.measuring` is True;
`global_mean` returns 0, nothing is applied or counted), then for real, with
the divisors of one all-reduce; the gradients of every share are summed and
applied once, after the last. The all-reduce stays outside the step, so that
a share can be skipped: no collective may sit where only some replicas go.

An empty share (a partial last global batch leaves some replicas or
micro-batches without an example) is never passed to `train_step`. It
contributes zero gradients, zero loss terms and no metric update; only if
the step calls `ctx.regularization()` does the share still add its part of
the weight regularization (a function of the weights, not of the examples)
to the gradient and to `loss`, so that the shares together count it once.
So `train_step` always sees at least one example, and it must make no
collective of its own (use `ctx.global_mean` and `ctx.apply_gradients`).
"""

from typing import Optional

import keras
import tensorflow as tf

from dist_train.loop import losses


class StepContext:
  """One replica's view of one (micro-)step; created by its
  `replica_step.ReplicaStep`."""

  def __init__(self, *, step, num_examples, global_num_examples,
               num_micro_batches: int = 1, divisors: Optional[list] = None,
               measuring: bool = False, defer_apply: bool = False):
    self._step = step
    self.model = step.model  # What the task trains.
    self.optimizer = step.optimizer
    self.num_replicas = step.strategy.num_replicas_in_sync
    self.num_examples = num_examples
    self.global_num_examples = global_num_examples
    self._num_micro_batches = num_micro_batches
    self._divisors = divisors
    self._measuring = measuring
    # Keep the gradients for the replica step to apply (several shares a step).
    self._defer_apply = defer_apply or num_micro_batches > 1
    self.measured = []  # This share's divisor parts, in call order.
    self.gradients = None  # (gradients, variables) when deferred.
    self.used_regularization = False  # Whether the step called regularization.

  @property
  def measuring(self) -> bool:
    """True in the pass that only measures divisors; nothing is applied."""
    return self._measuring

  def call(self, model: keras.Model, inputs, *, training: bool = True):
    """(outputs, add_loss terms) of `model(inputs)`, collected per replica."""
    return losses.call_collecting_add_losses(model, inputs, training=training)

  def global_mean(self, per_element_loss, sample_weight=None) -> tf.Tensor:
    """This share's term of sum(w * l) / sum(w) over the whole global batch.

    Args:
      per_element_loss: the loss of each element of this share, unreduced.
      sample_weight: w, of the loss's shape (e.g. a padding mask); None for 1.
    """
    local = (losses.weight_sum(sample_weight) if sample_weight is not None
             else losses.element_count(per_element_loss, self.num_examples))
    if self._measuring:
      self.measured.append(local)
      return tf.constant(0.0)
    if self._divisors is not None:
      divisor = self._divisors[len(self.measured)]
      self.measured.append(local)
    else:
      divisor = tf.distribute.get_replica_context().all_reduce(
          tf.distribute.ReduceOp.SUM, local)
    return losses.share_of_mean(per_element_loss, sample_weight, divisor)

  def regularization(self) -> tf.Tensor:
    """This share of the model's weight regularization."""
    self.used_regularization = True
    return losses.regularization_share(
        self.model, self.num_replicas * self._num_micro_batches)

  def add_loss_share(self, add_losses) -> tf.Tensor:
    """This share of the add_loss terms, by --add_loss_reduction."""
    return losses.add_loss_share(
        add_losses, num_examples=self.num_examples,
        global_num_examples=self.global_num_examples,
        reduction=self._step.add_loss_reduction)

  def apply_gradients(self, tape: tf.GradientTape, loss,
                      variables=None) -> None:
    """Differentiates `loss` (this share of the objective) and applies the
    gradients, summed over replicas, once per optimizer step (with loss
    scaling, finiteness across replicas and clipping of the summed
    gradient). With several shares a step (replicas or micro-batches) they
    are added up instead and applied after the last."""
    if self._measuring:
      return
    variables = (self.model.trainable_variables if variables is None
                 else variables)
    gradients = self._step.gradients(tape, loss, variables)
    if self._defer_apply:
      self.gradients = (gradients, variables)
    else:
      self._step.apply_gradients(gradients, variables)

  def update_metrics(self, labels, outputs, sample_weight=None) -> None:
    """Updates the task's training metrics with this share."""
    if not self._measuring:
      self._step.update_train_metrics(labels, outputs, sample_weight)
