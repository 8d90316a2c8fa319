"""Tasks whose loss spikes on marked global batches
(--task=tests.helpers.spike_fixtures:...), for tests/e2e/test_spike_recovery.py.

A regression read in order (--shuffle_buffer=1) in global batches of 8: the
batch of step s holds rows 8(s-1) .. 8s-1. The marker is in the data, not in
the step count, so a run that skips the marked batch does not meet it again,
and one that replays it does. A label's second column marks its row: 1
multiplies its squared error by SPIKE_FACTOR (a spike that moves the
weights far), 2 makes it NaN (gradients too, so the weights turn NaN).
"""

import keras
import numpy as np
import tensorflow as tf

from dist_train import tasks
from dist_train.data import datasets

NUM_TRAIN = 96
GLOBAL_BATCH_SIZE = 8
SPIKE_FACTOR = 1000.0
SPIKE_STEP = 7  # The marked batch of `spiking` and `spiking_nan`.
EARLY_SPIKE_STEP = 2  # Of `spiking_early`, before the first checkpoint.


class SpikingRegression(tasks.Task):
  """y = tanh(x0 + x1) from 4 features; the rows of `marked_step`'s batch
  carry `marker`, and the batches of `dropped_steps` are left out. With
  `in_memory`, the split is random access (datasets.InMemory): each step's
  batch is gathered by indices that the data position (epoch, step in the
  epoch) determines, not read from a stream."""

  def __init__(self, config, *, marked_step=SPIKE_STEP, marker=1,
               dropped_steps=(), in_memory=False):
    self._config = config
    self._in_memory = in_memory
    self._marked_step = marked_step
    self._marker = marker
    self._dropped_steps = tuple(dropped_steps)

  def build_model(self):
    inputs = keras.Input(shape=(4,))
    hidden = keras.layers.Dense(8, activation="tanh", name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(1, name="value")(hidden))

  def build_dataset(self, split):
    rng = np.random.default_rng(self._config.seed + (split == "validation"))
    size = NUM_TRAIN if split == "train" else 16
    features = rng.normal(size=(size, 4)).astype(np.float32)
    labels = np.zeros((size, 2), np.float32)
    labels[:, 0] = np.tanh(features[:, :2].sum(axis=1))
    if split == "train":
      labels[_rows(self._marked_step), 1] = self._marker
      keep = np.ones(size, bool)
      for step in self._dropped_steps:
        keep[_rows(step)] = False
      features, labels = features[keep], labels[keep]
    if self._in_memory:
      return datasets.InMemory((features, labels), name=f"spiking {split}")
    return tf.data.Dataset.from_tensor_slices((features, labels))

  def loss(self, labels, outputs):
    squared_error = tf.square(labels[:, 0] - outputs[:, 0])
    marker = labels[:, 1]
    factor = tf.where(marker == 1.0, SPIKE_FACTOR, 1.0)
    factor = tf.where(marker == 2.0, float("nan"), factor)
    return squared_error * factor


def _rows(step):
  return slice((step - 1) * GLOBAL_BATCH_SIZE, step * GLOBAL_BATCH_SIZE)


def spiking(config):
  return SpikingRegression(config)


def spiking_in_memory(config):
  return SpikingRegression(config, in_memory=True)


def spiking_nan(config):
  return SpikingRegression(config, marker=2)


def spiking_early(config):
  return SpikingRegression(config, marked_step=EARLY_SPIKE_STEP)


def spiking_without_steps_5_to_8(config):
  """`spiking` less the batches of steps 5-8: what a run that rolls back
  from the spike (seen at step 8, the end of the loop of steps 7-8) to its
  checkpoint of step 4 goes on with."""
  return SpikingRegression(config, dropped_steps=(5, 6, 7, 8))
