"""Data sets: the built-in MNIST splits as arrays, and user data sets.

Built-in data sets are in-memory arrays: images uint8 [N, 28, 28], labels int32
[N], decoded once to float32 [N, 784] in [0, 1]. A user data set
(`--dataset=package.module:function`) is a tf.data.Dataset of unbatched
(features, labels) examples. `pipelines.py` turns either into global batches.
"""

import dataclasses
import functools
import os
from typing import Optional

import numpy as np
import tensorflow as tf

from dist_train import config as config_lib
from dist_train import errors
from dist_train import user_code
from dist_train.data import mnist_files

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)
NUM_FEATURES = 28 * 28
SAMPLE_PATH = os.path.join(os.path.dirname(__file__), "mnist_sample.npz")
_SYNTHETIC_TRAIN_EXAMPLES = 2048


class DataError(errors.DistTrainError):
  """The data set cannot be loaded or is unusable; the message says why."""


class InMemory:
  """A split held in memory as arrays: random access, so each epoch's batches
  are gathered by shuffled indices instead of through a shuffle buffer.

  `examples` is (features, labels) or (features, labels, sample_weight), each
  any nested structure of arrays with the same first dimension (examples).
  """

  def __init__(self, examples, name: str = "the data set"):
    self.examples = examples
    self.name = name
    sizes = {len(a) for a in tf.nest.flatten(examples)}
    if len(sizes) != 1:
      raise DataError(
          f"{name}: arrays of different lengths {sorted(sizes)}; every "
          "array holds one row per example")
    self._size = sizes.pop()

  def __len__(self):
    return self._size

  @property
  def feature_shape(self):
    return tuple(np.shape(self.examples[0])[1:])

  @property
  def num_bytes(self) -> int:
    """The size of the arrays: what a copy on a device takes."""
    return sum(np.asarray(a).nbytes for a in tf.nest.flatten(self.examples))

  @functools.cached_property
  def tensors(self):
    """The examples as host tensors, created once: every epoch's pipeline
    gathers its batches from them."""
    with tf.device("/cpu:0"):
      return tf.nest.map_structure(tf.constant, self.examples)

  def take(self, num_examples: int) -> "InMemory":
    """The first `num_examples` examples."""
    return InMemory(tf.nest.map_structure(lambda a: a[:num_examples],
                                          self.examples), self.name)


@dataclasses.dataclass(frozen=True)
class StreamSplit:
  """A split read as a stream: a tf.data.Dataset of unbatched examples.

  `sharded`: the dataset is this worker's shard only (a task's build_dataset
  given a tf.distribute.InputContext), and `num_examples` counts the shard.
  """

  dataset: tf.data.Dataset
  num_examples: int
  name: str = "the user dataset"
  sharded: bool = False

  def __len__(self):
    return self.num_examples

  @property
  def feature_shape(self):
    return tuple(self.dataset.element_spec[0].shape)

  def preprocess_batch(self, *batch):
    """Stops the run with the data set's name when a floating feature holds
    NaN or Inf, instead of surfacing later as a NaN loss."""
    def check(tensor):
      if not tensor.dtype.is_floating:
        return tensor
      return tf.debugging.check_numerics(
          tensor, f"NaN or Inf in the features of {self.name}")
    return (tf.nest.map_structure(check, batch[0]),) + tuple(batch[1:])


@dataclasses.dataclass(frozen=True)
class Splits:
  train: InMemory | StreamSplit
  validation: InMemory | StreamSplit


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


def load_splits(*, dataset: str, data_dir: Optional[str] = None,
                num_validation_examples: int, num_train_examples: Optional[int],
                seed: int, user_config=None) -> Splits:
  """Loads a data set and holds out its tail for validation.

  Args:
    dataset: mnist, mnist_sample, synthetic or a user `package.module:function`.
    data_dir: where --dataset=mnist looks for its files.
    num_validation_examples: built-in data sets: how many examples at the end
      are held out for validation.
    num_train_examples: use only the first N training examples (synthetic:
      generate N).
    seed: the seed of synthetic data.
    user_config: what a user dataset_fn is called with (the run's Config).

  Raises:
    DataError: the data cannot be loaded, or the split leaves no training
      example.
    user_code.UserCodeError: a user dataset_fn is unusable.
  """
  if config_lib.is_import_path(dataset):
    return _load_user_splits(dataset, num_train_examples, user_config)
  num_val = num_validation_examples
  if dataset == "mnist":
    images, labels = load_mnist(data_dir)
  elif dataset == "mnist_sample":
    images, labels = load_mnist_sample()
  elif dataset == "synthetic":
    num_train = num_train_examples or _SYNTHETIC_TRAIN_EXAMPLES
    images, labels = make_synthetic(num_train + num_val, seed)
  else:
    raise DataError(f"unknown --dataset={dataset!r}")

  images = np.asarray(images, dtype=np.uint8).reshape((-1,) + IMAGE_SHAPE)
  labels = np.asarray(labels, dtype=np.int32).reshape(-1)
  check_labels(labels, f"--dataset={dataset}")
  if num_val >= len(labels):
    raise DataError(
        f"--num_validation_examples={num_val} leaves no training examples in "
        f"--dataset={dataset}, which has {len(labels)}")
  cut = len(labels) - num_val
  features = decode_images(images)
  where = f"--dataset={dataset}"
  train = InMemory((features[:cut], labels[:cut]), f"{where} (train)")
  if num_train_examples is not None:
    train = train.take(num_train_examples)
  return Splits(train=train, validation=InMemory(
      (features[cut:], labels[cut:]), f"{where} (validation)"))


