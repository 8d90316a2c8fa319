"""Data sets, and the tf.data pipelines that feed the loop.

Built-in data sets are in-memory arrays: images uint8 [N, 28, 28], labels int32
[N], decoded once to float32 [N, 784] in [0, 1]; each epoch's batches are
gathered from them by shuffled indices. A user data set
(`--dataset=package.module:function`) is a tf.data.Dataset of unbatched
(features, labels) examples.

Every pipeline shuffles, batches by the *global* batch size and skips on the
whole data set, before it is split across replicas: that is what makes N
replicas see exactly the batches one device would see.
"""

import dataclasses
import functools
import os

import numpy as np
import tensorflow as tf

from dist_train import config as config_lib
from dist_train import errors
from dist_train import mnist_files
from dist_train import plugins

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
  """A built-in split as arrays."""

  images: np.ndarray  # uint8 [N, 28, 28]
  labels: np.ndarray  # int32 [N]

  feature_shape = (NUM_FEATURES,)

  def __len__(self):
    return len(self.labels)

  @functools.cached_property
  def decoded(self) -> tuple:
    """(features float32 [N, 784], labels int32 [N]) as host tensors.

    Decoded once, on first use, and kept: every epoch's pipeline gathers its
    batches from them.
    """
    with tf.device("/cpu:0"):
      features = tf.reshape(tf.cast(self.images, tf.float32) / 255.0,
                            [-1, NUM_FEATURES])
      return features, tf.constant(self.labels)


@dataclasses.dataclass(frozen=True)
class DatasetSplit:
  """A user split: a tf.data.Dataset of unbatched (features, labels)."""

  dataset: tf.data.Dataset
  num_examples: int
  name: str = "the user dataset"

  def __len__(self):
    return self.num_examples

  @property
  def feature_shape(self):
    return tuple(self.dataset.element_spec[0].shape)

  def preprocess_batch(self, features, labels):
    if features.dtype.is_floating:
      # A NaN or Inf in the inputs stops the run with the data set's name,
      # instead of surfacing later as a NaN loss.
      features = tf.debugging.check_numerics(
          features, f"NaN or Inf in the features of {self.name}")
    return features, labels


@dataclasses.dataclass(frozen=True)
class Splits:
  train: Split | DatasetSplit
  validation: Split | DatasetSplit


def _mnist_path(data_dir):
  """Returns the first mnist.npz found in data_dir or the Keras cache, or None."""
  candidates = []
  if data_dir:
    candidates.append(os.path.join(data_dir, "mnist.npz"))
  keras_home = os.environ.get("KERAS_HOME",
                              os.path.join(os.path.expanduser("~"), ".keras"))
  candidates.append(os.path.join(keras_home, "datasets", "mnist.npz"))
  return next((p for p in candidates if os.path.isfile(p)), None)


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
          f"download failed ({errors.first_line(e)}): put mnist.npz in --data_dir, "
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
  if config_lib.is_import_path(config.dataset):
    return _load_user_splits(config)
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
  check_labels(labels, f"--dataset={config.dataset}")
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


def check_labels(labels: np.ndarray, where: str) -> None:
  """Raises DataError naming the first label outside [0, NUM_CLASSES).

  GPU kernels of sparse cross-entropy return NaN for such labels instead of
  failing, so in-memory labels are checked once, before training.
  """
  bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
  if bad.size:
    raise DataError(
        f"{where}: label {labels[bad[0]]} of example {bad[0]} is outside "
        f"[0, {NUM_CLASSES}) ({bad.size} such labels; {NUM_CLASSES} classes)")


