"""A linear regression whose every step can be computed by hand, for the
training-health tests (--task=tests.helpers.health_task:<function>).

23 training examples read in order (--shuffle_buffer=1) in global batches
of 6: 4 steps an epoch (6, 6, 6 and 5 examples: uneven shares on 2
replicas), through one Dense unit with fixed initial weights, by the mean
squared error. `reference_gradients` replays plain SGD in NumPy and returns
each step's gradient of the global batch.
"""

import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

from dist_train import tasks

NUM_TRAIN = 23
NUM_VALIDATION = 8
GLOBAL_BATCH_SIZE = 6
FEATURES = 4
INITIAL_KERNEL = np.array([[0.5], [-0.25], [0.125], [1.0]], np.float32)
INITIAL_BIAS = np.array([0.1], np.float32)
# Seconds worker 1 (of TF_CONFIG) sleeps per example read, in slow_input:
# 60 ms a step (3 examples), far above what the other worker's step takes
# even when the suite's other runs share its cores (15 ms was not: a busy
# machine once made the chief the slower in an interval).
SLEEP_PER_EXAMPLE_S = 0.02
# In overflow_at_step: the target of the first example of global step 3,
# whose gradient overflows float16 at the initial loss scale (2**15) but not
# the float32 loss.
OVERFLOW_STEP = 3
OVERFLOW_TARGET = 100.0


def examples(split, num_train=NUM_TRAIN):
  """(features, targets) of `split`, fixed by its name."""
  rng = np.random.default_rng(7 if split == "train" else 8)
  size = num_train if split == "train" else NUM_VALIDATION
  features = rng.normal(scale=0.5, size=(size, FEATURES)).astype(np.float32)
  targets = (0.3 * np.tanh(features.sum(axis=1, keepdims=True))).astype(
      np.float32)
  return features, targets


class LinearHealth(tasks.Task):
  """y = x.w + b by the mean squared error."""

  def __init__(self, config, *, slow_worker=None, overflow=False,
               num_train=NUM_TRAIN):
    del config
    self._num_train = num_train
    task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {})
    self._slow = slow_worker is not None and task.get("index") == slow_worker
    self._overflow = overflow

  def build_model(self):
    inputs = keras.Input(shape=(FEATURES,))
    outputs = keras.layers.Dense(
        1, kernel_initializer=keras.initializers.Constant(INITIAL_KERNEL),
        bias_initializer=keras.initializers.Constant(INITIAL_BIAS))(inputs)
    return keras.Model(inputs, outputs)

  def build_dataset(self, split):
    features, targets = examples(split, self._num_train)
    if self._overflow and split == "train":
      targets = targets.copy()
      targets[(OVERFLOW_STEP - 1) * GLOBAL_BATCH_SIZE] = OVERFLOW_TARGET
    dataset = tf.data.Dataset.from_tensor_slices((features, targets))
    if self._slow:
      def sleep(x):
        time.sleep(SLEEP_PER_EXAMPLE_S)
        return x
      dataset = dataset.map(lambda x, y: (
          tf.numpy_function(sleep, [x], tf.float32, stateful=True), y))
      dataset = dataset.map(lambda x, y: (tf.ensure_shape(x, [FEATURES]), y))
    return dataset

  def loss(self, labels, outputs):
    return keras.losses.mean_squared_error(labels, outputs)


def linear(config):
  return LinearHealth(config)


# slow_input's examples: 20 steps an epoch, so that the steps, not the
# pauses between loops (when the input reads ahead), take most of the time.
SLOW_INPUT_NUM_TRAIN = 120


def slow_input(config):
  """Worker 1 of TF_CONFIG reads its input slowly."""
  return LinearHealth(config, slow_worker=1, num_train=SLOW_INPUT_NUM_TRAIN)


def overflow_at_step(config):
  return LinearHealth(config, overflow=True)


def reference_gradients(num_steps, learning_rate, clip_norm=None):
  """[(gradient of the kernel, of the bias)] of each global step 1..N of
  SGD on global batches of GLOBAL_BATCH_SIZE, read in order, epoch after
  epoch, computed in float64 from the initial weights."""
  return reference_run(num_steps, learning_rate, clip_norm)[0]


def reference_run(num_steps, learning_rate, clip_norm=None,
                  num_train=NUM_TRAIN):
  """(each step's gradient, the weights (kernel, bias) after each step)."""
  features, targets = (a.astype(np.float64)
                       for a in examples("train", num_train))
  kernel = INITIAL_KERNEL.astype(np.float64)
  bias = INITIAL_BIAS.astype(np.float64)
  starts = list(range(0, num_train, GLOBAL_BATCH_SIZE))
  gradients, weights = [], []
  for step in range(num_steps):
    begin = starts[step % len(starts)]
    x = features[begin:begin + GLOBAL_BATCH_SIZE]
    y = targets[begin:begin + GLOBAL_BATCH_SIZE]
    error = x @ kernel + bias - y  # d(mean of error**2)/d(prediction) * n/2.
    grad_kernel = 2 * x.T @ error / len(x)
    grad_bias = 2 * error.sum(axis=0) / len(x)
    gradients.append((grad_kernel, grad_bias))
    scale = 1.0
    if clip_norm is not None:
      norm = np.sqrt((grad_kernel**2).sum() + (grad_bias**2).sum())
      scale = clip_norm / max(norm, clip_norm)
    kernel = kernel - learning_rate * scale * grad_kernel
    bias = bias - learning_rate * scale * grad_bias
    weights.append((kernel, bias))
  return gradients, weights


def norm(gradient) -> float:
  return float(np.sqrt(sum((g**2).sum() for g in gradient)))
