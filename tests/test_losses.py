"""The loss-scaling contract: replicas' scaled terms add up to the 1-device loss.

These tests split one global batch by hand, so they check the arithmetic of
`replica_loss` without a strategy; tests/test_parity.py checks the whole step.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dist_train.loop import losses


def _single_and_split(per_example, add_terms, reduction, splits, reg=0.5):
  """Returns (1-device total, sum over replicas of their scaled totals)."""
  per_example = tf.constant(per_example, tf.float32)
  n = int(per_example.shape[0])
  single = losses.replica_loss(
      per_example_loss=per_example, global_num_examples=n,
      add_losses=[tf.constant(add_terms(0, n))], weight_regularization=[reg],
      num_replicas=1, add_loss_reduction=reduction).total
  total, start = 0.0, 0
  for size in splits:
    total += losses.replica_loss(
        per_example_loss=per_example[start:start + size],
        global_num_examples=n,
        add_losses=[tf.constant(add_terms(start, start + size))],
        weight_regularization=[reg], num_replicas=len(splits),
        add_loss_reduction=reduction).total
    start += size
  return float(single), float(total)


VALUES = np.linspace(0.1, 2.0, 10).astype(np.float32)


@pytest.mark.parametrize("splits", [(5, 5), (4, 3, 3), (10, 0), (1, 2, 3, 4)])
def test_sum_terms_add_up(splits):
  """A sum-type add_loss term over a slice sums to the term over the batch."""
  single, split = _single_and_split(
      VALUES, lambda a, b: 0.3 * VALUES[a:b].sum(), "sum", splits)
  assert split == pytest.approx(single, rel=1e-6)


@pytest.mark.parametrize("splits", [(5, 5), (4, 3, 3), (10, 0), (1, 2, 3, 4)])
def test_mean_terms_are_weighted_by_example_share(splits):
  """A mean-type term (0 for an empty slice, as Keras' divide_no_nan gives)."""
  def mean_term(a, b):
    return 0.3 * VALUES[a:b].mean() if b > a else 0.0
  single, split = _single_and_split(VALUES, mean_term, "mean", splits)
  assert split == pytest.approx(single, rel=1e-6)


def test_partial_batch_divides_by_actual_examples():
  loss = losses.replica_loss(
      per_example_loss=tf.constant([1.0, 3.0]), global_num_examples=3,
      add_losses=[], weight_regularization=[], num_replicas=2,
      add_loss_reduction="mean")
  assert float(loss.cross_entropy) == pytest.approx(4.0 / 3.0)
  assert float(loss.add_loss) == 0.0


def test_unknown_reduction_is_refused():
  with pytest.raises(ValueError, match="got 'max'"):
    losses.replica_loss(per_example_loss=tf.constant([1.0]),
                        global_num_examples=1, add_losses=[],
                        weight_regularization=[], num_replicas=1,
                        add_loss_reduction="max")


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