def _load_user_splits(config: config_lib.Config) -> Splits:
  """Calls the user's dataset_fn for "train" and "validation" and checks them."""
  dataset_fn = plugins.load_function("dataset", config.dataset)
  splits = {}
  for name in ("train", "validation"):
    dataset = plugins.check_returns(
        "dataset", config.dataset, dataset_fn(name, config), tf.data.Dataset,
        "a tf.data.Dataset")
    where = f"--dataset={config.dataset} ({name})"
    spec = dataset.element_spec
    if not (isinstance(spec, tuple) and len(spec) == 2):
      raise plugins.PluginError(
          f"{where} must yield (features, labels) pairs, got {spec}")
    labels = spec[1]
    if labels.shape.rank != 0 or not labels.dtype.is_integer:
      raise plugins.PluginError(
          f"{where} must yield unbatched examples with a scalar integer "
          f"label, got labels of shape {labels.shape} and type "
          f"{labels.dtype.name}")
    if name == "train" and config.num_train_examples is not None:
      dataset = dataset.take(config.num_train_examples)
    splits[name] = DatasetSplit(dataset, _count(dataset, where), where)
  if not len(splits["train"]):
    raise DataError(f"--dataset={config.dataset} (train) is empty")
  return Splits(**splits)


def _count(dataset, where):
  """The number of examples: known to tf.data, else counted in one pass."""
  cardinality = int(dataset.cardinality())
  if cardinality == tf.data.INFINITE_CARDINALITY:
    raise plugins.PluginError(
        f"{where} is infinite: return one pass over the data, dist_train "
        "repeats it per epoch")
  if cardinality >= 0:
    return cardinality
  return int(dataset.reduce(np.int64(0), lambda count, _: count + 1))


def shuffle_seed(seed: int, epoch: int) -> int:
  """The shuffle seed of one epoch: a fixed function of (seed, epoch).

  A fresh, known order per epoch (instead of a reshuffling iterator) means an
  epoch's order does not depend on how many epochs this process has run.
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


def _gather_batches(split: Split, index_batches: tf.data.Dataset):
  """Global batches gathered from the decoded split by batches of indices.

  Shuffling and batching example indices gives the order that shuffling the
  examples themselves gives (the order depends on the seed only), at a
  fraction of the cost; each batch is then one gather from memory, with no
  decoding and no Python per step.
  """
  features, labels = split.decoded
  ds = index_batches.map(
      lambda indices: (tf.gather(features, indices), tf.gather(labels, indices)),
      num_parallel_calls=tf.data.AUTOTUNE)
  return _shard_by_data(ds.prefetch(tf.data.AUTOTUNE))


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

  if isinstance(split, Split):
    indices = tf.data.Dataset.range(len(split))
    index_batches = concatenated(
        lambda e: indices.shuffle(
            shuffle_buffer, seed=shuffle_seed(seed, e),
            reshuffle_each_iteration=False).batch(global_batch_size))
    return _gather_batches(split, index_batches.skip(skip_batches))
  ds = concatenated(
      lambda e: split.dataset.shuffle(
          shuffle_buffer, seed=shuffle_seed(seed, e),
          reshuffle_each_iteration=False).batch(
              global_batch_size, drop_remainder=False))
  ds = ds.skip(skip_batches)
  ds = ds.map(split.preprocess_batch, num_parallel_calls=tf.data.AUTOTUNE)
  return _shard_by_data(ds.prefetch(tf.data.AUTOTUNE))


def make_eval_dataset(split, *, global_batch_size: int) -> tf.data.Dataset:
  """The split in order, in global batches; the last one may be partial."""
  if isinstance(split, Split):
    return _gather_batches(
        split, tf.data.Dataset.range(len(split)).batch(global_batch_size))
  ds = split.dataset.batch(global_batch_size, drop_remainder=False)
  ds = ds.map(split.preprocess_batch, num_parallel_calls=tf.data.AUTOTUNE)
  return _shard_by_data(ds.prefetch(tf.data.AUTOTUNE))


def num_batches(num_examples: int, global_batch_size: int) -> int:
  """Global steps in one pass, counting a partial last batch."""
  return -(-num_examples // global_batch_size)
