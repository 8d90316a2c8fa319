"""Models and data sets that are slow in one phase of a run, each printing a
marker line when it gets there, for tests/test_stop.py."""

import sys
import time

import keras
import tensorflow as tf

from tests.helpers import plugin_fixtures

LONG_S = 120  # Far longer than a test waits: the phase cannot end by itself.


def _mark(text):
  print(f"MARK {text}", file=sys.stderr, flush=True)


def slow_blobs(split, config):
  """plugin_fixtures.blobs, after a long wait in the training split's build."""
  if split == "train":
    _mark("building input")
    time.sleep(LONG_S)
  return plugin_fixtures.blobs(split, config)


def _sleep_op(seconds, text):
  def sleep():
    _mark(text)
    time.sleep(seconds)
    return 0.0
  return tf.ensure_shape(tf.py_function(sleep, [], tf.float32), [])


class _Slow(keras.layers.Layer):
  """A dense layer to 10 logits, slow where `where` says."""

  def __init__(self, where, **kwargs):
    super().__init__(**kwargs)
    self.where = where
    self.dense = keras.layers.Dense(10)

  def build(self, input_shape):
    self.dense.build(input_shape)

  def compute_output_shape(self, input_shape):
    return (*input_shape[:-1], 10)

  def call(self, x, training=False):
    graph = not tf.executing_eagerly()
    if graph and training and self.where == "trace":
      _mark("tracing")
      time.sleep(LONG_S)
    if graph and training and self.where == "step":
      x = x + 0.0 * _sleep_op(0.2, "step")
    if graph and not training and self.where == "validation":
      x = x + 0.0 * _sleep_op(0.5, "validating")
    return self.dense(x)

  def get_config(self):
    if self.where == "export":
      _mark("exporting")
      time.sleep(LONG_S)
    return {**super().get_config(), "where": self.where}


def _model(where):
  inputs = keras.Input(shape=(784,))
  return keras.Model(inputs, _Slow(where)(inputs))


def slow_trace(config):
  del config
  return _model("trace")


def slow_step(config):
  del config
  return _model("step")


def slow_validation(config):
  del config
  return _model("validation")


def slow_export(config):
  del config
  return _model("export")
