"""User models with a built-in quirk, loaded by import path in tests
(--model=tests.helpers.model_fixtures:...): the reference MLP with one extra
layer that passes its input through."""

import time

import keras

from dist_train.models import mnist

# How long tracing the training step of `slow_first_trace` takes, at least.
TRACE_SECONDS = 4.0
# The training call from which `nan_weight_from_step_8` holds a NaN weight.
NAN_FROM_CALL = 8


class SleepWhileTracing(keras.layers.Layer):
  """Sleeps in Python on a training call: only while the compiled training
  loop is traced, never when it runs again."""

  def call(self, inputs, training=None):
    if training:
      time.sleep(TRACE_SECONDS)
    return inputs


class NaNWeightFrom(keras.layers.Layer):
  """Counts its training calls in a non-trainable weight, and sets another,
  `poison`, to NaN from call `nan_from` on. Neither touches the output, so
  every loss stays finite: only the check of the weights can see it."""

  def __init__(self, nan_from, **kwargs):
    super().__init__(**kwargs)
    self.nan_from = nan_from

  def build(self, input_shape):
    del input_shape
    self.calls = self.add_weight(shape=(), initializer="zeros",
                                 trainable=False, name="calls",
                                 aggregation="only_first_replica")
    self.poison = self.add_weight(shape=(), initializer="zeros",
                                  trainable=False, name="poison",
                                  aggregation="only_first_replica")

  def call(self, inputs, training=None):
    if training:
      calls = self.calls + 1.0
      self.calls.assign(calls)
      self.poison.assign(keras.ops.where(calls >= self.nan_from,
                                         float("nan"), 0.0))
    return inputs


def _mlp_with(layer, config):
  mlp = mnist.create_mlp(hidden_units=config.hidden_units)
  inputs = keras.Input(shape=mlp.inputs[0].shape[1:])
  return keras.Model(inputs, mlp(layer(inputs)))


def slow_first_trace(config):
  return _mlp_with(SleepWhileTracing(name="sleep_while_tracing"), config)


def nan_weight_from_step_8(config):
  return _mlp_with(NaNWeightFrom(NAN_FROM_CALL, name="nan_weight"), config)
