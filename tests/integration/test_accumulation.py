"""Gradient accumulation in the compiled step.

The micro-batches of a model without state updates run as one loop, so the
forward and backward pass is traced once whatever --grad_accum_steps; its
sums are one device's on the whole batch, empty micro-batches included. A
model with state updates (BatchNormalization's moving statistics, assigned
after each micro-batch) is unrolled instead, and still makes the update of a
hand-written loop over the same micro-batches. The parity of the loop over
replicas is proved by e2e/test_tasks.py and e2e/test_model_families.py.
"""

import keras
import numpy as np
import tensorflow as tf

from dist_train import config as config_lib
from dist_train.loop import steps
from dist_train.tasks import classification
from tests.helpers import global_batches

LEARNING_RATE = 0.5
NUM_CLASSES = 3


def _model(batchnorm):
  inputs = keras.Input((6,))
  x = keras.layers.Dense(5, activation="tanh")(inputs)
  if batchnorm:
    x = keras.layers.BatchNormalization(momentum=0.5)(x)
  return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(x))


def _trainer(strategy, model, grad_accum_steps):
  with strategy.scope():
    optimizer = keras.optimizers.SGD(learning_rate=LEARNING_RATE)
    optimizer.build(model.trainable_variables)
  return steps.Trainer(
      strategy=strategy,
      task=classification.ClassificationTask(
          config_lib.Config(model_dir="/tmp/unused")),
      model=model, optimizer=optimizer, add_loss_reduction="mean",
      grad_accum_steps=grad_accum_steps, sync_batchnorm=False,
      train_input=global_batches.GlobalBatches(strategy))


def _batches(sizes):
  rng = np.random.default_rng(1)
  return [(rng.normal(size=[n, 6]).astype(np.float32),
           rng.integers(0, NUM_CLASSES, size=[n]).astype(np.int32))
          for n in sizes]


def _iterator(batches):
  return iter(tf.data.Dataset.from_generator(
      lambda: iter(batches),
      output_signature=(tf.TensorSpec([None, 6], tf.float32),
                        tf.TensorSpec([None], tf.int32))))


def _forward_and_backward_matmuls(trainer, batches):
  """MatMul ops in the traced loop and every function it calls: each trace
  of the model's forward and backward pass adds the same number."""
  function = trainer.trace_train_steps(_iterator(batches))
  graph_def = function.graph.as_graph_def()
  nodes = [node for f in graph_def.library.function for node in f.node_def]
  return sum(node.op == "MatMul" for node in [*graph_def.node, *nodes])


def _train(grad_accum_steps, batchnorm, batches, initial=None):
  """(trainer, initial weights, weights after one step per batch)."""
  strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
  with strategy.scope():
    model = _model(batchnorm)
  if initial is not None:
    model.set_weights(initial)
  initial = model.get_weights()
  trainer = _trainer(strategy, model, grad_accum_steps)
  trainer.train_steps(_iterator(batches), len(batches))
  return trainer, initial, model.get_weights()


def _max_difference(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def test_micro_batches_of_a_stateless_model_are_one_loop_traced_once():
  """4 micro-batches trace the pass once, as 1 does, and train as one
  device on the whole batch: batches of 8, 7 and 3 rows (micro-batches of
  2, 1 or 2, and 0 or 1: one empty)."""
  batches = _batches([8, 7, 3])
  one, initial, whole = _train(1, batchnorm=False, batches=batches)
  four, _, accumulated = _train(4, batchnorm=False, batches=batches,
                                initial=initial)
  matmuls = _forward_and_backward_matmuls(one, batches)
  assert matmuls > 0
  assert _forward_and_backward_matmuls(four, batches) == matmuls
  assert _max_difference(whole, initial) > 1e-2
  assert _max_difference(accumulated, whole) < 1e-6


def _hand_written(initial, batches, grad_accum_steps):
  """One device, eagerly: each micro-batch's forward pass (updating the
  moving statistics) and gradient of its share of the global batch's mean
  cross-entropy, summed and applied once per batch by plain SGD."""
  model = _model(batchnorm=True)
  model.set_weights(initial)
  for features, labels in batches:
    rows = len(labels)
    summed = [tf.zeros_like(v) for v in model.trainable_variables]
    for m in range(grad_accum_steps):
      part = slice(rows * m // grad_accum_steps,
                   rows * (m + 1) // grad_accum_steps)
      with tf.GradientTape() as tape:
        logits = model(features[part], training=True)
        loss = tf.reduce_sum(classification.cross_entropy(
            labels[part], logits)) / rows
      summed = [s + g for s, g in zip(
          summed, tape.gradient(loss, model.trainable_variables))]
    for variable, gradient in zip(model.trainable_variables, summed):
      variable.assign_sub(LEARNING_RATE * gradient)
  return model.get_weights()


def test_a_model_with_state_updates_is_unrolled_and_matches_by_hand():
  """BatchNormalization assigns its moving statistics after every
  micro-batch (a merge_call, which a replica's loop cannot hold): the two
  micro-batches are traced apart, and the weights and moving statistics are
  those of the hand-written loop over the same micro-batches."""
  batches = _batches([8, 6])
  one, initial, _ = _train(1, batchnorm=True, batches=batches)
  two, _, trained = _train(2, batchnorm=True, batches=batches,
                           initial=initial)
  assert (_forward_and_backward_matmuls(two, batches) ==
          2 * _forward_and_backward_matmuls(one, batches))
  reference = _hand_written(initial, batches, grad_accum_steps=2)
  assert len(trained) == len(reference) == 8  # Moving statistics included.
  assert _max_difference(trained, initial) > 1e-2
  assert _max_difference(trained, reference) < 1e-5
