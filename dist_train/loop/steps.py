"""The per-replica step and the compiled multi-step loops that drive it.

Three tiers, kept apart:
  * the per-replica step: one replica's GradientTape step on its share of a
    global batch (runs inside `strategy.run`): the task's declarative loss
    (`_default_step`, with `--grad_accum_steps` micro-batches) or the task's
    own `train_step(batch, ctx)`; with `jit_compile`, the forward and
    backward pass of the default step are compiled by XLA;
  * `_train_loop`: a `tf.function` running `num_steps` global steps with a
    `tf.range` loop over an iterator of this worker's step inputs; `num_steps`
    is a tensor, so a loop of another length does not retrace;
  * the eager outer loop, which lives in `controller.py`.

Each step's per-replica shares come from an input (`distribute/inputs.py`):
by default an iterator of whole global batches sliced across the replicas
inside the loop (instead of `strategy.experimental_distribute_dataset`, whose
per-step machinery cost more than the step of the reference model on CPU
replicas); in a run, the `ReplicaInput` of each split, which reads only this
worker's rows. The global example count and weight sums that scale the loss
(`losses.py`) come with the shares, or, for a stream each worker reads its
own shard of, from one all-reduce in the step.
"""

import contextlib
from typing import Optional

import keras
import tensorflow as tf

from dist_train.data import pipelines
from dist_train.distribute import inputs
from dist_train.loop import losses
from dist_train.loop import precision
from dist_train.loop import shares
from dist_train.loop import step_context
from dist_train.tasks import base


split_rows = pipelines.split_rows
unpack_batch = pipelines.unpack_batch


def _weight_for(weights, name):
  """The sample weights of output `name`: a dict by output, or one for all."""
  if weights is None or name is None or not isinstance(weights, dict):
    return weights
  return weights.get(name)


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


def _dense(gradients, variables):
  """Gradients as dense tensors of their variables' static shapes (an
  embedding's IndexedSlices has none): what stands in for an empty share
  is made of zeros of these shapes."""
  return [None if g is None else tf.ensure_shape(tf.convert_to_tensor(g),
                                                 v.shape)
          for g, v in zip(gradients, variables)]


def _float32(structure):
  """Outputs in float32 whatever the model computes in (mixed precision):
  losses and metrics stay float32."""
  return tf.nest.map_structure(
      lambda t: tf.cast(t, tf.float32) if t.dtype.is_floating else t,
      structure)


class _Metrics:
  """A task's metrics and the mean of each loss, for training or validation.

  Created under the strategy's scope; updated in replica context and read in
  cross-replica context, which aggregates all replicas.
  """

  def __init__(self, description: base.TaskDescription, metrics,
               loss_names: dict):
    """Creates the metrics.

    Args:
      description: the task's description (its loss weights).
      metrics: what the task's `metrics()` returned (a list, or a dict of
        lists by output name).
      loss_names: {output name or None: the name of its mean loss}.
    """
    self.loss_means = {name: keras.metrics.Mean(name=name)
                       for name in loss_names.values()}
    self._loss_names = loss_names  # output name or None -> metric name.
    self._description = description
    self.task_metrics = {}  # metric name -> (output name or None, metric)
    if isinstance(metrics, dict):
      for output, output_metrics in metrics.items():
        for metric in output_metrics:
          self.task_metrics[f"{output}_{metric.name}"] = (output, metric)
    else:
      for metric in metrics or []:
        self.task_metrics[metric.name] = (None, metric)
    # Read in one compiled call: the variables are aggregated across
    # replicas on read, which under MultiWorkerMirroredStrategy is a
    # collective per variable when run eagerly.
    self._result_tensors = tf.function(self._results_fn)

  def _results_fn(self):
    return ({name: m.result() for name, m in self.loss_means.items()},
            {name: metric.result()
             for name, (_, metric) in self.task_metrics.items()})

  def update_losses(self, per_element_losses: dict, weights) -> None:
    """Each loss's weighted mean over every element seen: flattened, so that
    every token of a padded batch counts once (Keras' Mean would average
    each example's elements first)."""
    for output, loss in per_element_losses.items():
      weight = _weight_for(weights, output)
      self.loss_means[self._loss_names[output]].update_state(
          tf.reshape(loss, [-1]),
          sample_weight=None if weight is None else tf.reshape(
              tf.cast(weight, loss.dtype), [-1]))

  def update(self, labels, outputs, weights) -> None:
    for output, metric in self.task_metrics.values():
      if output is None:
        metric.update_state(labels, outputs, sample_weight=weights)
      else:
        metric.update_state(labels[output], outputs[output],
                            sample_weight=_weight_for(weights, output))

  def reset(self) -> None:
    for metric in self._all():
      metric.reset_state()

  def _all(self):
    return list(self.loss_means.values()) + [
        m for _, m in self.task_metrics.values()]

  def results(self) -> dict:
    """{name: float}: `loss`, each output's `<output>_loss` when there are
    several, and every task metric."""
    loss_results, metric_results = self._result_tensors()
    results = {name: float(value) for name, value in loss_results.items()}
    if self._loss_names and None not in self._loss_names:
      results[losses.TOTAL] = sum(
          self._description.loss_weight(output) * results[name]
          for output, name in self._loss_names.items())
    for name, result in metric_results.items():
      if isinstance(result, dict):  # A metric of several values.
        results.update({f"{name}_{k}": float(v) for k, v in result.items()})
      else:
        results[name] = float(result)
    return results


