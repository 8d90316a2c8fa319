"""The built-in data sets: MNIST, its packaged sample and synthetic digits,
as the built-in classification task reads them (`--dataset`).

Built-in data sets are in-memory arrays: images uint8 [N, 28, 28], labels int32
[N], decoded once to float32 [N, 784] in [0, 1]. `--dataset` may instead name a
user function (`package.module:function`) returning a tf.data.Dataset of
unbatched (features, labels) examples: it is checked by the rule of any user
data set (`datasets.task_split`), and its labels must be class ids, which the
classification task's loss needs.
"""

import os
from typing import Optional

import numpy as np
import tensorflow as tf

from dist_train import config as config_lib
from dist_train import errors
from dist_train import user_code
from dist_train.data import datasets
from dist_train.data import mnist_files

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)
NUM_FEATURES = 28 * 28
SAMPLE_PATH = os.path.join(os.path.dirname(__file__), "mnist_sample.npz")
_SYNTHETIC_TRAIN_EXAMPLES = 2048
SPLITS = ("train", "validation")


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
    datasets.DataError: a file is unreadable, or none is found and the
      download fails.
  """
  idx_pair = mnist_files.find_idx_pair(data_dir) if data_dir else None
  if idx_pair:
    try:
      return mnist_files.read_idx_pair(*idx_pair)
    except mnist_files.MnistFileError as e:
      raise datasets.DataError(str(e)) from e
  path = _mnist_path(data_dir)
  if path is None:
    import keras  # pylint: disable=import-outside-toplevel
    try:
      (images, labels), _ = keras.datasets.mnist.load_data()
      return images, labels
    except Exception as e:  # The loader raises a variety of network errors.
      raise datasets.DataError(
          f"MNIST is not in --data_dir={data_dir} or the Keras cache and the "
          f"download failed ({errors.first_line(e)}): put mnist.npz in --data_dir, "
          "or use --dataset=mnist_sample") from e
  try:
    return mnist_files.read_npz(path)
  except mnist_files.MnistFileError as e:
    raise datasets.DataError(str(e)) from e


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
                seed: int, user_config=None) -> datasets.Splits:
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
    datasets.DataError: the data cannot be loaded, or the split leaves no
      training example.
    user_code.UserCodeError: a user dataset_fn is unusable.
  """
  if config_lib.is_import_path(dataset):
    return _user_splits(dataset, num_train_examples, user_config)
  num_val = num_validation_examples
  if dataset == "mnist":
    images, labels = load_mnist(data_dir)
  elif dataset == "mnist_sample":
    images, labels = load_mnist_sample()
  elif dataset == "synthetic":
    num_train = num_train_examples or _SYNTHETIC_TRAIN_EXAMPLES
    images, labels = make_synthetic(num_train + num_val, seed)
  else:
    raise datasets.DataError(f"unknown --dataset={dataset!r}")

  images = np.asarray(images, dtype=np.uint8).reshape((-1,) + IMAGE_SHAPE)
  labels = np.asarray(labels, dtype=np.int32).reshape(-1)
  check_labels(labels, f"--dataset={dataset}")
  if num_val >= len(labels):
    raise datasets.DataError(
        f"--num_validation_examples={num_val} leaves no training examples in "
        f"--dataset={dataset}, which has {len(labels)}")
  cut = len(labels) - num_val
  features = decode_images(images)
  where = f"--dataset={dataset}"
  train = datasets.InMemory((features[:cut], labels[:cut]), f"{where} (train)")
  if num_train_examples is not None:
    train = train.take(num_train_examples)
  return datasets.Splits(train=train, validation=datasets.InMemory(
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
    raise datasets.DataError(
        f"{where}: label {labels[bad[0]]} of example {bad[0]} is outside "
        f"[0, {NUM_CLASSES}) ({bad.size} such labels; {NUM_CLASSES} classes)")



def _user_splits(path, num_train_examples, user_config) -> datasets.Splits:
  """Calls the user's dataset_fn for "train" and "validation" and checks them
  as any user data set, and that their labels are class ids."""
  dataset_fn = user_code.load_function("dataset", path)
  splits = {}
  for name in SPLITS:
    dataset = user_code.check_returns(
        "dataset", path, user_code.call("dataset", path, dataset_fn, name,
                                        user_config), tf.data.Dataset,
        "a tf.data.Dataset")
    where = f"--dataset={path} ({name})"
    _check_class_labels(dataset.element_spec, where)
    if name == "train" and num_train_examples is not None:
      dataset = dataset.take(num_train_examples)
    splits[name] = datasets.task_split(
        dataset, where=where, required=name == "train",
        steps=getattr(user_config, f"{name}_steps", None),
        steps_flag=f"--{name}_steps")
  return datasets.Splits(**splits)


def _check_class_labels(spec, where):
  """Raises UserCodeError unless an example's labels are one integer (a class
  id for sparse cross-entropy). Checked first: a batched data set is named by
  its labels' shape. Any other structure is left to `datasets.task_split`."""
  if not (isinstance(spec, tuple) and len(spec) >= 2 and
          isinstance(spec[1], tf.TensorSpec)):
    return
  labels = spec[1]
  if labels.shape.rank != 0 or not labels.dtype.is_integer:
    raise user_code.UserCodeError(
        f"{where} must yield unbatched examples with a scalar integer "
        f"label, got labels of shape {labels.shape} and type "
        f"{labels.dtype.name}")
