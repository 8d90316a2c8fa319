"""The loss-scaling contract: the shares of a global batch add up to the
single-device objective.

These tests split one global batch by hand (into replicas, micro-batches, or
both), so they check the arithmetic of `losses.py` without a strategy;
tests/test_parity.py and tests/test_tasks.py check whole training steps.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dist_train.loop import losses

RNG = np.random.default_rng(0)
# A global batch of 10 sequences of 4 tokens, with a padding mask.
PER_TOKEN = RNG.uniform(0.1, 2.0, size=(10, 4)).astype(np.float32)
MASK = (RNG.random((10, 4)) < 0.6).astype(np.float32)


def _shares(sizes):
  start = 0
  for size in sizes:
    yield slice(start, start + size)
    start += size


@pytest.mark.parametrize("sizes", [(5, 5), (4, 3, 3), (10, 0), (1, 2, 3, 4),
                                   (0, 0, 10)])
def test_weighted_shares_add_up_to_the_global_weighted_mean(sizes):
  divisor = losses.weight_sum(MASK)  # From the whole global batch.
  total = sum(float(losses.share_of_mean(PER_TOKEN[s], MASK[s], divisor))
              for s in _shares(sizes))
  expected = (PER_TOKEN * MASK).sum() / MASK.sum()
  assert total == pytest.approx(expected, rel=1e-6)
  # What a per-share mean would give instead: not the objective.
  per_share = [(PER_TOKEN[s] * MASK[s]).sum() / MASK[s].sum()
               for s in _shares(sizes) if MASK[s].sum() > 0]
  if len(per_share) > 1:
    assert np.mean(per_share) != pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("sizes", [(5, 5), (3, 3, 4), (9, 1)])
def test_unweighted_shares_divide_by_the_global_element_count(sizes):
  total = 0.0
  for s in _shares(sizes):
    divisor = losses.element_count(PER_TOKEN[s], num_examples=10)
    total += float(losses.share_of_mean(PER_TOKEN[s], None, divisor))
  assert total == pytest.approx(PER_TOKEN.mean(), rel=1e-6)


def test_zero_weight_sum_contributes_zero_not_nan():
  term = losses.share_of_mean(PER_TOKEN[:2], np.zeros((2, 4), np.float32),
                              tf.constant(0.0))
  assert float(term) == 0.0


@pytest.mark.parametrize("num_shares", [1, 2, 6])
def test_regularization_shares_count_it_once(num_shares):
  layer = keras.layers.Dense(2, kernel_regularizer=keras.regularizers.L2(0.1),
                             kernel_initializer="ones")
  model = keras.Sequential([keras.Input((3,)), layer])
  share = float(losses.regularization_share(model, num_shares))
  assert share * num_shares == pytest.approx(0.1 * 6)


VALUES = np.linspace(0.1, 2.0, 10).astype(np.float32)


@pytest.mark.parametrize("sizes", [(5, 5), (4, 3, 3), (10, 0), (1, 2, 3, 4)])
def test_sum_add_loss_terms_add_up(sizes):
  """A sum-type add_loss term over a share sums to the term over the batch."""
  total = sum(float(losses.add_loss_share(
      [tf.constant(0.3 * VALUES[s].sum())], num_examples=s.stop - s.start,
      global_num_examples=10, reduction="sum")) for s in _shares(sizes))
  assert total == pytest.approx(0.3 * VALUES.sum(), rel=1e-6)


@pytest.mark.parametrize("sizes", [(5, 5), (4, 3, 3), (10, 0), (1, 2, 3, 4)])
def test_mean_add_loss_terms_are_weighted_by_example_share(sizes):
  """A mean-type term (0 for an empty share, as Keras' divide_no_nan gives)."""
  def mean_term(s):
    return 0.3 * VALUES[s].mean() if s.stop > s.start else 0.0
  total = sum(float(losses.add_loss_share(
      [tf.constant(mean_term(s))], num_examples=s.stop - s.start,
      global_num_examples=10, reduction="mean")) for s in _shares(sizes))
  assert total == pytest.approx(0.3 * VALUES.mean(), rel=1e-6)


def test_unknown_reduction_is_refused():
  with pytest.raises(ValueError, match="got 'max'"):
    losses.add_loss_share([], num_examples=1, global_num_examples=1,
                          reduction="max")


def test_pack_and_unpack_keep_the_names():
  names = ("loss", "cross_entropy", "regularization", "add_loss")
  terms = {name: tf.constant(float(i)) for i, name in enumerate(names)}
  unpacked = losses.unpack(losses.pack(terms, names), names)
  assert {k: float(v) for k, v in unpacked.items()} == {
      name: float(i) for i, name in enumerate(names)}


def test_add_losses_are_collected_per_call():
  """Terms come from this call only, and the layer keeps none of them."""
  inputs = keras.Input((3,))
  outputs = keras.layers.Dense(
      2, activity_regularizer=keras.regularizers.L1(1.0))(inputs)
  model = keras.Model(inputs, outputs)
  x = tf.constant([[1.0, -2.0, 3.0]])
  outputs, terms = losses.call_collecting_add_losses(model, x, training=True)
  assert len(terms) == 1
  expected = float(tf.reduce_sum(tf.abs(outputs)))  # L1, batch of 1.
  assert float(terms[0]) == pytest.approx(expected, rel=1e-6)
  _, terms_again = losses.call_collecting_add_losses(model, 2 * x,
                                                     training=True)
  assert float(terms_again[0]) != pytest.approx(float(terms[0]))
  assert not model.losses


def test_state_updates_are_written_back():
  """BatchNormalization's moving mean still updates inside the scope."""
  inputs = keras.Input((2,))
  outputs = keras.layers.BatchNormalization(momentum=0.5)(inputs)
  model = keras.Model(inputs, outputs)
  losses.call_collecting_add_losses(
      model, tf.constant([[2.0, 4.0], [4.0, 8.0]]), training=True)
  moving_mean = model.layers[-1].moving_mean.numpy()
  np.testing.assert_allclose(moving_mean, [1.5, 3.0], rtol=1e-6)


def test_regularization_losses_come_from_weights():
  layer = keras.layers.Dense(2, kernel_regularizer=keras.regularizers.L2(0.1),
                             kernel_initializer="ones")
  model = keras.Sequential([keras.Input((3,)), layer])
  [term] = losses.regularization_losses(model)
  assert float(term) == pytest.approx(0.1 * 6)
