"""Which replicas a worker runs, and what it reads for each of their steps.

A `ReplicaLayout` says which of the global replicas are this worker's; a
split's `StepElements` are, per step, one share of the global batch per local
replica and what the loss divisors need. `pipelines.py` makes the global
batches they are cut from; `inputs.py` places the shares on the devices.
"""

import dataclasses

import tensorflow as tf

from dist_train.data import datasets
from dist_train.data import pipelines


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
    begin, end = pipelines.share_bounds(global_batch_size, self.worker_index,
                              self.num_workers)
    return end - begin


@dataclasses.dataclass(frozen=True)
class StepElements:
  """How a split becomes step elements `(shares, info)` on one worker.

  `shares` holds one batch per local replica (with `gather_on_device`: the
  example indices of that batch, which the loop gathers on the replica's
  device). `info` holds `rows_read`, the examples this worker's pipeline
  read for the step, and, when the whole global batch is known here,
  `num_examples` and `weight_sums` (see `pipelines.global_info`). A stream
  sharded by the task (`split.sharded`) leaves those out: they come from an
  all-reduce in the step.

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
    endless: a stream of unknown length on some worker (the workers
      agreed): every worker reads its stream as `pipelines.endless`, one
      pass of `steps_per_epoch` steps with no epochs.
  """

  split: object
  layout: ReplicaLayout
  global_batch_size: int
  steps_per_epoch: int
  gather_on_device: bool = False
  endless: bool = False

  @property
  def sharded(self) -> bool:
    return getattr(self.split, "sharded", False)

  def train(self, *, shuffle_buffer: int, seed: int, epoch: int,
            num_epochs: int = 1, skip_batches: int = 0) -> tf.data.Dataset:
    """The step elements of epochs epoch .. epoch + num_epochs - 1, in the
    order of `pipelines.make_train_dataset`, less the first `skip_batches`
    steps."""
    split = self.split
    if isinstance(split, datasets.InMemory):
      indices = pipelines.index_batches(
          split, batch_size=self.global_batch_size,
          shuffle_buffer=shuffle_buffer, seed=seed, epoch=epoch,
          num_epochs=num_epochs)
      return self._from_indices(indices.skip(skip_batches))
    if self.endless:
      # Skipped as batches of examples, before the per-step map: a resumed
      # stream reads and batches the steps it skips, but splits none.
      return self._prefetched(self._stream_epoch(
          pipelines.endless(split.dataset, shuffle_buffer, seed),
          skip_batches=skip_batches))

    def epoch_batches(e):
      return self._stream_epoch(
          pipelines.shuffled(split.dataset, shuffle_buffer, seed, e))
    return self._prefetched(
        pipelines.over_epochs(epoch_batches, epoch, num_epochs)
        .skip(skip_batches))

  def evaluation(self) -> tf.data.Dataset:
    """One pass over the split in order, as step elements: its first
    `steps_per_epoch` global batches (all of them without a cap), a stream
    that ends sooner padded with empty steps."""
    split = self.split
    if isinstance(split, datasets.InMemory):
      return self._from_indices(
          tf.data.Dataset.range(len(split)).batch(self.global_batch_size))
    elements = self._stream_epoch(split.dataset)
    if not self.sharded:  # A sharded one is padded to its steps already.
      elements = elements.concatenate(
          empty_elements(elements.element_spec)).take(self.steps_per_epoch)
    return self._prefetched(elements)

  def _from_indices(self, index_batches):
    tensors = self.split.tensors
    _, _, weights = pipelines.unpack_batch(tensors)
    layout = self.layout

    def step(indices):
      num_rows = tf.shape(indices)[0]
      parts = [indices[slice(*pipelines.share_bounds(num_rows, r,
                                                     layout.num_replicas))]
               for r in layout.local_replicas]
      shares = tuple(parts if self.gather_on_device else
                     [pipelines.gather(tensors, p) for p in parts])
      info = {"rows_read": tf.add_n([tf.size(p, tf.int64) for p in parts]),
              "num_examples": tf.cast(num_rows, tf.float32)}
      if weights is not None:
        # The weights of the whole global batch: a few floats an example,
        # gathered here so that every worker knows the divisors without a
        # collective, summed in the order one device sums them.
        info["weight_sums"] = pipelines.weight_sums(
            pipelines.gather(weights, indices))
      return shares, info

    return self._prefetched(
        index_batches.map(step, num_parallel_calls=tf.data.AUTOTUNE))

  def _stream_epoch(self, examples, skip_batches=0):
    """One epoch of a stream as step elements; an endless one, less its
    first `skip_batches` batches."""
    layout = self.layout
    if not self.sharded:
      def whole(*batch):
        shares = tuple(pipelines.split_rows(batch, r, layout.num_replicas)
                       for r in layout.local_replicas)
        return shares, {**pipelines.global_info(batch),
                        "rows_read": pipelines.num_rows(batch)}
      return self._checked_map(
          pipelines.batch_examples(examples, self.global_batch_size)
          .skip(skip_batches), whole)

    def own(*batch):
      shares = tuple(pipelines.split_rows(batch, j, layout.num_local_replicas)
                     for j in range(layout.num_local_replicas))
      return shares, {"rows_read": pipelines.num_rows(batch)}
    batches = self._checked_map(
        pipelines.batch_examples(
            examples, layout.worker_batch_size(self.global_batch_size))
        .skip(skip_batches), own)
    if self.endless:
      return batches  # Never shorter than another worker's.
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
    return pipelines.shard_by_data(ds.prefetch(tf.data.AUTOTUNE))


def empty_elements(element_spec) -> tf.data.Dataset:
  """Endless elements of `element_spec` with no rows: every unknown
  dimension 0, counts 0."""
  def empty(spec):
    shape = [0 if d is None else d for d in spec.shape.as_list()]
    return tf.zeros(shape, spec.dtype)
  return tf.data.Dataset.from_tensors(
      tf.nest.map_structure(empty, element_spec)).repeat()
