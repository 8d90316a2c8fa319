"""The global-batch loss-scaling contract, in one place.

Every replica's gradient is *summed* across replicas by the optimizer (an
all-reduce SUM), and with gradient accumulation also across the K
micro-batches of each replica. For N replicas x K micro-batches to make
exactly the update one device makes on the whole global batch, each
(replica, micro-batch) must contribute its share of the single-device
objective, not an objective of its own:

* Per-element losses (a task's loss, unreduced, with optional sample
  weights w): the objective is sum(w * l) / sum(w) over every element of the
  global batch, for each loss, times its loss weight. Each share is its own
  sum(w * l) divided by the *global* weight sum, never by a per-replica or
  per-micro-batch one (that is wrong whenever masks or partial batches make
  the shares unequal). With no weights w = 1, so the divisor is the number
  of loss elements in the global batch. A global batch whose weights sum to
  zero contributes zero, not NaN.
* Weight regularization (a function of the weights only, identical on every
  replica and micro-batch): divided by replicas x micro-batches, so the sum
  counts it once.
* add_loss terms computed from the share's inputs: with `mean` each term is a
  mean over the share's examples (as Keras activity regularizers are), so it
  is weighted by share/global example count; with `sum` each term is a sum
  over the share's examples, so the shares' terms add up unscaled.

The global example count and weight sums come with each step's shares: the
input pipeline computes them from the whole global batch (an in-memory split:
every worker knows the global batch's indices and gathers its weights, a few
floats an example; a stream every worker reads whole) in the order one device
sums them, so the contract costs no collective. Only when each worker reads
its own shard of a stream does no worker see the global batch: then
`all_reduced_divisors` sums the shares' counts and weight sums with one
all-reduce per step.
"""

import contextlib
import threading

import keras
import tensorflow as tf

# The loss terms every step reports, besides the task's own data terms.
REGULARIZATION = "regularization"
ADD_LOSS = "add_loss"
TOTAL = "loss"


def call_collecting_add_losses(model: keras.Model, inputs, *, training: bool):
  """Calls `model` and returns (outputs, the add_loss terms of this call).

  `model.losses` is not replica-safe: replicas share the layer objects, and
  under MirroredStrategy one replica's add_loss values can replace another's.
  A StatelessScope collects the terms of this call only (its state is
  thread-local, and each replica runs in its own thread). State updates made
  inside the scope, such as BatchNorm moving statistics, are held back by it
  and written back here.
  """
  with keras.StatelessScope(collect_losses=True) as scope:
    outputs = model(inputs, training=training)
    add_losses = list(scope.losses)
  for variable in model.non_trainable_variables:
    new_value = scope.get_current_value(variable)
    if new_value is not None:
      assign_or_defer(variable, new_value)
  return outputs, add_losses


_DEFERRED = threading.local()  # Per thread: each replica runs in its own.


@contextlib.contextmanager
def deferred_assignments():
  """Collects the state updates of `call_collecting_add_losses` in the block
  as a list of (variable, new value) instead of assigning them.

  A share's forward pass runs inside a `tf.cond` (shares.py), where a
  mirrored variable cannot be assigned: its assign in replica context is a
  `merge_call`. The values leave the branch and are assigned after it.
  """
  previous = getattr(_DEFERRED, "updates", None)
  _DEFERRED.updates = []
  try:
    yield _DEFERRED.updates
  finally:
    _DEFERRED.updates = previous


def assign_or_defer(variable, value) -> None:
  """Assigns `value`, or records it when `deferred_assignments` is active."""
  updates = getattr(_DEFERRED, "updates", None)
  if updates is None:
    variable.assign(value)
  else:
    updates.append((variable, value))


def regularization_losses(model: keras.Model) -> list:
  """Weight-regularization terms: functions of the weights, not the inputs."""
  return [v.regularizer(v) for v in model.trainable_variables
          if v.regularizer is not None]


def _sum(terms):
  return tf.add_n([tf.cast(t, tf.float32) for t in terms]) if terms else (
      tf.constant(0.0))


