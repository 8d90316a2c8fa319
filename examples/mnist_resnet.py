"""Example task: a small residual network with BatchNormalization, on the
packaged MNIST digits.

A convolution stem, then residual blocks (two 3x3 convolutions, each
followed by BatchNormalization, added to the block's input), global average
pooling and the class logits. On several replicas `--sync_batchnorm` (on by
default for a model with BatchNormalization) makes every BatchNormalization
layer normalise with the moments of the whole global batch, so the run
makes the updates one device makes (see docs/tasks.md).

    python -m dist_train.main --flagfile=launch/flags/mnist_resnet.cfg \
        --cpu_replicas=2

`--num_validation_examples` digits at the end of the 5,000 are held out,
`--num_train_examples` caps the training digits and `--hidden_units` is the
number of channels of every convolution.
"""

from typing import Optional

import keras

from dist_train import tasks
from dist_train.data import datasets
from dist_train.data import mnist

NUM_BLOCKS = 1


def conv_bn(x, channels: int, name: str):
  """A 3x3 convolution without bias (the normalisation's offset replaces
  it), then BatchNormalization."""
  x = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False,
                          name=f"{name}_conv")(x)
  return keras.layers.BatchNormalization(name=f"{name}_bn")(x)


def residual_block(x, channels: int, name: str):
  """relu(x + bn(conv(relu(bn(conv(x))))))."""
  y = keras.layers.ReLU()(conv_bn(x, channels, f"{name}_a"))
  y = conv_bn(y, channels, f"{name}_b")
  return keras.layers.ReLU()(keras.layers.Add()([x, y]))


def create_model(*, channels: int, num_blocks: int = NUM_BLOCKS
                 ) -> keras.Model:
  """[batch, 784] pixels -> [batch, 10] logits, through a strided stem and
  `num_blocks` residual blocks of `channels` channels."""
  pixels = keras.Input(shape=(mnist.NUM_FEATURES,), name="pixels")
  x = keras.layers.Reshape(mnist.IMAGE_SHAPE + (1,))(pixels)
  x = keras.layers.Conv2D(channels, 3, strides=2, padding="same",
                          use_bias=False, name="stem_conv")(x)
  x = keras.layers.ReLU()(keras.layers.BatchNormalization(name="stem_bn")(x))
  for i in range(num_blocks):
    x = residual_block(x, channels, f"block_{i + 1}")
  x = keras.layers.GlobalAveragePooling2D()(x)
  return keras.Model(pixels, keras.layers.Dense(mnist.NUM_CLASSES,
                                                name="logits")(x),
                     name="mnist_resnet")


class MnistResNetTask(tasks.Task):
  """The digit's class, by a small residual network."""

  def __init__(self, *, num_validation_examples: int = 1000,
               num_train_examples: Optional[int] = None, channels: int = 16):
    """Creates the task.

    Args:
      num_validation_examples: digits at the end held out for validation.
      num_train_examples: use only the first N training digits.
      channels: channels of every convolution.
    """
    self._num_validation_examples = num_validation_examples
    self._num_train_examples = num_train_examples
    self._channels = channels
    self._splits = None

  def build_dataset(self, split):
    if self._splits is None:
      self._splits = mnist.load_splits(
          dataset="mnist_sample",
          num_validation_examples=self._num_validation_examples,
          num_train_examples=self._num_train_examples, seed=0)
    features, digits = getattr(self._splits, split).examples
    return datasets.InMemory((features, digits),
                             name=f"mnist_resnet ({split})")

  def build_model(self):
    return create_model(channels=self._channels)

  def loss(self, labels, outputs):
    return keras.losses.sparse_categorical_crossentropy(labels, outputs,
                                                        from_logits=True)

  def metrics(self):
    return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]


def task(config) -> MnistResNetTask:
  """task_fn for `--task=examples.mnist_resnet:task`."""
  return MnistResNetTask(
      num_validation_examples=config.num_validation_examples,
      num_train_examples=config.num_train_examples,
      channels=config.hidden_units)
