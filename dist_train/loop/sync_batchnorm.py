"""Synchronized BatchNormalization: the moments of the whole global batch.

A BatchNormalization layer in training normalises with the mean and variance
of its batch. On N replicas each replica sees only its share, so by default
each normalises with its share's moments: not what one device computes on
the global batch. With `--sync_batchnorm` every BatchNormalization layer of
the model normalises with the moments of the whole global batch (all
replicas, all workers) and updates its moving statistics with them, once per
step: exactly the one-device update.

How the moments are combined, and why not Keras' own `synchronized=True`:

* Each replica all-reduces (sum of x, example count) per channel, then the
  sum of squared deviations from the global mean: two passes, as
  `tf.nn.moments` computes on one device (mean, then mean of squares about
  it), not E[x^2] - E[x]^2, which loses digits when the mean is large. The
  sums are combined by example count, so uneven shares and a partial last
  batch are exact. Gradients flow through the all-reduces (their gradient
  is the all-reduce of the upstream gradients), so each replica's gradient
  includes what its examples did to every other replica's normalisation.
* Keras' `BatchNormalization(synchronized=True)` (checked on Keras 3.15)
  also weighs by count, but its all-reduce runs wherever the layer is
  called. Here a share's forward pass runs inside a `tf.cond` (empty shares
  run no model, see shares.py) and may be XLA-compiled; under
  MirroredStrategy on CPU an all-reduce is a `merge_call`, which can run
  in neither. It also ignores `synchronized` when the layer gets a Keras
  mask (its masked moments are the replica's own), and counts every row,
  so a stand-in row for an empty share would count.
* So the synchronized step runs its forward pass outside any cond and not
  under XLA; an empty share runs on one row of zeros that weighs nothing:
  it adds 0 to the sums and the count, 0 to the loss, and it still enters
  every collective, in the same order as the other replicas.

The model is not rebuilt: each BatchNormalization layer's moments function
is replaced on the instance (`compat.replace_batch_norm_moments`) before the
training step is traced. Outside the synchronized step (a task's own
`train_step`, a one-device call, a check on one batch) the layer computes
its own moments as before.

With `--grad_accum_steps` K > 1 the micro-batches of a step run one after
another, so no layer can see the global batch at once: the moments are
those of each micro-batch over all replicas (a "ghost batch" of about
global_batch_size / K) and the moving statistics update K times a step.
"""

import contextlib
import threading

import keras
import tensorflow as tf
from absl import logging

from dist_train import compat

_ROWS = threading.local()  # Per thread: each replica traces in its own.


def batch_norm_layers(model: keras.Model) -> list:
  """Every BatchNormalization layer of `model`, nested ones included."""
  return [layer for layer in compat.sublayers(model)
          if isinstance(layer, keras.layers.BatchNormalization)]


def resolve(*, requested, model: keras.Model, num_replicas: int,
            grad_accum_steps: int, own_step: bool, jit_compile: bool,
            log: bool = True) -> list:
  """Decides whether BatchNormalization is synchronized, and says why not
  or with what limits, in one warning line each.

  Args:
    requested: --sync_batchnorm: None (on when the model has
      BatchNormalization and there are several replicas), True or False.
    model: the task's model.
    num_replicas: replicas in sync, over all workers.
    grad_accum_steps: micro-batches per replica and step.
    own_step: whether the task has its own train_step.
    jit_compile: whether the default step is XLA-compiled.
    log: whether this process writes the warnings (the chief).

  Returns:
    The layers to synchronize (empty: none).
  """
  warn = logging.warning if log else lambda *args: None
  layers = batch_norm_layers(model)
  if requested and not layers:
    warn("--sync_batchnorm: the model has no BatchNormalization layer; "
         "there is nothing to synchronize")
  if requested is False or not layers or num_replicas < 2:
    return []
  if own_step:
    warn("--sync_batchnorm: a task's own train_step runs its forward pass "
         "per share, so its %d BatchNormalization layer(s) keep each "
         "replica's statistics", len(layers))
    return []
  if grad_accum_steps > 1:
    warn("--sync_batchnorm with --grad_accum_steps=%d: BatchNormalization "
         "normalises with each micro-batch's statistics over all replicas "
         "(ghost batch norm), not the whole global batch's", grad_accum_steps)
  if jit_compile:
    warn("--sync_batchnorm: the forward pass runs without XLA "
         "(--jit_compile), since its all-reduces cannot be compiled")
  return layers


def synchronize(layers) -> None:
  """Makes each layer compute its training moments with `global_moments`
  inside `global_rows`, and as before anywhere else."""
  for layer in layers:
    compat.replace_batch_norm_moments(layer, _moments_fn(layer))