def weighted_sum(per_element_loss, sample_weight=None) -> tf.Tensor:
  """sum(w * l) over a share's elements, in float32 (w = 1 when None)."""
  loss = tf.cast(per_element_loss, tf.float32)
  if sample_weight is not None:
    loss *= tf.cast(sample_weight, tf.float32)
  return tf.reduce_sum(loss)


def weight_sum(sample_weight) -> tf.Tensor:
  """sum(w) in float32: the divisor's part from one share (or the global
  batch)."""
  return tf.reduce_sum(tf.cast(sample_weight, tf.float32))


def all_reduced_divisors(share) -> dict:
  """The global batch's {"num_examples", "weight_sums"} from this replica's
  share and everyone else's: one SUM all-reduce of [count, sums...], in
  replica context.

  With examples of variable length, the element count of an unweighted loss
  assumes every share is padded alike, which workers batching their own
  shards do not: give such examples sample weights (a padding mask).
  """
  weights = share[2] if len(share) == 3 else None
  parts = [tf.cast(tf.shape(tf.nest.flatten(share)[0])[0], tf.float32)]
  if weights is not None:
    parts += [weight_sum(w) for w in tf.nest.flatten(weights)]
  summed = tf.unstack(tf.distribute.get_replica_context().all_reduce(
      tf.distribute.ReduceOp.SUM, tf.stack(parts)), num=len(parts))
  divisors = {"num_examples": summed[0]}
  if weights is not None:
    divisors["weight_sums"] = tf.nest.pack_sequence_as(weights, summed[1:])
  return divisors


def element_count(per_element_loss, num_examples) -> tf.Tensor:
  """How many loss elements `num_examples` examples have, from one share's
  per-element loss: its dimensions after the batch are the same in every
  share, since each global batch is padded before it is split."""
  per_example = tf.reduce_prod(tf.shape(per_element_loss)[1:])
  return tf.cast(num_examples, tf.float32) * tf.cast(per_example, tf.float32)


def share_of_mean(per_element_loss, sample_weight, global_divisor):
  """This share's term of the global weighted mean: sum(w * l) / divisor.

  Summed over every share of the global batch this is sum(w * l) / sum(w)
  over the whole batch; zero when the divisor is zero.
  """
  return tf.math.divide_no_nan(
      weighted_sum(per_element_loss, sample_weight), global_divisor)


def regularization_share(model: keras.Model, num_shares: int) -> tf.Tensor:
  """Weight regularization divided by the number of shares (replicas x
  micro-batches), so their sum counts it once."""
  return _sum(regularization_losses(model)) / num_shares


def add_loss_share(add_losses, *, num_examples, global_num_examples,
                   reduction: str) -> tf.Tensor:
  """This share's add_loss terms, by `reduction` (see the module docstring).

  Args:
    add_losses: the terms the share's forward pass produced.
    num_examples: examples in the share.
    global_num_examples: examples in the global batch.
    reduction: "mean" (each term is a mean over the share's examples) or
      "sum" (each term is a sum over them).
  """
  if reduction == "mean":
    return _sum(add_losses) * tf.math.divide_no_nan(
        tf.cast(num_examples, tf.float32),
        tf.cast(global_num_examples, tf.float32))
  if reduction == "sum":
    return _sum(add_losses)
  raise ValueError(f"add_loss_reduction must be mean or sum, got {reduction!r}")


def pack(terms: dict, names) -> tf.Tensor:
  """Named loss terms as one vector, for one all-reduce per step.

  One reduction per step instead of one per term; and
  MultiWorkerMirroredStrategy.reduce fails on a dict of per-replica values
  ("Expected any non-tensor type"). `unpack` names them again.
  """
  return tf.stack([tf.cast(terms[name], tf.float32) for name in names])


def unpack(vector: tf.Tensor, names) -> dict:
  """{name: scalar} of a vector made by `pack` with the same names."""
  return dict(zip(names, tf.unstack(vector, num=len(names))))
