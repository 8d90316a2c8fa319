"""Example task: two outputs from the packaged MNIST digits.

One network, two heads: `digit`, the class (cross-entropy, accuracy), and
`ink`, the fraction of the image's pixels that are ink (intensity above one
half; squared error, mean absolute error). The losses are a dict by output
name, combined with `loss_weights`, as in `model.compile`.

    python -m dist_train.main --flagfile=launch/flags/mnist_two_heads.cfg \
        --cpu_replicas=2

`--num_validation_examples` digits at the end of the 5,000 are held out,
`--num_train_examples` caps the training digits and `--hidden_units` is the
width of the shared layer.
"""

from typing import Optional

import keras
import numpy as np

from dist_train import tasks
from dist_train.data import datasets
from dist_train.data import mnist

INK_THRESHOLD = 0.5


def ink_fraction(features: np.ndarray) -> np.ndarray:
  """[N, 784] pixels in [0, 1] -> [N, 1]: the fraction above INK_THRESHOLD."""
  return np.mean(features > INK_THRESHOLD, axis=1, keepdims=True,
                 dtype=np.float32)


def cross_entropy(labels, logits):
  """Per-example sparse cross-entropy of integer labels and logits."""
  return keras.losses.sparse_categorical_crossentropy(labels, logits,
                                                      from_logits=True)


def squared_error(targets, predictions):
  """Per-example squared error of [batch, 1] values, [batch]."""
  return keras.losses.mean_squared_error(targets, predictions)


class MnistTwoHeadsTask(tasks.Task):
  """The digit and its ink fraction, from one network with two heads."""

  # The ink fraction's squared error starts near its variance, ~2e-3, the
  # cross-entropy near 2.3: the weight puts the two on a comparable scale.
  loss_weights = {"digit": 1.0, "ink": 100.0}
  loss = {"digit": cross_entropy, "ink": squared_error}

  def __init__(self, *, num_validation_examples: int = 1000,
               num_train_examples: Optional[int] = None,
               hidden_units: int = 128):
    """Creates the task.

    Args:
      num_validation_examples: digits at the end held out for validation.
      num_train_examples: use only the first N training digits.
      hidden_units: width of the shared layer and of the digit head's.
    """
    self._num_validation_examples = num_validation_examples
    self._num_train_examples = num_train_examples
    self._hidden_units = hidden_units
    self._splits = None

  def build_dataset(self, split):
    if self._splits is None:
      self._splits = mnist.load_splits(
          dataset="mnist_sample",
          num_validation_examples=self._num_validation_examples,
          num_train_examples=self._num_train_examples, seed=0)
    features, digits = getattr(self._splits, split).examples
    return datasets.InMemory(
        (features, {"digit": digits, "ink": ink_fraction(features)}),
        name=f"mnist_two_heads ({split})")

  def build_model(self):
    """A shared hidden layer, then a hidden layer and an output per head."""
    pixels = keras.Input(shape=(mnist.NUM_FEATURES,), name="pixels")
    shared = keras.layers.Dense(self._hidden_units, activation="relu",
                                name="shared")(pixels)
    digit = keras.layers.Dense(self._hidden_units, activation="relu")(shared)
    ink = keras.layers.Dense(32, activation="relu")(shared)
    return keras.Model(pixels, {
        "digit": keras.layers.Dense(mnist.NUM_CLASSES, name="digit")(digit),
        "ink": keras.layers.Dense(1, name="ink")(ink)}, name="mnist_two_heads")

  def metrics(self):
    return {"digit": [keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
            "ink": [keras.metrics.MeanAbsoluteError(name="mae")]}


def task(config) -> MnistTwoHeadsTask:
  """task_fn for `--task=examples.mnist_two_heads:task`."""
  return MnistTwoHeadsTask(
      num_validation_examples=config.num_validation_examples,
      num_train_examples=config.num_train_examples,
      hidden_units=config.hidden_units)
