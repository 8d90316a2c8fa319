"""User code loaded by import path in tests
(--model=tests.helpers.plugin_fixtures:...)."""

import keras
import numpy as np
import tensorflow as tf

NOT_CALLABLE = 3


def small_model(config):
  """A user model: 784 floats -> 10 logits."""
  inputs = keras.Input(shape=(784,))
  x = keras.layers.Dense(config.hidden_units, activation="tanh",
                         name="user_hidden")(inputs)
  return keras.Model(inputs, keras.layers.Dense(10, name="user_logits")(x))


def returns_none(config):
  del config
  return None


def wrong_input_shape(config):
  del config
  inputs = keras.Input(shape=(100,))
  return keras.Model(inputs, keras.layers.Dense(10)(inputs))


BLOB_FEATURES = 12
BLOB_CLASSES = 4


def blobs(split, config):
  """A user dataset: Gaussian blobs, one per class, as unbatched examples."""
  rng = np.random.default_rng(config.seed + (0 if split == "train" else 1))
  size = 300 if split == "train" else 90
  centres = np.random.default_rng(99).normal(
      0, 3, size=(BLOB_CLASSES, BLOB_FEATURES))
  labels = rng.integers(0, BLOB_CLASSES, size=size)
  features = centres[labels] + rng.normal(size=(size, BLOB_FEATURES))
  dataset = tf.data.Dataset.from_tensor_slices(
      (features.astype(np.float32), labels.astype(np.int64)))
  # A filter hides the size from tf.data, so dist_train has to count it.
  return dataset.filter(lambda features, label: True)


def blob_model(config):
  """A user model for `blobs`."""
  inputs = keras.Input(shape=(BLOB_FEATURES,))
  x = keras.layers.Dense(config.hidden_units, activation="relu")(inputs)
  return keras.Model(inputs, keras.layers.Dense(BLOB_CLASSES)(x))


def weighted_blobs(split, config):
  """blobs with a sample weight per example: (features, label, weight)."""
  return blobs(split, config).map(
      lambda features, label: (features, label, tf.cast(label % 2, tf.float32)))


def batched_blobs(split, config):
  return blobs(split, config).batch(8)


def features_only(split, config):
  return blobs(split, config).map(lambda features, label: features)


def infinite_blobs(split, config):
  return blobs(split, config).repeat()


def returns_list(split, config):
  del split, config
  return [1, 2, 3]


def blobs_with_nan(split, config):
  """blobs with a NaN in the features of one training example."""
  dataset = blobs(split, config)
  if split != "train":
    return dataset
  return dataset.enumerate().map(
      lambda i, example: (tf.where(i == 50, np.float32(np.nan), example[0]),
                          example[1]))


def blobs_with_label_12(split, config):
  """blobs with one training label outside [0, 4)."""
  dataset = blobs(split, config)
  if split != "train":
    return dataset
  return dataset.enumerate().map(
      lambda i, example: (example[0],
                          tf.where(i == 7, np.int64(12), example[1])))


def empty_train(split, config):
  dataset = blobs(split, config)
  return dataset.take(0) if split == "train" else dataset


def mlp_with_12_classes(config):
  """The built-in MLP (--model=mlp) with a new head: 12 classes, not 10.

  Its other layers match the built-in model's, so a warm start from an mlp
  run can load them (--init_skip_mismatch skips the head).
  """
  inputs = keras.Input(shape=(784,), name="digits")
  x = keras.layers.Dense(config.hidden_units, activation="relu",
                         name="dense_1")(inputs)
  x = keras.layers.Dense(config.hidden_units, activation="relu",
                         name="dense_2")(x)
  return keras.Model(inputs, keras.layers.Dense(12, name="predictions")(x))
