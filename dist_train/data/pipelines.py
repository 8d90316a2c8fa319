"""Input pipelines: the batches of each step, in a fixed order per epoch.

Every pipeline shuffles, batches by the *global* batch size and skips on the
whole data set (or, for a stream the task shards, on this worker's shard):
that is what makes N replicas see exactly the batches one device would see.

Two forms:
  * global batches (`make_train_dataset`, `make_eval_dataset`): the whole
    batch of each step, for a caller that splits it itself (Keras `fit` in
    scripts/benchmark.py, tests);
  * step elements (`make_train_steps`, `make_eval_steps`): what one worker
    reads for each step, `(shares, info)`: one share per local replica and
    what the loss divisors need (see `StepElements`).
"""

import dataclasses

import tensorflow as tf

from dist_train.data import compat
from dist_train.data import datasets


def shuffle_seed(seed: int, epoch: int) -> int:
  """The shuffle seed of one epoch: a fixed function of (seed, epoch).

  A fresh, known order per epoch (instead of a reshuffling iterator) means an
  epoch's order does not depend on how many epochs this process has run.
  tf.data derives the order from this seed and TensorFlow's global seed,
  which `train` sets to `seed` (keras.utils.set_random_seed) before it builds
  the pipeline: to reproduce an epoch's order elsewhere, set both.
  """
  return seed * 1_000_003 + epoch


def share_bounds(num_rows, part: int, num_parts: int):
  """[begin, end) of part `part` of `num_rows` rows cut into `num_parts`:
  parts differ by at most one row, and a part is empty when num_rows <
  num_parts."""
  return num_rows * part // num_parts, num_rows * (part + 1) // num_parts


def split_rows(batch, part: int, num_parts: int):
  """Rows `share_bounds(n, part, num_parts)` of every tensor of `batch`."""
  num_rows = tf.shape(tf.nest.flatten(batch)[0])[0]
  begin, end = share_bounds(num_rows, part, num_parts)
  return tf.nest.map_structure(lambda t: t[begin:end], batch)


def unpack_batch(batch):
  """(features, labels, sample_weight or None), as Keras' fit reads them."""
  if len(batch) == 3:
    return batch
  features, labels = batch
  return features, labels, None


def weight_sums(weights):
  """sum(w) in float32 of each sample weight (a structure like `weights`)."""
  return tf.nest.map_structure(
      lambda w: tf.reduce_sum(tf.cast(w, tf.float32)), weights)


def global_info(batch) -> dict:
  """What the loss divisors need from a whole global batch: its number of
  examples (a partial last batch is scaled exactly) and the sum of each
  sample weight (when there are weights)."""
  _, _, weights = unpack_batch(batch)
  info = {"num_examples": tf.cast(tf.shape(tf.nest.flatten(batch)[0])[0],
                                  tf.float32)}
  if weights is not None:
    info["weight_sums"] = weight_sums(weights)
  return info