def _moments_fn(layer):
  local_moments = layer._moments  # pylint: disable=protected-access
  # A layer synchronized before (a second Trainer on the same model) keeps
  # one wrapper around its own moments.
  local_moments = getattr(local_moments, "local_moments", local_moments)

  def moments(inputs, mask):
    rows = getattr(_ROWS, "rows", None)
    context = tf.distribute.get_replica_context()
    if rows is None or context is None:
      return local_moments(inputs, mask)
    return global_moments(inputs, mask, axis=layer.axis, rows=rows,
                          replica_context=context)

  moments.local_moments = local_moments
  return moments


@contextlib.contextmanager
def global_rows(rows):
  """Within the block, synchronized layers all-reduce their moments; the
  share's first `rows` rows are examples, the rest (an empty share's
  stand-in row) weigh nothing."""
  previous = getattr(_ROWS, "rows", None)
  _ROWS.rows = rows
  try:
    yield
  finally:
    _ROWS.rows = previous


def global_moments(inputs, mask, *, axis: int, rows, replica_context):
  """(mean, variance) per channel of the global batch, from this replica's
  `inputs` and every other replica's, as one device computes them.

  Args:
    inputs: this replica's inputs to the layer (float32 or wider).
    mask: a Keras mask of inputs' shape without the channel axis, or None.
      As Keras' masked moments, masked elements do not count, and the
      divisor is the count plus keras.backend.epsilon().
    axis: the channel axis.
    rows: how many leading rows of `inputs` are examples.
    replica_context: the replica context to all-reduce in.
  """
  x = tf.convert_to_tensor(inputs)
  rank = x.shape.rank
  channel = axis % rank
  axes = [i for i in range(rank) if i != channel]
  # The share's examples lead: a stand-in row after them is sliced off, not
  # weighted by zero (it may hold NaN, a masked average of no element, and
  # 0 * NaN is NaN).
  x = x[:rows]
  if mask is None:
    counted = None
    count = tf.fill([tf.shape(x)[channel]],
                    tf.cast(tf.size(x) // tf.shape(x)[channel], x.dtype))
    local_sum = tf.reduce_sum(x, axes)
  else:
    counted = tf.broadcast_to(
        tf.cast(tf.expand_dims(mask[:rows], -1), tf.bool), tf.shape(x))
    count = tf.reduce_sum(tf.cast(counted, x.dtype), axes)
    local_sum = tf.reduce_sum(tf.where(counted, x, tf.zeros_like(x)), axes)
  sums = replica_context.all_reduce(tf.distribute.ReduceOp.SUM,
                                    tf.concat([local_sum, count], 0))
  total, count = tf.split(sums, 2)
  if mask is not None:
    count += keras.backend.epsilon()
  mean = tf.math.divide_no_nan(total, count)
  shape = [1] * rank
  shape[channel] = -1
  # As tf.nn.moments: the gradient through the mean of the deviations is
  # zero (they sum to zero), so it is not propagated.
  squares = tf.square(x - tf.reshape(tf.stop_gradient(mean), shape))
  if counted is not None:
    squares = tf.where(counted, squares, tf.zeros_like(squares))
  squares = replica_context.all_reduce(tf.distribute.ReduceOp.SUM,
                                       tf.reduce_sum(squares, axes))
  variance = tf.math.divide_no_nan(squares, count)
  # What the layer's output did to the loss flows back through the
  # all-reduces to every replica; an empty share's stand-in row did nothing.
  return (_gradient_if(rows > 0, mean), _gradient_if(rows > 0, variance))


def _gradient_if(condition, tensor):
  """`tensor`, whose gradient is passed on where `condition`, else zero
  (selected, so that a NaN gradient of a stand-in row stays behind)."""

  @tf.custom_gradient
  def identity(t):
    def gradient(upstream):
      return tf.where(condition, upstream, tf.zeros_like(upstream))
    return tf.identity(t), gradient

  return identity(tensor)


def pad_empty(batch):
  """`batch` itself, or for a share of no rows one row of zeros (which
  `global_rows` and the step weigh at zero): the layers run on it, so that
  the share enters the same all-reduces as every other replica."""
  rows = tf.shape(tf.nest.flatten(batch)[0])[0]
  missing = tf.maximum(1 - rows, 0)

  def pad(t):
    if t is None:
      return None
    zeros = tf.zeros(tf.concat([[missing], tf.shape(t)[1:]], 0), t.dtype)
    return tf.concat([t, zeros], 0)

  return tf.nest.map_structure(pad, batch)


def state_after(variable, value, rows, synchronized_state):
  """The value a share assigns to a model state variable: a synchronized
  layer's (the same global statistics on every replica, empty or not), or
  another layer's own update, which an empty share leaves as it was."""
  if id(variable) in synchronized_state:
    return value
  return tf.where(rows > 0, value, tf.convert_to_tensor(variable.value))


def state_ids(layers) -> frozenset:
  """The ids of the synchronized layers' state variables (moving mean and
  variance; with renorm, its statistics)."""
  return frozenset(id(v) for layer in layers
                   for v in layer.non_trainable_variables)
