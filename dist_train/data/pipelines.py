"""Input pipelines: global batches for the loop, in a fixed order per epoch.

Every pipeline shuffles, batches by the *global* batch size and skips on the
whole data set, before the loop splits each batch across replicas: that is
what makes N replicas see exactly the batches one device would see.
"""

import functools

import tensorflow as tf

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


def _shard_by_data(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Marks `ds` to be split across workers by data, not by files.

  dist_train's loop reads these global batches itself and slices them per
  replica, so this only matters when a strategy distributes the dataset
  (Keras `fit` does, in scripts/benchmark.py): there too each worker then
  keeps its slice of every global batch, instead of batches of its own files.
  """
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.DATA)
  return ds.with_options(options)


def _gather_batches(split: datasets.InMemory, index_batches: tf.data.Dataset):
  """Global batches gathered from an in-memory split by batches of indices.

  Shuffling and batching example indices gives the order that shuffling the
  examples themselves gives (the order depends on the seed only), at a
  fraction of the cost; each batch is then one gather from memory, with no
  decoding and no Python per step.
  """
  tensors = split.tensors
  ds = index_batches.map(
      lambda indices: tf.nest.map_structure(
          lambda t: tf.gather(t, indices), tensors),
      num_parallel_calls=tf.data.AUTOTUNE)
  return _shard_by_data(ds.prefetch(tf.data.AUTOTUNE))


def _batch(ds: tf.data.Dataset, global_batch_size: int) -> tf.data.Dataset:
  """Global batches of a stream, the last one partial, each padded to its
  longest example (variable-length sequences: the padding is 0, so padded
  sample weights mask it). Examples of one shape are batched as they are."""
  return ds.padded_batch(global_batch_size, drop_remainder=False)


def _checked(split: datasets.StreamSplit, batches: tf.data.Dataset):
  batches = batches.map(split.preprocess_batch,
                        num_parallel_calls=tf.data.AUTOTUNE)
  return _shard_by_data(batches.prefetch(tf.data.AUTOTUNE))


def make_train_dataset(split, *, global_batch_size: int,
                       shuffle_buffer: int, seed: int, epoch: int,
                       num_epochs: int = 1,
                       skip_batches: int = 0) -> tf.data.Dataset:
  """Shuffled global batches of epochs epoch .. epoch + num_epochs - 1.

  Each epoch's last batch may be partial; each epoch is shuffled with its own
  seed, `shuffle_seed(seed, epoch)`, so an epoch's order does not depend on
  where the pipeline started. The first `skip_batches` batches (of the first
  epoch) are skipped: a resumed run continues with the next batch.

  One pipeline spans all epochs, so it is built once (building one captures
  the decoded split) and prefetching runs on across epoch ends.
  """
  def concatenated(epoch_dataset):
    # Python seeds per epoch: a seed tensor (flat_map over epochs) fails
    # once a global seed is set (tf.data compares seeds in Python).
    datasets = [epoch_dataset(e) for e in range(epoch, epoch + num_epochs)]
    return functools.reduce(tf.data.Dataset.concatenate, datasets)

  if isinstance(split, datasets.InMemory):
    indices = tf.data.Dataset.range(len(split))
    index_batches = concatenated(
        lambda e: indices.shuffle(
            shuffle_buffer, seed=shuffle_seed(seed, e),
            reshuffle_each_iteration=False).batch(global_batch_size))
    return _gather_batches(split, index_batches.skip(skip_batches))
  batches = concatenated(
      lambda e: _batch(split.dataset.shuffle(
          shuffle_buffer, seed=shuffle_seed(seed, e),
          reshuffle_each_iteration=False), global_batch_size))
  return _checked(split, batches.skip(skip_batches))


def make_eval_dataset(split, *, global_batch_size: int) -> tf.data.Dataset:
  """The split in order, in global batches; the last one may be partial."""
  if isinstance(split, datasets.InMemory):
    return _gather_batches(
        split, tf.data.Dataset.range(len(split)).batch(global_batch_size))
  return _checked(split, _batch(split.dataset, global_batch_size))