def decode_images(images: np.ndarray) -> np.ndarray:
  """uint8 [N, 28, 28] -> float32 [N, 784] in [0, 1]."""
  return (images.reshape(-1, NUM_FEATURES).astype(np.float32) /
          np.float32(255.0))


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


def _load_user_splits(path, num_train_examples, user_config) -> Splits:
  """Calls the user's dataset_fn for "train" and "validation" and checks them."""
  dataset_fn = user_code.load_function("dataset", path)
  splits = {}
  for name in ("train", "validation"):
    dataset = user_code.check_returns(
        "dataset", path, user_code.call("dataset", path, dataset_fn, name,
                                        user_config), tf.data.Dataset,
        "a tf.data.Dataset")
    where = f"--dataset={path} ({name})"
    spec = dataset.element_spec
    if not (isinstance(spec, tuple) and len(spec) == 2):
      raise user_code.UserCodeError(
          f"{where} must yield (features, labels) pairs, got {spec}")
    labels = spec[1]
    if labels.shape.rank != 0 or not labels.dtype.is_integer:
      raise user_code.UserCodeError(
          f"{where} must yield unbatched examples with a scalar integer "
          f"label, got labels of shape {labels.shape} and type "
          f"{labels.dtype.name}")
    if name == "train" and num_train_examples is not None:
      dataset = dataset.take(num_train_examples)
    splits[name] = StreamSplit(dataset, _count(dataset, where), where)
  if not len(splits["train"]):
    raise DataError(f"--dataset={path} (train) is empty")
  return Splits(**splits)


def _count(dataset, where):
  """The number of examples: known to tf.data, else counted in one pass."""
  cardinality = int(dataset.cardinality())
  if cardinality == tf.data.INFINITE_CARDINALITY:
    raise user_code.UserCodeError(
        f"{where} is infinite: return one pass over the data, dist_train "
        "repeats it per epoch")
  if cardinality >= 0:
    return cardinality
  return int(dataset.reduce(np.int64(0), lambda count, _: count + 1))


def _is_batched(dataset: tf.data.Dataset) -> bool:
  """Whether `dataset` or one it reads batches examples (a batch, padded
  batch or ragged batch anywhere upstream; unbatch undoes it)."""
  seen = [dataset]
  while seen:
    current = seen.pop()
    name = type(current).__name__.lower()
    if "unbatch" in name:
      return False
    if "batch" in name:
      return True
    inputs = getattr(current, "_inputs", None)
    seen.extend(inputs() if callable(inputs) else [])
  return False


def task_split(value, *, where: str, required: bool, sharded: bool = False):
  """A task's `build_dataset(split)` result as an InMemory or StreamSplit.

  Args:
    value: what build_dataset returned: a tf.data.Dataset of unbatched
      examples, an InMemory, or None (no such split).
    where: how messages name the split, e.g. "--task=m:f (train)".
    required: the split must exist and hold examples.
    sharded: a dataset is this worker's shard (an InMemory is always the
      whole split: dist_train reads only this worker's rows of it); an empty
      shard is allowed, the caller checks the total.

  Raises:
    DataError: the split is missing or empty but required.
    user_code.UserCodeError: the value cannot be trained on (not a dataset,
      not (features, labels[, weights]) examples, batched, or infinite).
  """
  if value is None:
    if required:
      raise DataError(f"{where}: build_dataset returned None")
    return None
  if isinstance(value, (InMemory, StreamSplit)):
    split = value
  elif isinstance(value, tf.data.Dataset):
    spec = value.element_spec
    if not (isinstance(spec, tuple) and len(spec) in (2, 3)):
      raise user_code.UserCodeError(
          f"{where} must yield (features, labels) or (features, labels, "
          f"sample_weight) examples, got {spec}")
    if _is_batched(value):
      raise user_code.UserCodeError(
          f"{where} is batched: return unbatched examples, dist_train "
          "batches them by the global batch size")
    split = StreamSplit(value, _count(value, where), where, sharded=sharded)
  else:
    raise user_code.UserCodeError(
        f"{where}: build_dataset must return a tf.data.Dataset, got "
        f"{type(value).__name__}")
  if required and not len(split) and not getattr(split, "sharded", False):
    raise DataError(f"{where} is empty")
  return split
