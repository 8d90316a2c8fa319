"""A task that reads TFRecord files sharded by file (--task=
tests.helpers.input_fixtures:sharded_records, --data_dir holding the files), and
writes such files.

Each example's label is its id; the class to learn is id % 4. The id
metrics (count, sum and sum of squares of the ids seen, summed over the
replicas) show that an epoch consumed every example exactly once.
"""

import os

import keras
import numpy as np
import tensorflow as tf

from dist_train import tasks
from dist_train.data import tfrecord

NUM_FEATURES = 6
NUM_CLASSES = 4
FEATURE_SPEC = {
    "features": tf.io.FixedLenFeature([NUM_FEATURES], tf.float32),
    "id": tf.io.FixedLenFeature([], tf.int64),
}


def write_records(directory, split, file_sizes, first_id=0, seed=0):
  """Writes len(file_sizes) files `<split>-<i>.tfrecord` of examples with
  consecutive ids from first_id; returns the number of examples."""
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(99).normal(0, 2, (NUM_CLASSES, NUM_FEATURES))
  next_id = first_id
  for index, size in enumerate(file_sizes):
    ids = np.arange(next_id, next_id + size)
    features = (centres[ids % NUM_CLASSES] +
                rng.normal(size=(size, NUM_FEATURES))).astype(np.float32)
    tfrecord.write(os.path.join(directory, f"{split}-{index}.tfrecord"),
                   ({"features": f, "id": int(i)}
                    for f, i in zip(features, ids)))
    next_id += size
  return next_id - first_id


class IdStatistic(keras.metrics.Metric):
  """The sum over the examples seen of id ** power (power 0: their count)."""

  def __init__(self, name, power):
    super().__init__(name=name)
    self._power = power
    self.total = self.add_variable(shape=(), initializer="zeros",
                                   name="total")

  def update_state(self, labels, outputs, sample_weight=None):
    del outputs, sample_weight
    ids = tf.cast(labels, tf.float32)
    self.total.assign_add(tf.reduce_sum(ids ** self._power))

  def result(self):
    return tf.convert_to_tensor(self.total)


class ShardedRecords(tasks.Task):
  """Blob classification from TFRecord files, each worker reading its own."""

  def __init__(self, config):
    self._data_dir = config.data_dir

  def build_model(self):
    inputs = keras.Input(shape=(NUM_FEATURES,))
    hidden = keras.layers.Dense(8, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(hidden))

  def build_dataset(self, split, input_context=None):
    return tfrecord.read(
        os.path.join(self._data_dir, f"{split}-*.tfrecord"), FEATURE_SPEC,
        lambda example: (example["features"], example["id"]), input_context)

  def loss(self, labels, outputs):
    return keras.losses.sparse_categorical_crossentropy(
        labels % NUM_CLASSES, outputs, from_logits=True)

  def metrics(self):
    return [IdStatistic("id_count", 0), IdStatistic("id_sum", 1),
            IdStatistic("id_squares", 2)]


def sharded_records(config):
  return ShardedRecords(config)


# The sharded run of tests/e2e/test_input.py: file sizes of uneven shards.
TRAIN_FILES = [90, 10, 70, 30, 50]
VALIDATION_FILES = [20, 13]
NUM_RECORDS = sum(TRAIN_FILES)


def write_run_records(directory):
  """The training and validation files of the sharded run of
  tests/e2e/test_input.py."""
  write_records(directory, "train", TRAIN_FILES)
  # Ids go on from the training ids: sums of squares stay exact in float32.
  write_records(directory, "validation", VALIDATION_FILES,
                first_id=NUM_RECORDS, seed=1)
