"""What a step does with a share (or micro-batch) that may hold no example.

A global batch of fewer rows than replicas x micro-batches leaves some shares
empty, and many layers cannot run on 0 rows (Conv1D/Conv2D fail; attention
and recurrent layers may). An empty share therefore never runs the model:
`if_rows` runs the forward and backward pass under `tf.cond(num_rows > 0)`
and a stand-in (zeros, or the share's weight regularization) otherwise.

Every collective of the step (the gradient all-reduce, clipping's norm, the
divisors' all-reduce) stays outside the cond: under MirroredStrategy a
collective is a `merge_call`, which cannot run inside a branch, and every
replica must enter it with the same shapes whatever its share holds.

When a model still fails on some share, `ShareLog` says which: each
(replica, micro-batch) records its global step and row counts on the host
before its forward pass runs, and `describe` turns a TensorFlow error into
one line naming the step, the replica's share, the micro-batch and the op.
"""


import tensorflow as tf

from dist_train import compat
from dist_train import errors
from dist_train.loop import losses


def num_rows(batch) -> tf.Tensor:
  """The rows (examples) of a share: the first dimension of its tensors."""
  return tf.shape(tf.nest.flatten(batch)[0])[0]


def zeros_like_spec(structure):
  """Zeros of the static shape and dtype of every tensor of `structure`
  (tensors of another graph: only their specs are read); None stays None."""
  def zeros(t):
    if t is None:
      return None
    if not t.shape.is_fully_defined():
      raise ValueError(
          f"a step's per-share result must have a static shape to stand in "
          f"for an empty share, got {t.shape} ({t.name})")
    return tf.zeros(t.shape, t.dtype)
  return tf.nest.map_structure(zeros, structure)


def if_rows(rows, compute_fn, empty_fn):
  """compute_fn() when `rows` > 0, else empty_fn(like), as one tf.cond; the
  state updates of the model calls inside compute_fn (BatchNorm's moving
  statistics, a layer's counters) are assigned after the cond, since a
  mirrored variable cannot be assigned inside a branch (its assign is a
  `merge_call`). An empty share leaves them as they are. See `_if_rows`.
  """
  deferred = {}

  def compute():
    with losses.deferred_assignments() as updates:
      result = compute_fn()
    deferred["variables"] = [variable for variable, _ in updates]
    return result, [tf.convert_to_tensor(value) for _, value in updates]

  def empty(like):
    return empty_fn(like[0]), [tf.convert_to_tensor(variable.value)
                               for variable in deferred["variables"]]

  result, values = _if_rows(rows, compute, empty)
  for variable, value in zip(deferred["variables"], values):
    losses.assign_or_defer(variable, value)
  return result


def _if_rows(rows, compute_fn, empty_fn):
  """compute_fn() when `rows` > 0, else empty_fn(like), as one tf.cond.

  Args:
    rows: the share's row count (a scalar tensor).
    compute_fn: the share's real work, taking no argument and returning a
      structure of tensors and None (e.g. gradients of variables without
      one); IndexedSlices are returned dense.
    empty_fn: the stand-in for an empty share; it gets compute_fn's traced
      result `like` (its structure and static specs; see `zeros_like_spec`)
      and returns the same structure. Positions that are None in `like` are
      None in the result, whatever empty_fn returns there.

  Returns:
    compute_fn's structure. The true branch is traced first (tf.cond traces
    it before the false branch), which is how empty_fn learns `like`.
  """
  traced = {}

  def true_fn():
    result = tf.nest.map_structure(
        lambda t: None if t is None else tf.convert_to_tensor(t),
        compute_fn())
    flat = tf.nest.flatten(result)
    traced["like"] = result
    traced["present"] = [t is not None for t in flat]
    return [t for t in flat if t is not None]

  def false_fn():
    like = traced["like"]
    flat = tf.nest.flatten(empty_fn(like))
    like_flat = tf.nest.flatten(like)
    if len(flat) != len(like_flat):
      raise ValueError(f"the stand-in for an empty share returned "
                       f"{len(flat)} values, the real step {len(like_flat)}")
    return [tf.zeros(l.shape, l.dtype) if t is None else
            tf.convert_to_tensor(t)
            for t, l, present in zip(flat, like_flat, traced["present"])
            if present]

  outputs = tf.cond(rows > 0, true_fn, false_fn)
  if not any(traced["present"]):
    outputs = []  # tf.cond of no outputs returns an op.
  outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
  flat = [outputs.pop(0) if present else None
          for present in traced["present"]]
  return tf.nest.pack_sequence_as(traced["like"], flat)


def _rows(count: int) -> str:
  return f"{count} row" if count == 1 else f"{count} rows"


class ShareLog:
  """Per local replica: [global step, share rows, micro-batch, its rows] of
  the share it is about to run, in a host variable read after an error."""

  def __init__(self, *, strategy: tf.distribute.Strategy, first_replica: int,
               num_micro_batches: int):
    self._num_replicas = strategy.num_replicas_in_sync
    self._first_replica = first_replica
    self._num_micro = num_micro_batches
    num_local = len(strategy.extended.worker_devices)
    host = tf.DeviceSpec.from_string(
        strategy.extended.worker_devices[0]).replace(
            device_type="CPU", device_index=0)
    with tf.device(host.to_string()):
      self._log = tf.Variable(tf.fill([num_local, 4], tf.constant(-1, tf.int64)),
                              trainable=False, name="share_log")

  def record(self, micro_batch, *, step, share_rows, micro,
             after=None):
    """Records the share about to run and returns `micro_batch`, made to
    depend on the record: the forward pass cannot start before it.

    `after` (the previous micro-batch's results) orders the record after
    the previous micro-batch's work, so that the log names the one that
    failed. Micro-batches then run one after another, as accumulation
    means them to: one micro-batch's activations in memory at a time.
    """
    if after is not None:
      with tf.control_dependencies(
          [t for t in tf.nest.flatten(after) if t is not None]):
        micro_batch = tf.nest.map_structure(tf.identity, micro_batch)
    context = tf.distribute.get_replica_context()
    local = context.replica_id_in_sync_group - self._first_replica
    entry = tf.cast(tf.stack([tf.cast(step, tf.int64) + 1,
                              tf.cast(share_rows, tf.int64),
                              tf.cast(micro, tf.int64),
                              tf.cast(num_rows(micro_batch), tf.int64)]),
                    tf.int64)
    update = self._log.scatter_nd_update([[local]], [entry])
    with tf.control_dependencies([update]):
      return tf.nest.map_structure(tf.identity, micro_batch)

  def describe(self, error: tf.errors.OpError) -> tf.errors.OpError:
    """`error` again, its message one line naming the step, the failing
    replica's share and micro-batch (with their rows) and the op."""
    node = compat.error_node(error.message)
    local = compat.node_replica(node)
    log = self._log.numpy()
    if not 0 <= local < len(log) or log[local][0] < 0:
      return error
    step, share_rows, micro, micro_rows = (int(v) for v in log[local])
    where = (f"step {step}, replica {self._first_replica + local} of "
             f"{self._num_replicas}: a share of {_rows(share_rows)}")
    if self._num_micro > 1:
      where += (f", micro-batch {micro + 1} of {self._num_micro} with "
                f"{_rows(micro_rows)}")
    if node:
      where += f", in op {node}"
    location = errors.user_location(error)
    if location:
      where += f", at {location}"
    message = f"{compat.op_error_summary(error.message)} ({where})"
    return type(error)(error.node_def, error.op, message)
