"""tf.data internals dist_train relies on, in one place (checked on TF 2.21).

`tests/integration/test_data.py::test_shuffle_with_seed_tensor_matches_python_seed` fails
loudly if an upgrade changes what these reproduce.
"""

import tensorflow as tf
# pylint: disable=g-direct-tensorflow-import
from tensorflow.python.data.ops import dataset_ops
from tensorflow.python.eager import context
from tensorflow.python.framework import random_seed as framework_seed
from tensorflow.python.ops import gen_dataset_ops

_MAX_SEED = 2**31 - 1  # random_seed._MAXINT32: seeds are taken modulo it.


def _seed_pair(seed):
  """(seed, seed2) tensors that `Dataset.shuffle(seed=int)` would use.

  Mirrors tensorflow/python/framework/random_seed.get_seed and its tf.data
  wrapper for an operation seed that is a tensor. `Dataset.shuffle` itself
  accepts a seed tensor, but with TensorFlow's global seed at 0 (dist_train's
  default --seed, set by keras.utils.set_random_seed) its Python check for
  the seed pair (0, 0) asks a graph tensor for a Python bool, and fails.
  """
  global_seed = (context.global_seed() if tf.executing_eagerly()
                 else tf.compat.v1.get_default_graph().seed)
  first = (framework_seed.DEFAULT_GRAPH_SEED if global_seed is None
           else global_seed % _MAX_SEED)
  first = tf.constant(first, tf.int64)
  second = tf.cast(seed, tf.int64) % _MAX_SEED
  second = tf.where((first == 0) & (second == 0),
                    tf.constant(_MAX_SEED, tf.int64), second)
  return first, second


class _ShuffleDataset(dataset_ops.UnaryUnchangedStructureDataset):
  """`Dataset.shuffle(..., reshuffle_each_iteration=False)` with given seeds
  (what tf.data's own _ShuffleDataset builds, less the seed computation)."""

  def __init__(self, input_dataset, buffer_size, seed, seed2):
    self._input_dataset = input_dataset
    self._name = None
    variant_tensor = gen_dataset_ops.shuffle_dataset_v3(
        input_dataset._variant_tensor,  # pylint: disable=protected-access
        buffer_size=tf.cast(buffer_size, tf.int64), seed=seed, seed2=seed2,
        seed_generator=gen_dataset_ops.dummy_seed_generator(),
        reshuffle_each_iteration=False, **self._common_args)
    super().__init__(input_dataset, variant_tensor)


def shuffle(dataset: tf.data.Dataset, buffer_size: int,
            seed) -> tf.data.Dataset:
  """`dataset.shuffle(buffer_size, seed=seed, reshuffle_each_iteration=False)`
  in the same order, for a Python int or a scalar int64 tensor `seed`.

  A seed tensor lets one traced function build every epoch's shuffle
  (`Dataset.range(epochs).flat_map(...)`), instead of one dataset per epoch.
  """
  return _ShuffleDataset(dataset, buffer_size, *_seed_pair(seed))
