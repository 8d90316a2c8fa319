"""The global-batch loss-scaling contract, in one place.

Every replica's gradient is *summed* across replicas by the optimizer (an
all-reduce SUM). For N replicas to make exactly the update one device makes on
the same global batch, each replica must therefore contribute its share of the
single-device loss, not a loss of its own:

* Per-example losses: sum over the replica's examples, divided by the number of
  examples actually in this global step (not per_replica_batch * N, which is
  wrong for a partial last batch). Summed over replicas this is the global
  mean.
* Weight regularization (a function of the weights only, identical on every
  replica): divided by the number of replicas, so the sum counts it once.
* add_loss terms computed from the replica's inputs: with `mean` each term is a
  mean over the replica's examples (as Keras activity regularizers are), so it
  is weighted by local/global example count; with `sum` each term is a sum over
  the replica's examples, so the replicas' terms add up unscaled.
"""

import dataclasses

import keras
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class ReplicaLoss:
  """One replica's share of each term of the single-device loss."""

  cross_entropy: tf.Tensor
  regularization: tf.Tensor
  add_loss: tf.Tensor

  # The names of `terms()`, in the order the loop reports them.
  NAMES = ("loss", "cross_entropy", "regularization", "add_loss")

  @property
  def total(self) -> tf.Tensor:
    return self.cross_entropy + self.regularization + self.add_loss

  def terms(self) -> dict:
    """{name: tensor} of the total (`loss`) and each term."""
    return {"loss": self.total, "cross_entropy": self.cross_entropy,
            "regularization": self.regularization, "add_loss": self.add_loss}


def pack_terms(terms: dict) -> tf.Tensor:
  """The terms of `ReplicaLoss.terms()` as one vector, for one all-reduce.

  One reduction per step instead of one per term; and
  MultiWorkerMirroredStrategy.reduce fails on a dict of per-replica values
  ("Expected any non-tensor type"). `unpack_terms` names them again.
  """
  return tf.stack([terms[name] for name in ReplicaLoss.NAMES])


def unpack_terms(vector: tf.Tensor) -> dict:
  """{name: scalar} of a vector made by `pack_terms`."""
  return dict(zip(ReplicaLoss.NAMES, tf.unstack(vector)))


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
      variable.assign(new_value)
  return outputs, add_losses


def regularization_losses(model: keras.Model) -> list:
  """Weight-regularization terms: functions of the weights, not the inputs."""
  return [v.regularizer(v) for v in model.trainable_variables
          if v.regularizer is not None]


def _sum(terms):
  return tf.add_n([tf.cast(t, tf.float32) for t in terms]) if terms else (
      tf.constant(0.0))


def replica_loss(*, per_example_loss: tf.Tensor, global_num_examples: tf.Tensor,
                 add_losses, weight_regularization, num_replicas: int,
                 add_loss_reduction: str) -> ReplicaLoss:
  """Scales one replica's loss terms so that summing over replicas gives the
  loss one device computes on the whole global batch.

  Args:
    per_example_loss: [local_batch] loss of each of this replica's examples.
    global_num_examples: examples in this global step, over all replicas.
    add_losses: add_loss terms this replica's forward pass produced.
    weight_regularization: weight-regularization terms (same on all replicas).
    num_replicas: replicas in sync.
    add_loss_reduction: "mean" or "sum", see the module docstring.

  Returns:
    The replica's scaled terms; their `total` is what the replica
    differentiates.
  """
  global_n = tf.cast(global_num_examples, tf.float32)
  local_n = tf.cast(tf.shape(per_example_loss)[0], tf.float32)
  cross_entropy = tf.reduce_sum(tf.cast(per_example_loss, tf.float32)) / global_n
  regularization = _sum(weight_regularization) / num_replicas
  if add_loss_reduction == "mean":
    add_loss = _sum(add_losses) * (local_n / global_n)
  elif add_loss_reduction == "sum":
    add_loss = _sum(add_losses)
  else:
    raise ValueError(
        f"add_loss_reduction must be mean or sum, got {add_loss_reduction!r}")
  return ReplicaLoss(cross_entropy, regularization, add_loss)
