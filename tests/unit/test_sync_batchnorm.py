"""Synchronized BatchNormalization's pieces (dist_train/loop/sync_batchnorm.py):
when it is on and what it warns, the moments it computes from a share's
rows and mask, and the cnn's --batch_norm. Parity on replicas and workers:
tests/e2e/test_sync_batchnorm.py."""

import contextlib
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from dist_train import config as config_lib
from dist_train.loop import sync_batchnorm
from dist_train.models import mnist


class _Block(keras.layers.Layer):
  """A custom layer holding a BatchNormalization: found inside it too."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.dense = keras.layers.Dense(3)
    self.norm = keras.layers.BatchNormalization()

  def call(self, inputs, training=None):
    return self.norm(self.dense(inputs), training=training)


def _model(batch_norm=True):
  inputs = keras.Input((4,))
  x = keras.layers.BatchNormalization()(inputs) if batch_norm else inputs
  x = _Block()(x) if batch_norm else keras.layers.Dense(3)(x)
  return keras.Model(inputs, keras.layers.Dense(2)(x))


@contextlib.contextmanager
def _warnings(caplog):
  """The absl warnings logged inside, as a list filled on exit."""
  lines = []
  caplog.clear()
  absl_logger = logging.getLogger("absl")
  absl_logger.addHandler(caplog.handler)
  caplog.set_level("WARNING", logger="absl")
  try:
    yield lines
  finally:
    absl_logger.removeHandler(caplog.handler)
    # A record reaches the handler once, or twice when absl's logger also
    # propagates to the root logger caplog listens on.
    lines.extend(r.getMessage() for r in dict.fromkeys(caplog.records)
                 if r.levelno == logging.WARNING)


def _resolve(model, **overrides):
  arguments = dict(requested=None, model=model, num_replicas=2,
                   grad_accum_steps=1, own_step=False, jit_compile=False)
  return sync_batchnorm.resolve(**{**arguments, **overrides})


def test_on_by_default_with_batchnorm_and_replicas_nested_layers_included(
    caplog):
  model = _model()
  with _warnings(caplog) as lines:
    layers = _resolve(model)
  assert len(layers) == 2 and all(
      isinstance(l, keras.layers.BatchNormalization) for l in layers)
  assert lines == []


@pytest.mark.parametrize("overrides", [dict(requested=False),
                                       dict(num_replicas=1),
                                       dict(num_replicas=1, requested=True)])
def test_off_when_asked_or_on_one_replica(caplog, overrides):
  with _warnings(caplog) as lines:
    assert _resolve(_model(), **overrides) == []
  assert lines == []


def test_requested_without_batchnorm_is_one_warning_not_an_error(caplog):
  with _warnings(caplog) as lines:
    assert _resolve(_model(batch_norm=False), requested=True) == []
  assert len(lines) == 1
  assert "no BatchNormalization layer" in lines[0]
  with _warnings(caplog) as lines:  # Not asked for: nothing to say.
    assert _resolve(_model(batch_norm=False)) == []
  assert lines == []


def test_accumulation_warns_of_per_micro_batch_statistics(caplog):
  with _warnings(caplog) as lines:
    assert len(_resolve(_model(), grad_accum_steps=2)) == 2
  assert len(lines) == 1
  assert "--grad_accum_steps=2" in lines[0] and "ghost" in lines[0]


def test_own_train_step_keeps_per_replica_statistics_and_says_so(caplog):
  with _warnings(caplog) as lines:
    assert _resolve(_model(), own_step=True) == []
  assert len(lines) == 1 and "own train_step" in lines[0]


def test_jit_compile_leaves_the_forward_pass_uncompiled_and_says_so(caplog):
  with _warnings(caplog) as lines:
    assert len(_resolve(_model(), jit_compile=True)) == 2
  assert len(lines) == 1 and "without XLA" in lines[0]


def _global_moments(x, mask=None, rows=None):
  rows = len(x) if rows is None else rows
  return [t.numpy() for t in sync_batchnorm.global_moments(
      tf.constant(x), None if mask is None else tf.constant(mask), axis=-1,
      rows=tf.constant(rows),
      replica_context=tf.distribute.get_replica_context())]


def test_moments_count_only_the_share_rows():
  """With one replica the all-reduce is the identity: the moments are those
  of the first `rows` rows, whatever the rows after them hold."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 3, 4)).astype(np.float32) + 3
  mean, variance = _global_moments(x)
  expected = tf.nn.moments(x, axes=[0, 1])
  np.testing.assert_allclose(mean, expected[0], atol=1e-6)
  np.testing.assert_allclose(variance, expected[1], atol=1e-6)
  padded = np.concatenate([x[:4], np.full((1, 3, 4), np.nan, np.float32)])
  mean, variance = _global_moments(padded, rows=4)
  expected = tf.nn.moments(x[:4], axes=[0, 1])
  np.testing.assert_allclose(mean, expected[0], atol=1e-6)
  np.testing.assert_allclose(variance, expected[1], atol=1e-6)
  # A share of no rows: zeros, not NaN, and nothing counted.
  mean, variance = _global_moments(padded[:1], rows=0)
  assert np.all(mean == 0) and np.all(variance == 0)


def test_masked_moments_are_keras_masked_moments():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 5, 2)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
  layer = keras.layers.BatchNormalization()
  layer.build(x.shape)
  expected = layer._moments(tf.constant(x), tf.constant(mask))  # pylint: disable=protected-access
  mean, variance = _global_moments(x, mask)
  np.testing.assert_allclose(mean, expected[0], atol=1e-6)
  np.testing.assert_allclose(variance, expected[1], atol=1e-6)


def test_synchronized_layers_compute_their_own_moments_outside_the_step():
  model = _model()
  layers = _resolve(model)
  local = layers[0]._moments  # pylint: disable=protected-access
  sync_batchnorm.synchronize(layers)
  sync_batchnorm.synchronize(layers)  # A second Trainer: still one wrapper.
  assert layers[0]._moments.local_moments == local  # pylint: disable=protected-access
  x = np.random.default_rng(2).normal(size=(6, 4)).astype(np.float32)
  outputs = model(x, training=True)
  assert np.all(np.isfinite(outputs))
  np.testing.assert_allclose(layers[0].moving_mean.numpy(),
                             0.01 * x.mean(axis=0), atol=1e-6)


def test_cnn_batch_norm_follows_each_convolution():
  model = mnist.create_cnn(hidden_units=8, batch_norm=True)
  norms = [l for l in model.layers
           if isinstance(l, keras.layers.BatchNormalization)]
  assert [l.name for l in norms] == ["batch_norm_1", "batch_norm_2"]
  assert not any(l.use_bias for l in model.layers
                 if isinstance(l, keras.layers.Conv2D))
  assert not [l for l in mnist.create_cnn(hidden_units=8).layers
              if isinstance(l, keras.layers.BatchNormalization)]


def test_batch_norm_is_a_cnn_flag_and_both_flags_define_the_run():
  with pytest.raises(config_lib.ConfigError, match="--model=mlp"):
    config_lib.validate(config_lib.Config(model_dir="/tmp/x", model="mlp",
                                          batch_norm=True))
  config_lib.validate(config_lib.Config(model_dir="/tmp/x", model="cnn",
                                        batch_norm=True))
  assert {"batch_norm", "sync_batchnorm"} <= set(
      config_lib.RUN_DEFINING_OPTIONS)
