"""Data sets as in-memory arrays, and the tf.data pipelines that feed the loop.

Images are kept as uint8 [N, 28, 28] and labels as int32 [N]; pipelines batch
first and then convert a whole batch to float32 [B, 784] in [0, 1], which is
cheaper than converting example by example.
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

from dist_train import config as config_lib
from dist_train import mnist_files

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)
NUM_FEATURES = 28 * 28
SAMPLE_PATH = os.path.join(os.path.dirname(__file__), "data_files",
                           "mnist_sample.npz")
_SYNTHETIC_TRAIN_EXAMPLES = 2048


class DataError(ValueError):
  """The data set cannot be loaded or is unusable; the message says why."""


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray  # uint8 [N, 28, 28]
  labels: np.ndarray  # int32 [N]

  def __len__(self):
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Splits:
  train: Split
  validation: Split


def _mnist_path(data_dir):
  """Returns the first mnist.npz found in data_dir or the Keras cache, or None."""
  candidates = []
  if data_dir:
    candidates.append(os.path.join(data_dir, "mnist.npz"))
  keras_home = os.environ.get("KERAS_HOME",
                              os.path.join(os.path.expanduser("~"), ".keras"))
  candidates.append(os.path.join(keras_home, "datasets", "mnist.npz"))
  return next((p for p in candidates if os.path.isfile(p)), None)


def _first_line(error):
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__


def load_mnist(data_dir):
  """Returns (images, labels) of the 60,000 MNIST training digits.

  Looks in `data_dir` for the IDX files (train-images-idx3-ubyte and
  train-labels-idx1-ubyte, plain or .gz) or mnist.npz, then for mnist.npz in
  the Keras cache, then downloads it with the Keras loader.

  Raises:
    DataError: a file is unreadable, or none is found and the download fails.
  """
  idx_pair = mnist_files.find_idx_pair(data_dir) if data_dir else None
  if idx_pair:
    try:
      return mnist_files.read_idx_pair(*idx_pair)
    except mnist_files.MnistFileError as e:
      raise DataError(str(e)) from e
  path = _mnist_path(data_dir)
  if path is None:
    import keras  # pylint: disable=import-outside-toplevel
    try:
      (images, labels), _ = keras.datasets.mnist.load_data()
      return images, labels
    except Exception as e:  # The loader raises a variety of network errors.
      raise DataError(
          f"MNIST is not in --data_dir={data_dir} or the Keras cache and the "
          f"download failed ({_first_line(e)}): put mnist.npz in --data_dir, "
          "or use --dataset=mnist_sample") from e
  try:
    return mnist_files.read_npz(path)
  except mnist_files.MnistFileError as e:
    raise DataError(str(e)) from e


def load_mnist_sample():
  """Returns (images, labels) of the 5,000 MNIST digits packaged with dist_train."""
  with np.load(SAMPLE_PATH) as f:
    return f["x"], f["y"]


def make_synthetic(num_examples, seed):
  """Deterministic random digits: a random prototype image per class, plus noise.

  The labels are learnable from the pixels within a few dozen steps, which
  makes loss curves in tests meaningful, and the classes are balanced.
  """
  rng = np.random.default_rng(seed)
  prototypes = rng.uniform(0, 255, size=(NUM_CLASSES,) + IMAGE_SHAPE)
  labels = rng.integers(0, NUM_CLASSES, size=num_examples)
  noise = rng.normal(0, 96, size=(num_examples,) + IMAGE_SHAPE)
  images = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
  return images, labels


def load_splits(config: config_lib.Config) -> Splits:
  """Loads the configured data set and holds out its tail for validation.

  Raises:
    DataError: the data cannot be loaded, or the split leaves no training
      example.
  """
  num_val = config.num_validation_examples
  if config.dataset == "mnist":
    images, labels = load_mnist(config.data_dir)
  elif config.dataset == "mnist_sample":
    images, labels = load_mnist_sample()
  elif config.dataset == "synthetic":
    num_train = config.num_train_examples or _SYNTHETIC_TRAIN_EXAMPLES
    images, labels = make_synthetic(num_train + num_val, config.seed)
  else:
    raise DataError(f"unknown --dataset={config.dataset!r}")

  images = np.asarray(images, dtype=np.uint8).reshape((-1,) + IMAGE_SHAPE)
  labels = np.asarray(labels, dtype=np.int32).reshape(-1)
  if num_val >= len(labels):
    raise DataError(
        f"--num_validation_examples={num_val} leaves no training examples in "
        f"--dataset={config.dataset}, which has {len(labels)}")
  cut = len(labels) - num_val
  train = Split(images[:cut], labels[:cut])
  if config.num_train_examples is not None:
    train = Split(train.images[:config.num_train_examples],
                  train.labels[:config.num_train_examples])
  return Splits(train=train, validation=Split(images[cut:], labels[cut:]))


def _to_features(images, labels):
  features = tf.reshape(tf.cast(images, tf.float32) / 255.0,
                        [-1, NUM_FEATURES])
  return features, labels


def shuffle_seed(seed: int, epoch: int) -> int:
  """The shuffle seed of one epoch: a fixed function of (seed, epoch).

  A fresh, known order per epoch (instead of a reshuffling iterator) means an
  epoch's order does not depend on how many epochs this process has run.
  """
  return seed * 1_000_003 + epoch


def make_train_dataset(split: Split, *, global_batch_size: int,
                       shuffle_buffer: int, seed: int,
                       epoch: int) -> tf.data.Dataset:
  """One epoch of shuffled global batches; the last one may be partial."""
  ds = tf.data.Dataset.from_tensor_slices((split.images, split.labels))
  ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed(seed, epoch),
                  reshuffle_each_iteration=False)
  ds = ds.batch(global_batch_size, drop_remainder=False)
  ds = ds.map(_to_features, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(tf.data.AUTOTUNE)


def make_eval_dataset(split: Split, *, global_batch_size: int) -> tf.data.Dataset:
  """The split in order, in global batches; the last one may be partial."""
  ds = tf.data.Dataset.from_tensor_slices((split.images, split.labels))
  ds = ds.batch(global_batch_size, drop_remainder=False)
  ds = ds.map(_to_features, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(tf.data.AUTOTUNE)


def num_batches(num_examples: int, global_batch_size: int) -> int:
  """Global steps in one pass, counting a partial last batch."""
  return -(-num_examples // global_batch_size)