def _shard_by_data(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Marks `ds` to be split across workers by data, not by files.

  dist_train's loop reads its own pipeline on each worker, so this only
  matters when a strategy distributes the dataset (Keras `fit` does, in
  scripts/benchmark.py): there too each worker then keeps its slice of every
  global batch, instead of batches of its own files.
  """
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.DATA)
  return ds.with_options(options)


def _num_rows(batch):
  return tf.shape(tf.nest.flatten(batch)[0], out_type=tf.int64)[0]


def _gather(tensors, indices):
  return tf.nest.map_structure(lambda t: tf.gather(t, indices), tensors)


def _gather_batches(split: datasets.InMemory, index_batches: tf.data.Dataset):
  """Global batches gathered from an in-memory split by batches of indices.

  Shuffling and batching example indices gives the order that shuffling the
  examples themselves gives (the order depends on the seed only), at a
  fraction of the cost; each batch is then one gather from memory, with no
  decoding and no Python per step.
  """
  tensors = split.tensors
  ds = index_batches.map(lambda indices: _gather(tensors, indices),
                         num_parallel_calls=tf.data.AUTOTUNE)
  return _shard_by_data(ds.prefetch(tf.data.AUTOTUNE))


def _batch(ds: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
  """Batches of a stream, the last one partial, each padded to its longest
  example (variable-length sequences: the padding is 0, so padded sample
  weights mask it). Examples of one shape are batched as they are."""
  return ds.padded_batch(batch_size, drop_remainder=False)


def _checked(split: datasets.StreamSplit, batches: tf.data.Dataset):
  batches = batches.map(split.preprocess_batch,
                        num_parallel_calls=tf.data.AUTOTUNE)
  return _shard_by_data(batches.prefetch(tf.data.AUTOTUNE))


def _over_epochs(epoch_dataset, epoch: int, num_epochs: int):
  """Epochs epoch .. epoch + num_epochs - 1 of `epoch_dataset(e)` (e: a
  scalar int64 tensor), one after another.

  Built lazily: one traced function makes each epoch's dataset when the
  iterator reaches it, so building the pipeline takes as long for 100,000
  epochs as for one.
  """
  return tf.data.Dataset.range(epoch, epoch + num_epochs).flat_map(
      epoch_dataset)


def _shuffled(ds: tf.data.Dataset, shuffle_buffer: int, seed: int, epoch):
  """`ds` in epoch `epoch`'s order (`shuffle_seed(seed, epoch)`, a tensor
  when `epoch` is one)."""
  return compat.shuffle(ds, shuffle_buffer, shuffle_seed(seed, epoch))


def _index_batches(split, *, batch_size, shuffle_buffer, seed, epoch,
                   num_epochs):
  indices = tf.data.Dataset.range(len(split))
  return _over_epochs(
      lambda e: _shuffled(indices, shuffle_buffer, seed, e).batch(batch_size),
      epoch, num_epochs)


def make_train_dataset(split, *, global_batch_size: int,
                       shuffle_buffer: int, seed: int, epoch: int,
                       num_epochs: int = 1,
                       skip_batches: int = 0) -> tf.data.Dataset:
  """Shuffled global batches of epochs epoch .. epoch + num_epochs - 1.

  Each epoch's last batch may be partial; each epoch is shuffled with its own
  seed, `shuffle_seed(seed, epoch)`, so an epoch's order does not depend on
  where the pipeline started. The first `skip_batches` batches (of the first
  epoch) are skipped: a resumed run continues with the next batch.
  """
  if isinstance(split, datasets.InMemory):
    index_batches = _index_batches(
        split, batch_size=global_batch_size, shuffle_buffer=shuffle_buffer,
        seed=seed, epoch=epoch, num_epochs=num_epochs)
    return _gather_batches(split, index_batches.skip(skip_batches))
  batches = _over_epochs(
      lambda e: _batch(_shuffled(split.dataset, shuffle_buffer, seed, e),
                       global_batch_size),
      epoch, num_epochs)
  return _checked(split, batches.skip(skip_batches))


def make_eval_dataset(split, *, global_batch_size: int) -> tf.data.Dataset:
  """The split in order, in global batches; the last one may be partial."""
  if isinstance(split, datasets.InMemory):
    return _gather_batches(
        split, tf.data.Dataset.range(len(split)).batch(global_batch_size))
  return _checked(split, _batch(split.dataset, global_batch_size))


# Step elements: what one worker reads for each step.


@dataclasses.dataclass(frozen=True)
class ReplicaLayout:
  """Which replicas this worker runs: replicas `first_replica ..
  first_replica + num_local_replicas - 1` of `num_replicas`, on worker
  `worker_index` of `num_workers` (every worker runs as many)."""

  num_replicas: int
  num_local_replicas: int
  first_replica: int

  @property
  def num_workers(self) -> int:
    return self.num_replicas // self.num_local_replicas

  @property
  def worker_index(self) -> int:
    return self.first_replica // self.num_local_replicas

  @property
  def local_replicas(self) -> range:
    return range(self.first_replica,
                 self.first_replica + self.num_local_replicas)

  def worker_batch_size(self, global_batch_size: int) -> int:
    """This worker's part of a global batch, when workers batch their own
    shards: the parts differ by at most one example and add up to it."""
    begin, end = share_bounds(global_batch_size, self.worker_index,
                              self.num_workers)
    return end - begin


@dataclasses.dataclass(frozen=True)
class StepElements:
  """How a split becomes step elements `(shares, info)` on one worker.

  `shares` holds one batch per local replica (with `gather_on_device`: the
  example indices of that batch, which the loop gathers on the replica's
  device). `info` holds `rows_read`, the examples this worker's pipeline
  read for the step, and, when the whole global batch is known here,
  `num_examples` and `weight_sums` (see `global_info`). A stream sharded by
  the task (`split.sharded`) leaves those out: they come from an all-reduce
  in the step.

  Attributes:
    split: an InMemory (random access: every worker shuffles the same example
      indices and gathers only its replicas' rows) or a StreamSplit (whole:
      every worker reads each global batch and keeps its replicas' rows;
      sharded: each worker batches its own shard, `worker_batch_size`
      examples a step).
    layout: this worker's replicas.
    global_batch_size: examples per step over all replicas.
    steps_per_epoch: steps of an epoch; a sharded stream's shorter shards
      are padded with empty shares up to it.
    gather_on_device: InMemory only: shares are index batches.
  """

  split: object
  layout: ReplicaLayout
  global_batch_size: int
  steps_per_epoch: int
  gather_on_device: bool = False

  @property
  def sharded(self) -> bool:
    return getattr(self.split, "sharded", False)

  def train(self, *, shuffle_buffer: int, seed: int, epoch: int,
            num_epochs: int = 1, skip_batches: int = 0) -> tf.data.Dataset:
    """The step elements of epochs epoch .. epoch + num_epochs - 1, in the
    order of `make_train_dataset`, less the first `skip_batches` steps."""
    split = self.split
    if isinstance(split, datasets.InMemory):
      index_batches = _index_batches(
          split, batch_size=self.global_batch_size,
          shuffle_buffer=shuffle_buffer, seed=seed, epoch=epoch,
          num_epochs=num_epochs)
      return self._from_indices(index_batches.skip(skip_batches))

    def epoch_batches(e):
      return self._stream_epoch(
          _shuffled(split.dataset, shuffle_buffer, seed, e))
    return self._prefetched(
        _over_epochs(epoch_batches, epoch, num_epochs).skip(skip_batches))

  def evaluation(self) -> tf.data.Dataset:
    """One pass over the split in order, as step elements."""
    split = self.split
    if isinstance(split, datasets.InMemory):
      return self._from_indices(
          tf.data.Dataset.range(len(split)).batch(self.global_batch_size))
    return self._prefetched(self._stream_epoch(split.dataset))

  def _from_indices(self, index_batches):
    tensors = self.split.tensors
    _, _, weights = unpack_batch(tensors)
    layout = self.layout

    def step(indices):
      num_rows = tf.shape(indices)[0]
      parts = [indices[slice(*share_bounds(num_rows, r,
                                           layout.num_replicas))]
               for r in layout.local_replicas]
      shares = tuple(parts if self.gather_on_device else
                     [_gather(tensors, p) for p in parts])
      info = {"rows_read": tf.add_n([tf.size(p, tf.int64) for p in parts]),
              "num_examples": tf.cast(num_rows, tf.float32)}
      if weights is not None:
        # The weights of the whole global batch: a few floats an example,
        # gathered here so that every worker knows the divisors without a
        # collective, summed in the order one device sums them.
        info["weight_sums"] = weight_sums(_gather(weights, indices))
      return shares, info

    return self._prefetched(
        index_batches.map(step, num_parallel_calls=tf.data.AUTOTUNE))

  def _stream_epoch(self, examples):
    """One epoch of a stream as step elements."""
    layout = self.layout
    if not self.sharded:
      def whole(*batch):
        shares = tuple(split_rows(batch, r, layout.num_replicas)
                       for r in layout.local_replicas)
        return shares, {**global_info(batch), "rows_read": _num_rows(batch)}
      return self._checked_map(_batch(examples, self.global_batch_size),
                               whole)

    def own(*batch):
      shares = tuple(split_rows(batch, j, layout.num_local_replicas)
                     for j in range(layout.num_local_replicas))
      return shares, {"rows_read": _num_rows(batch)}
    batches = self._checked_map(
        _batch(examples, layout.worker_batch_size(self.global_batch_size)),
        own)
    # A shorter shard contributes empty shares (zero weight) until every
    # worker has run the epoch's steps: all run the same collectives.
    return batches.concatenate(
        empty_elements(batches.element_spec)).take(self.steps_per_epoch)

  def _checked_map(self, batches, step_fn):
    return batches.map(lambda *batch: step_fn(
        *self.split.preprocess_batch(*batch)),
                       num_parallel_calls=tf.data.AUTOTUNE)

  @staticmethod
  def _prefetched(ds):
    return _shard_by_data(ds.prefetch(tf.data.AUTOTUNE))


def empty_elements(element_spec) -> tf.data.Dataset:
  """Endless elements of `element_spec` with no rows: every unknown
  dimension 0, counts 0."""
  def empty(spec):
    shape = [0 if d is None else d for d in spec.shape.as_list()]
    return tf.zeros(shape, spec.dtype)
  return tf.data.Dataset.from_tensors(
      tf.nest.map_structure(empty, element_spec)).repeat()