class Trainer:
  """Owns the task's model, optimizer and metrics, and its compiled loops.

  The model and optimizer must have been created under `strategy.scope()`;
  the metrics are created under it here. A LossScaleOptimizer (mixed_float16)
  gets a scaled loss and gradients whose overflow every replica sees.

  With `jit_compile`, XLA compiles each replica's forward and backward pass.
  The gradient all-reduce and the optimizer update stay outside the compiled
  cluster: under MirroredStrategy they synchronise replicas through
  `merge_call`, which XLA cannot compile (Keras, for the same reason, turns
  XLA off in `fit` under tf.distribute).
  """

  def __init__(self, *, strategy: tf.distribute.Strategy, task,
               model: keras.Model, optimizer: keras.optimizers.Optimizer,
               add_loss_reduction: str, clip_norm: Optional[float] = None,
               jit_compile: bool = False, grad_accum_steps: int = 1,
               train_input=None, eval_input=None,
               description: Optional[base.TaskDescription] = None):
    """Creates the trainer.

    `add_loss_reduction`, `clip_norm`, `jit_compile` and `grad_accum_steps`
    are the flags of the same names. `train_input` and `eval_input` give the
    loops each step's per-replica shares (`inputs.ReplicaInput`); by default
    (`inputs.GlobalBatches`) the iterators yield whole global batches.
    `description` is the task's, from `tasks.base.check_task`; by default
    the task is checked and described here.
    """
    if grad_accum_steps < 1:
      raise ValueError(
          f"grad_accum_steps must be positive, got {grad_accum_steps}")
    self.strategy = strategy
    self._train_input = train_input or inputs.GlobalBatches(strategy)
    self._eval_input = eval_input or inputs.GlobalBatches(strategy)
    self.task = task
    self.model = model
    self.optimizer = optimizer
    self.add_loss_reduction = add_loss_reduction
    self._clip_norm = clip_norm
    self._grad_accum_steps = grad_accum_steps
    self._loss_scaling = isinstance(optimizer,
                                    keras.optimizers.LossScaleOptimizer)
    self._description = description = (description or base.check_task(
        task, getattr(task, "name", None) or type(task).__name__))
    self._custom_step = description.own_step
    loss_names = {output: (losses.TOTAL if output is None else
                           f"{output}_loss") for output in description.outputs}
    # The data terms the step reports, besides the total and the extra terms.
    self._data_terms = {output: (description.loss_name
                                 if output is None else f"{output}_loss")
                        for output in description.outputs}
    if self._custom_step:
      self.term_names = (losses.TOTAL,) + description.loss_terms
    else:
      self.term_names = ((losses.TOTAL,) + tuple(self._data_terms.values()) +
                         (losses.REGULARIZATION, losses.ADD_LOSS))
    self._gradients_fn = self._micro_gradients
    self._outputs_fn = self._eval_outputs
    if jit_compile:
      self._gradients_fn = tf.function(self._gradients_fn, jit_compile=True)
      self._outputs_fn = tf.function(self._outputs_fn, jit_compile=True)
    with strategy.scope():
      self.train_metrics, self.eval_metrics = (
          _Metrics(description, self._task_metrics(), loss_names)
          for _ in range(2))
    if self._custom_step:
      # A task's own step reports its loss, not per-element losses: the
      # training `loss` is the mean over the epoch's steps. Created outside
      # the strategy's scope: it is updated in cross-replica context with the
      # loss already summed over replicas.
      self._step_loss = keras.metrics.Mean(name=losses.TOTAL)
    # Which share each replica runs, for the message of an error in a step.
    self._share_log = shares.ShareLog(
        strategy=strategy, num_micro_batches=grad_accum_steps,
        first_replica=inputs.replica_layout(strategy).first_replica)
    self._train_loop = tf.function(self._train_loop_fn)
    self._eval_loop = tf.function(self._eval_loop_fn)
    self._train_loop_calls = 0

  def _task_metrics(self):
    """New metric objects from the task's `metrics()`, if it has one."""
    if "metrics" not in self._description.hooks:
      return []
    return self.task.metrics()

  # Tier 1: one replica, one step.

  def _micro_gradients(self, features, labels, weights, global_info,
                       num_shares):
    """Forward and backward pass of one share; no cross-replica op.

    The model's state updates (e.g. BatchNorm's moving statistics) are
    returned as values, in the order of `self._state_variables`, for the
    caller to assign: this may be an XLA function, whose tensors cannot
    leave it any other way.
    """
    num_examples = tf.shape(tf.nest.flatten(labels)[0])[0]
    with tf.GradientTape() as tape, losses.deferred_assignments() as updates:
      outputs, add_losses = losses.call_collecting_add_losses(
          self.model, features, training=True)
      outputs = _float32(outputs)
      per_element = self._description.per_element_losses(labels, outputs)
      terms = {}
      for output, loss in per_element.items():
        weight = _weight_for(weights, output)
        divisor = (_weight_for(global_info["weight_sums"], output)
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
      total = tf.add_n(list(terms.values()))  # Inside the tape: recorded.
      # Multiplied by the loss scale under mixed_float16, else unchanged.
      scaled_loss = self.optimizer.scale_loss(total)
    gradients = tape.gradient(scaled_loss, self.model.trainable_variables)
    terms[losses.TOTAL] = total
    self._state_variables = [variable for variable, _ in updates]
    return (gradients, losses.pack(terms, self.term_names), outputs,
            per_element, [value for _, value in updates])

  def _default_step(self, batch, global_info):
    """The task's declarative objective on this replica's share, in
    `grad_accum_steps` micro-batches, applied once."""
    num_micro = self._grad_accum_steps
    num_shares = self.strategy.num_replicas_in_sync * num_micro
    share_rows = shares.num_rows(batch)
    accumulated, packed_terms = None, None
    for micro in range(num_micro):
      micro_batch = self._share_log.record(
          split_rows(batch, micro, num_micro), step=self._step_number(),
          share_rows=share_rows, micro=micro, after=packed_terms)
      gradients, packed = self._micro_step(micro_batch, global_info,
                                           num_shares)
      accumulated = add_gradients(accumulated, gradients)
      packed_terms = packed if packed_terms is None else packed_terms + packed
    self.apply_gradients(accumulated, self.model.trainable_variables)
    return packed_terms

  def _micro_step(self, micro_batch, global_info, num_shares):
    """(gradients, packed terms) of one micro-batch; an empty one runs no
    forward pass and updates no metric (see shares.py)."""
    features, labels, weights = unpack_batch(micro_batch)

    def compute():
      gradients, packed, outputs, per_element, state = self._gradients_fn(
          features, labels, weights, global_info, num_shares)
      for variable, value in zip(self._state_variables, state):
        losses.assign_or_defer(variable, value)
      self.train_metrics.update_losses(per_element, weights)
      self.train_metrics.update(labels, outputs, weights)
      return _dense(gradients, self.model.trainable_variables), packed

    def empty(like):
      gradients, terms = self._regularization_only(
          like[0], self.model.trainable_variables, num_shares)
      return gradients, losses.pack(
          {**{name: 0.0 for name in self.term_names}, **terms},
          self.term_names)

    return shares.if_rows(shares.num_rows(micro_batch), compute, empty)

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
      scaled = self.optimizer.scale_loss(share)
    gradients = tape.gradient(scaled, variables)
    return ([None if l is None or g is None else tf.convert_to_tensor(g)
             for g, l in zip(gradients, like)],
            {losses.REGULARIZATION: share, losses.TOTAL: share})

  def _step_number(self):
    """The global step being run: the optimizer's steps so far, read after
    the previous step's update."""
    return tf.convert_to_tensor(self.optimizer.iterations)

  def _custom_step_fn(self, batch, global_info):
    """The task's own train_step on this replica's share (see
    step_context.py). With one share per step it runs as written; with
    several, a first pass measures the divisors of `ctx.global_mean` (their
    all-reduce outside any cond), then each non-empty share runs for real
    and the summed gradients are applied once."""
    num_micro = self._grad_accum_steps
    num_shares = self.strategy.num_replicas_in_sync * num_micro

    def context(micro_batch, **kwargs):
      return step_context.StepContext(
          trainer=self, num_micro_batches=num_micro,
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
                else _dense(*ctx.gradients)), packed

      def empty(like):
        # Zeros, but for the share of weight regularization the real step
        # would have added with ctx.regularization().
        gradients, terms = like[0], {}
        if gradients is not None and traced["regularized"]:
          gradients, terms = self._regularization_only(
              gradients, traced["variables"], num_shares)
        elif gradients is not None:
          gradients = [None] * len(gradients)
        terms = {losses.TOTAL: terms.get(losses.TOTAL, 0.0)}
        return gradients, losses.pack(
            {**{name: 0.0 for name in self.term_names}, **terms},
            self.term_names)

      gradients, packed = shares.if_rows(shares.num_rows(micro_batch),
                                         compute, empty)
      packed_terms = packed if packed_terms is None else packed_terms + packed
      if gradients is not None:
        accumulated = add_gradients(accumulated, gradients)
    if accumulated is not None:
      self.apply_gradients(accumulated, traced["variables"])
    return packed_terms

  def _packed(self, terms):
    """A custom step's returned loss (or dict of terms) as one vector."""
    if not isinstance(terms, dict):
      terms = {losses.TOTAL: terms}
    return losses.pack(terms, self.term_names)

  def _replica_train_step(self, batch, global_info):
    if "validate_batch" in self._description.hooks:
      batch = self.task.validate_batch(batch)
    if not self._train_input.divisors_in_batch:
      global_info = losses.all_reduced_divisors(batch)
    step = self._custom_step_fn if self._custom_step else self._default_step
    return step(batch, global_info)

  def gradients(self, tape, loss, variables):
    """The gradients of this share's `loss`, scaled as the optimizer expects."""
    return tape.gradient(self.optimizer.scale_loss(loss), variables)

  def apply_gradients(self, gradients, variables) -> None:
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
      gradients = self._clip_summed_gradients(gradients)
    self.optimizer.apply_gradients(zip(gradients, variables))

  def update_train_metrics(self, labels, outputs, sample_weight=None) -> None:
    self.train_metrics.update(labels, _float32(outputs), sample_weight)

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

  def _eval_outputs(self, features):
    return _float32(self.model(features, training=False))

  def _replica_eval_step(self, batch, global_info):
    """Updates the validation metrics with this replica's share; an empty
    share runs no forward pass and updates nothing."""
    del global_info  # Metrics aggregate over replicas themselves.
    features, labels, weights = unpack_batch(batch)

    def compute():
      outputs = self._outputs_fn(features)
      per_element = self._description.per_element_losses(labels, outputs)
      self.eval_metrics.update_losses(per_element, weights)
      self.eval_metrics.update(labels, outputs, weights)
      return tf.constant(0)

    shares.if_rows(shares.num_rows(batch), compute, shares.zeros_like_spec)

  # Tier 2: many global steps in one compiled call.

  def _train_loop_fn(self, iterator, num_steps):
    """Runs `num_steps` global steps; returns the mean of each loss term."""
    loss_sums = tf.zeros([len(self.term_names)])
    for _ in tf.range(num_steps):
      per_replica = self.strategy.run(
          self._replica_train_step,
          args=self._train_input.next_shares(iterator))
      step_terms = self.strategy.reduce(tf.distribute.ReduceOp.SUM,
                                        per_replica, axis=None)
      if self._custom_step:
        self._step_loss.update_state(step_terms[0])
      loss_sums += step_terms
    return losses.unpack(loss_sums / tf.cast(num_steps, tf.float32),
                         self.term_names)

  def _eval_loop_fn(self, iterator, num_steps):
    for _ in tf.range(num_steps):
      self.strategy.run(self._replica_eval_step,
                        args=self._eval_input.next_shares(iterator))

  # The interface the outer loop uses.

  def train_steps(self, iterator, num_steps: int) -> dict:
    """Runs `num_steps` global steps from `iterator`, an iterator of the
    train input's datasets (by default, over global batches).

    Returns:
      The mean over those steps of the global-batch objective (`loss`) and
      of its terms (the task's data terms, `regularization`, `add_loss`), as
      floats.
    """
    try:
      means = self._train_loop(iterator, tf.constant(num_steps, tf.int32))
    except tf.errors.OpError as e:
      raise self._share_log.describe(e) from e
    self._train_loop_calls += 1
    return {name: float(value) for name, value in means.items()}

  def trace_train_steps(self, iterator, num_steps: int) -> None:
    """Traces the training loop without running a step (a stop request
    during a long first trace can then end the run at once)."""
    self._train_loop.get_concrete_function(
        iterator, tf.constant(num_steps, tf.int32))

  def eval_steps(self, dataset, num_steps: int, *, chunk_steps=None,
                 stop_fn=None, guard=None):
    """One pass over a dataset of the eval input (by default, of global
    batches); returns the metric values.

    With `stop_fn`, the pass runs in compiled calls of `chunk_steps` steps
    and asks `stop_fn()` before each; it returns None when that says stop.
    `guard()`, when given, is a context manager entered around each call
    (the collective watchdog).
    """
    self.eval_metrics.reset()
    iterator = iter(dataset)
    chunk_steps = max(1, chunk_steps or num_steps)
    for begin in range(0, num_steps, chunk_steps):
      if stop_fn is not None and stop_fn():
        return None
      with guard() if guard else contextlib.nullcontext():
        self._eval_loop(iterator, tf.constant(
            min(chunk_steps, num_steps - begin), tf.int32))
    return self.eval_metrics.results()

  @property
  def train_traces(self) -> int:
    """How often the training loop was traced; 0 before its first call."""
    return self._train_loop.experimental_get_tracing_count()

  @property
  def eval_traces(self) -> int:
    """How often the evaluation loop was traced; 0 before its first call."""
    return self._eval_loop.experimental_get_tracing_count()

  @property
  def train_loop_calls(self) -> int:
    """How many compiled training loops `train_steps` has run."""
    return self._train_loop_calls

  def learning_rate(self) -> float:
    return float(self.optimizer.learning_rate.numpy())

  def reset_train_metrics(self):
    self.train_metrics.reset()
    if self._custom_step:
      self._step_loss.reset_state()

  def train_metric_results(self) -> dict:
    results = self.train_metrics.results()
    if self._custom_step:
      results[losses.TOTAL] = float(self._step_loss.result())
    return results

