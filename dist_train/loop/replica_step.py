"""The per-replica step: one replica's GradientTape step on its share of a
global batch, and its evaluation step; runs inside `strategy.run`.

Training runs the task's declarative loss (`_default_step`, with
`--grad_accum_steps` micro-batches) or the task's own `train_step(batch,
ctx)` (see step_context.py); both apply their summed gradients once, through
the same `gradients.GradientApplier`. With `jit_compile`, XLA compiles each
replica's forward and backward pass. The gradient all-reduce and the
optimizer update stay outside the compiled cluster: under MirroredStrategy
they synchronise replicas through `merge_call`, which XLA cannot compile
(Keras, for the same reason, turns XLA off in `fit` under tf.distribute).
"""

import keras
import tensorflow as tf

from dist_train.data import pipelines
from dist_train.loop import gradients as gradients_lib
from dist_train.loop import losses
from dist_train.loop import metrics as metrics_lib
from dist_train.loop import shares
from dist_train.loop import step_context
from dist_train.loop import sync_batchnorm
from dist_train.tasks import base

split_rows = pipelines.split_rows
unpack_batch = pipelines.unpack_batch


class _SynchronisingMicroStep(Exception):
  """A micro-step assigns a mirrored variable (see `_micro_loop`)."""


class ReplicaStep:
  """One replica's training and evaluation step.

  Attributes:
    term_names: the loss terms a training step returns, packed in this
      order: `loss` first, then the task's data terms, `regularization` and
      `add_loss` (or, for a task's own step, its `loss_terms`).
  """

  def __init__(self, *, strategy: tf.distribute.Strategy, task,
               description: base.TaskDescription, model: keras.Model,
               optimizer: keras.optimizers.Optimizer,
               applier: gradients_lib.GradientApplier,
               train_metrics: metrics_lib.TaskMetrics,
               eval_metrics: metrics_lib.TaskMetrics,
               share_log: shares.ShareLog, add_loss_reduction: str,
               grad_accum_steps: int, jit_compile: bool,
               divisors_in_batch: bool, synchronized_layers=()):
    """Creates the step; the arguments are the Trainer's (steps.py).

    `synchronized_layers`: the BatchNormalization layers that normalise with
    the global batch's moments (sync_batchnorm.py); with any, the training
    forward pass runs as `_synchronized_micro_step`.
    """
    self.strategy = strategy
    self.task = task
    self.model = model
    self.optimizer = optimizer
    self.add_loss_reduction = add_loss_reduction
    self._description = description
    self._applier = applier
    self._train_metrics = train_metrics
    self._eval_metrics = eval_metrics
    self._share_log = share_log
    self._grad_accum_steps = grad_accum_steps
    self._divisors_in_batch = divisors_in_batch
    self._synchronized_state = (
        sync_batchnorm.state_ids(synchronized_layers)
        if synchronized_layers else None)
    # The data terms the step reports, besides the total and the extra terms.
    self._data_terms = {output: (description.loss_name
                                 if output is None else f"{output}_loss")
                        for output in description.outputs}
    if description.own_step:
      self.term_names = (losses.TOTAL,) + description.loss_terms
    else:
      self.term_names = ((losses.TOTAL,) + tuple(self._data_terms.values()) +
                         (losses.REGULARIZATION, losses.ADD_LOSS))
    self._gradients_fn = self._forward_backward
    # Micro-batches run as one loop until a trace finds a synchronisation
    # point in them (see `_micro_loop`); synchronized BatchNormalization has
    # one by design.
    self._micro_loop_possible = self._synchronized_state is None
    self._outputs_fn = self._eval_outputs
    if jit_compile and self._synchronized_state is None:
      self._gradients_fn = tf.function(self._gradients_fn, jit_compile=True)
    if jit_compile:
      self._outputs_fn = tf.function(self._outputs_fn, jit_compile=True)

  # What a task's own step uses through its StepContext.

  def gradients(self, tape, loss, variables):
    """The gradients of this share's `loss`, scaled as the optimizer expects."""
    return self._applier.gradients(tape, loss, variables)

  def apply_gradients(self, gradients, variables) -> None:
    """Applies this replica's gradients (see GradientApplier.apply)."""
    self._applier.apply(gradients, variables)

  def update_train_metrics(self, labels, outputs, sample_weight=None) -> None:
    self._train_metrics.update(labels, metrics_lib.float32(outputs),
                               sample_weight)

  # The steps.

  def train(self, batch, global_info):
    """One training step on this replica's share; returns its loss terms
    packed in `term_names` order."""
    if "validate_batch" in self._description.hooks:
      batch = self.task.validate_batch(batch)
    self._applier.step_started(batch)
    if not self._divisors_in_batch:
      global_info = losses.all_reduced_divisors(batch)
    if self._description.own_step:
      return self._own_step(batch, global_info)
    return self._default_step(batch, global_info)

  def evaluate(self, batch, global_info) -> None:
    """Updates the validation metrics with this replica's share; an empty
    share runs no forward pass and updates nothing."""
    del global_info  # Metrics aggregate over replicas themselves.
    features, labels, weights = unpack_batch(batch)

    def compute():
      outputs = self._outputs_fn(features)
      per_element = self._description.per_element_losses(labels, outputs)
      self._eval_metrics.update_losses(per_element, weights)
      self._eval_metrics.update(labels, outputs, weights)
      return tf.constant(0)

    shares.if_rows(shares.num_rows(batch), compute, shares.zeros_like_spec)

  def _eval_outputs(self, features):
    return metrics_lib.float32(self.model(features, training=False))

  def _forward_backward(self, features, labels, weights, global_info,
                        num_shares, present=None):
    """Forward and backward pass of one share; no cross-replica op (but
    those of synchronized BatchNormalization, see sync_batchnorm.py).

    The model's state updates (e.g. BatchNorm's moving statistics) are
    returned as values, in the order of `self._state_variables`, for the
    caller to assign: this may be an XLA function, whose tensors cannot
    leave it any other way.

    `present` (a boolean; None: true) keeps the share's data and add_loss
    terms: false for an empty share's stand-in row, whose terms are then
    zero but its part of the weight regularization.
    """
    num_examples = tf.shape(tf.nest.flatten(labels)[0])[0]
    with tf.GradientTape() as tape, losses.deferred_assignments() as updates:
      outputs, add_losses = losses.call_collecting_add_losses(
          self.model, features, training=True)
      outputs = metrics_lib.float32(outputs)
      per_element = self._description.per_element_losses(labels, outputs)
      terms = {}
      for output, loss in per_element.items():
        weight = metrics_lib.weight_for(weights, output)
        divisor = (metrics_lib.weight_for(global_info["weight_sums"], output)
                   if weight is not None else losses.element_count(
                       loss, global_info["num_examples"]))
        terms[self._data_terms[output]] = (
            self._description.loss_weight(output) *
            losses.share_of_mean(loss, weight, divisor))
      terms[losses.REGULARIZATION] = losses.regularization_share(
          self.model, num_shares)
      terms[losses.ADD_LOSS] = losses.add_loss_share(
          add_losses, num_examples=num_examples,
          global_num_examples=global_info["num_examples"],
          reduction=self.add_loss_reduction)
      if present is not None:  # Selected: a stand-in row's loss may be NaN.
        for name in (*self._data_terms.values(), losses.ADD_LOSS):
          terms[name] = tf.where(present, terms[name],
                                 tf.zeros_like(terms[name]))
      total = tf.add_n(list(terms.values()))  # Inside the tape: recorded.
    gradients = self._applier.gradients(tape, total,
                                        self.model.trainable_variables)
    terms[losses.TOTAL] = total
    self._state_variables = [variable for variable, _ in updates]
    return (gradients, losses.pack(terms, self.term_names), outputs,
            per_element, [value for _, value in updates])

  def _default_step(self, batch, global_info):
    """The task's declarative objective on this replica's share, in
    `grad_accum_steps` micro-batches, applied once."""
    num_shares = self.strategy.num_replicas_in_sync * self._grad_accum_steps
    share_rows = shares.num_rows(batch)

    def micro_batch_step(micro, after):
      """(gradients, packed terms) of micro-batch `micro` (an int or a
      tensor), recorded in the share log after `after`."""
      micro_batch = self._share_log.record(
          split_rows(batch, micro, self._grad_accum_steps),
          step=self._step_number(), share_rows=share_rows, micro=micro,
          after=after)
      return self._micro_step(micro_batch, global_info, num_shares)

    summed = None
    if self._grad_accum_steps > 1 and self._micro_loop_possible:
      summed = self._micro_loop(micro_batch_step)
    if summed is None:  # Unrolled: one micro-batch after another.
      summed = None, None
      for micro in range(self._grad_accum_steps):
        summed = self._add_micro_batch(
            summed, micro_batch_step(micro, after=summed[1]))
    accumulated, packed_terms = summed
    self._applier.apply(accumulated, self.model.trainable_variables)
    return packed_terms

  @staticmethod
  def _add_micro_batch(summed, result):
    """(gradients, packed terms) summed so far (None before the first),
    plus one micro-batch's `result`."""
    accumulated, packed_terms = summed
    gradients, packed = result
    return (gradients_lib.add_gradients(accumulated, gradients),
            packed if packed_terms is None else packed_terms + packed)

  def _micro_loop(self, micro_batch_step):
    """The micro-batches of `_default_step` as one `tf.while_loop` over
    `micro_batch_step(micro, after)`: the forward and backward pass is
    traced once per replica, not once per micro-batch (the trace, and the
    graph, no longer grow with --grad_accum_steps). The sums are the
    unrolled loop's, added in the same order, from zeros.

    Returns:
      (summed gradients, None where a variable has none; summed packed
      terms), or None when the micro-step holds a synchronisation point and
      the caller must unroll: a model's state update (BatchNorm's moving
      statistics, a seed generator) assigns a mirrored variable, a
      `merge_call`, which cannot run inside a loop one replica builds alone.
      The answer is kept: later traces unroll at once.
    """
    num_micro = self._grad_accum_steps
    present = {}

    def body(micro, accumulated, packed_terms):
      with losses.deferred_assignments() as updates:
        result = micro_batch_step(micro, after=packed_terms)
      if updates:
        raise _SynchronisingMicroStep()
      present["gradients"] = [g is not None for g in result[0]]
      return (micro + 1, *self._add_micro_batch((accumulated, packed_terms),
                                                result))

    try:
      _, accumulated, packed_terms = tf.while_loop(
          lambda micro, *_: micro < num_micro, body,
          (tf.constant(0),
           [tf.zeros(v.shape, v.dtype) for v in self.model.trainable_variables],
           tf.zeros([len(self.term_names)])),
          maximum_iterations=num_micro)
    except _SynchronisingMicroStep:
      self._micro_loop_possible = False
      return None
    return ([a if p else None
             for a, p in zip(accumulated, present["gradients"])],
            packed_terms)

  def _micro_step(self, micro_batch, global_info, num_shares):
    """(gradients, packed terms) of one micro-batch; an empty one runs no
    forward pass and updates no metric (see shares.py)."""
    if self._synchronized_state is not None:
      return self._synchronized_micro_step(micro_batch, global_info,
                                           num_shares)
    features, labels, weights = unpack_batch(micro_batch)

    def compute():
      gradients, packed, outputs, per_element, state = self._gradients_fn(
          features, labels, weights, global_info, num_shares)
      for variable, value in zip(self._state_variables, state):
        losses.assign_or_defer(variable, value)
      self._train_metrics.update_losses(per_element, weights)
      self._train_metrics.update(labels, outputs, weights)
      return (gradients_lib.dense(gradients, self.model.trainable_variables),
              packed)

    def empty(like):
      gradients, terms = self._regularization_only(
          like[0], self.model.trainable_variables, num_shares)
      return gradients, self._zero_terms(terms)

    return shares.if_rows(shares.num_rows(micro_batch), compute, empty)

  def _synchronized_micro_step(self, micro_batch, global_info, num_shares):
    """`_micro_step` with synchronized BatchNormalization.

    Its layers all-reduce their moments in the forward pass, a collective
    every replica must enter, in the same order, whatever its share holds:
    so the pass runs outside any cond, and an empty share runs on a stand-in
    row that weighs nothing (in the moments, the loss and the metrics). Its
    gradient is replaced by the empty share's own, its part of the weight
    regularization (the row's may be NaN: a masked layer of zeros).
    """
    rows = shares.num_rows(micro_batch)
    features, labels, weights = unpack_batch(
        sync_batchnorm.pad_empty(micro_batch))
    with sync_batchnorm.global_rows(rows):
      gradients, packed, outputs, per_element, state = self._gradients_fn(
          features, labels, weights, global_info, num_shares,
          present=rows > 0)
    variables = self.model.trainable_variables
    gradients = gradients_lib.dense(gradients, variables)
    stand_in, _ = self._regularization_only(gradients, variables, num_shares)
    gradients = [g if g is None else tf.where(
        rows > 0, g, tf.zeros_like(g) if s is None else s)
                 for g, s in zip(gradients, stand_in)]
    for variable, value in zip(self._state_variables, state):
      losses.assign_or_defer(variable, sync_batchnorm.state_after(
          variable, value, rows, self._synchronized_state))

    def update_metrics():
      self._train_metrics.update_losses(per_element, weights)
      self._train_metrics.update(labels, outputs, weights)
      return tf.constant(0)

    shares.if_rows(rows, update_metrics, shares.zeros_like_spec)
    return gradients, packed

  def _zero_terms(self, terms):
    """`terms` packed, with zero for every other term."""
    return losses.pack({**{name: 0.0 for name in self.term_names}, **terms},
                       self.term_names)

  def _regularization_only(self, like, variables, num_shares):
    """An empty share's stand-in: the gradient of its part of the weight
    regularization (a function of the weights, not of examples, so every
    share still contributes 1 / num_shares of it) and zero elsewhere, and
    {regularization, loss: that part}.

    Args:
      like: the real step's gradients (None where it has none).
      variables: the variables they are the gradients of.
      num_shares: replicas x micro-batches.
    """
    if not losses.regularization_losses(self.model):
      return [None] * len(like), {}
    with tf.GradientTape() as tape:
      share = losses.regularization_share(self.model, num_shares)
    gradients = self._applier.gradients(tape, share, variables)
    return ([None if l is None or g is None else tf.convert_to_tensor(g)
             for g, l in zip(gradients, like)],
            {losses.REGULARIZATION: share, losses.TOTAL: share})

  def _step_number(self):
    """The global step being run: the optimizer's steps so far, read after
    the previous step's update."""
    return tf.convert_to_tensor(self.optimizer.iterations)

  def _own_step(self, batch, global_info):
    """The task's own train_step on this replica's share (see
    step_context.py). With one share per step it runs as written; with
    several, a first pass measures the divisors of `ctx.global_mean` (their
    all-reduce outside any cond), then each non-empty share runs for real
    and the summed gradients are applied once."""
    num_micro = self._grad_accum_steps
    num_shares = self.strategy.num_replicas_in_sync * num_micro

    def context(micro_batch, **kwargs):
      return step_context.StepContext(
          step=self, num_micro_batches=num_micro,
          num_examples=shares.num_rows(micro_batch),
          global_num_examples=global_info["num_examples"], **kwargs)

    share_rows = shares.num_rows(batch)
    if num_shares == 1:  # One device, one share: never empty.
      batch = self._share_log.record(batch, step=self._step_number(),
                                     share_rows=share_rows, micro=0)
      return self._packed(self.task.train_step(batch, context(batch)))

    micro_batches = [split_rows(batch, m, num_micro) for m in range(num_micro)]

    def recorded(micro, after):
      return self._share_log.record(
          micro_batches[micro], step=self._step_number(),
          share_rows=share_rows, micro=micro, after=after)

    parts = None
    for m in range(num_micro):
      micro_batch = recorded(m, after=parts)

      def measure(micro_batch=micro_batch):
        ctx = context(micro_batch, measuring=True)
        self.task.train_step(micro_batch, ctx)
        return tf.stack(ctx.measured) if ctx.measured else tf.zeros([0])

      measured = shares.if_rows(shares.num_rows(micro_batch), measure,
                                shares.zeros_like_spec)
      parts = measured if parts is None else parts + measured
    divisors = None
    if parts.shape[0]:
      divisors = tf.unstack(tf.distribute.get_replica_context().all_reduce(
          tf.distribute.ReduceOp.SUM, parts), num=parts.shape[0])
    accumulated, packed_terms, traced = None, None, {}
    for m in range(num_micro):
      micro_batch = recorded(m, after=parts if m == 0 else packed_terms)

      def compute(micro_batch=micro_batch):
        ctx = context(micro_batch, divisors=divisors, defer_apply=True)
        packed = self._packed(self.task.train_step(micro_batch, ctx))
        traced["regularized"] = ctx.used_regularization
        traced["variables"] = (None if ctx.gradients is None
                               else ctx.gradients[1])
        return (None if ctx.gradients is None
                else gradients_lib.dense(*ctx.gradients)), packed

      def empty(like):
        # Zeros, but for the share of weight regularization the real step
        # would have added with ctx.regularization().
        gradients, terms = like[0], {}
        if gradients is not None and traced["regularized"]:
          gradients, terms = self._regularization_only(
              gradients, traced["variables"], num_shares)
        elif gradients is not None:
          gradients = [None] * len(gradients)
        return gradients, self._zero_terms(
            {losses.TOTAL: terms.get(losses.TOTAL, 0.0)})

      gradients, packed = shares.if_rows(shares.num_rows(micro_batch),
                                         compute, empty)
      packed_terms = packed if packed_terms is None else packed_terms + packed
      if gradients is not None:
        accumulated = gradients_lib.add_gradients(accumulated, gradients)
    if accumulated is not None:
      self._applier.apply(accumulated, traced["variables"])
    return packed_terms

  def _packed(self, terms):
    """A custom step's returned loss (or dict of terms) as one vector."""
    if not isinstance(terms, dict):
      terms = {losses.TOTAL: terms}
    return losses.pack(terms, self.term_names)
