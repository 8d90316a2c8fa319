"""Input pipelines: the batches of each step, in a fixed order per epoch.

Every pipeline shuffles, batches by the *global* batch size and skips on the
whole data set (or, for a stream the task shards, on this worker's shard):
that is what makes N replicas see exactly the batches one device would see.

`make_train_dataset` and `make_eval_dataset` give the whole global batch of
each step, for a caller that splits it itself (Keras `fit` in
scripts/benchmark.py, tests); the pieces they are made of (index batches,
shuffled epochs, padded batches) also make what each worker reads for its
replicas, `distribute/step_elements.py`.
"""

import dataclasses

import tensorflow as tf

from dist_train import compat
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


def num_batches(num_examples: int, global_batch_size: int) -> int:
  """Global steps in one pass, counting a partial last batch: the one
  definition of steps per epoch (the pipelines never drop a remainder)."""
  return -(-num_examples // global_batch_size)


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


def shard_by_data(ds: tf.data.Dataset) -> tf.data.Dataset:
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


def num_rows(batch):
  """The number of examples of a batch, as an int64 tensor."""
  return tf.shape(tf.nest.flatten(batch)[0], out_type=tf.int64)[0]


def gather(tensors, indices):
  """The rows `indices` of every tensor of `tensors`."""
  return tf.nest.map_structure(lambda t: tf.gather(t, indices), tensors)


def _gather_batches(split: datasets.InMemory, index_batches: tf.data.Dataset):
  """Global batches gathered from an in-memory split by batches of indices.

  Shuffling and batching example indices gives the order that shuffling the
  examples themselves gives (the order depends on the seed only), at a
  fraction of the cost; each batch is then one gather from memory, with no
  decoding and no Python per step.
  """
  tensors = split.tensors
  ds = index_batches.map(lambda indices: gather(tensors, indices),
                         num_parallel_calls=tf.data.AUTOTUNE)
  return shard_by_data(ds.prefetch(tf.data.AUTOTUNE))


def batch_examples(ds: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
  """Batches of a stream, the last one partial, each padded to its longest
  example (variable-length sequences: the padding is 0, so padded sample
  weights mask it). Examples of one shape are batched as they are."""
  return ds.padded_batch(batch_size, drop_remainder=False)


def _checked(split: datasets.StreamSplit, batches: tf.data.Dataset):
  batches = batches.map(split.preprocess_batch,
                        num_parallel_calls=tf.data.AUTOTUNE)
  return shard_by_data(batches.prefetch(tf.data.AUTOTUNE))


def over_epochs(epoch_dataset, epoch: int, num_epochs: int):
  """Epochs epoch .. epoch + num_epochs - 1 of `epoch_dataset(e)` (e: a
  scalar int64 tensor), one after another.

  Built lazily: one traced function makes each epoch's dataset when the
  iterator reaches it, so building the pipeline takes as long for 100,000
  epochs as for one.
  """
  return tf.data.Dataset.range(epoch, epoch + num_epochs).flat_map(
      epoch_dataset)


def shuffled(ds: tf.data.Dataset, shuffle_buffer: int, seed: int, epoch):
  """`ds` in epoch `epoch`'s order (`shuffle_seed(seed, epoch)`, a tensor
  when `epoch` is one)."""
  return compat.shuffle(ds, shuffle_buffer, shuffle_seed(seed, epoch))


def index_batches(split, *, batch_size, shuffle_buffer, seed, epoch,
                   num_epochs):
  """Batches of example indices of an in-memory split, shuffled per epoch as
  the examples themselves would be."""
  indices = tf.data.Dataset.range(len(split))
  return over_epochs(
      lambda e: shuffled(indices, shuffle_buffer, seed, e).batch(batch_size),
      epoch, num_epochs)


def endless(ds: tf.data.Dataset, shuffle_buffer: int, seed: int):
  """The examples of a stream of unknown length (`StreamSplit.endless`), as
  a run with --train_steps reads them: `ds.repeat()` (an endless `ds` is
  unchanged; a finite one is read again and again) shuffled once, with
  epoch 0's seed. There are no epochs: the run's step k reads the k-th
  global batch of this stream."""
  return shuffled(ds.repeat(), shuffle_buffer, seed, 0)


def make_train_dataset(split, *, global_batch_size: int,
                       shuffle_buffer: int, seed: int, epoch: int,
                       num_epochs: int = 1,
                       skip_batches: int = 0) -> tf.data.Dataset:
  """Shuffled global batches of epochs epoch .. epoch + num_epochs - 1.

  Each epoch's last batch may be partial; each epoch is shuffled with its own
  seed, `shuffle_seed(seed, epoch)`, so an epoch's order does not depend on
  where the pipeline started. The first `skip_batches` batches (of the first
  epoch) are skipped: a resumed run continues with the next batch. A stream
  of unknown length has no epochs (`endless`): its batches go on forever.
  """
  if isinstance(split, datasets.InMemory):
    indices = index_batches(
        split, batch_size=global_batch_size, shuffle_buffer=shuffle_buffer,
        seed=seed, epoch=epoch, num_epochs=num_epochs)
    return _gather_batches(split, indices.skip(skip_batches))
  if getattr(split, "endless", False):
    return _checked(split, batch_examples(
        endless(split.dataset, shuffle_buffer, seed),
        global_batch_size).skip(skip_batches))
  batches = over_epochs(
      lambda e: batch_examples(shuffled(split.dataset, shuffle_buffer, seed, e),
                               global_batch_size),
      epoch, num_epochs)
  return _checked(split, batches.skip(skip_batches))


def make_eval_dataset(split, *, global_batch_size: int) -> tf.data.Dataset:
  """The split in order, in global batches; the last one may be partial."""
  if isinstance(split, datasets.InMemory):
    return _gather_batches(
        split, tf.data.Dataset.range(len(split)).batch(global_batch_size))
  return _checked(split, batch_examples(split.dataset, global_batch_size))
