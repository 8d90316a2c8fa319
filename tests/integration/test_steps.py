"""The compiled training loop: loops of any length share one trace, and a
loop ending at a log step (measured) trains and reports as a plain one."""

import keras
import numpy as np
import tensorflow as tf

from dist_train import config as config_lib
from dist_train.loop import health as health_lib
from dist_train.loop import steps
from dist_train.tasks import classification
from dist_train.models import mnist
from tests.helpers import global_batches


def _trainer(strategy, model, *, health=None, learning_rate=0.1):
  with strategy.scope():
    optimizer = keras.optimizers.SGD(learning_rate=learning_rate)
    optimizer.build(model.trainable_variables)
  return steps.Trainer(strategy=strategy,
                       task=classification.ClassificationTask(
                           config_lib.Config(model_dir="/tmp/unused")),
                       model=model, optimizer=optimizer,
                       add_loss_reduction="mean",
                       train_input=global_batches.GlobalBatches(strategy),
                       health=health)


def test_loops_of_different_lengths_share_one_trace():
  strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
  with strategy.scope():
    model = mnist.create_mlp(hidden_units=4)
  trainer = _trainer(strategy, model, learning_rate=0.01)
  optimizer = trainer.optimizer
  batch = (np.zeros([8, 784], np.float32), np.arange(8, dtype=np.int32))
  iterator = iter(tf.data.Dataset.from_tensors(batch).repeat())
  assert trainer.train_traces == 0
  for num_steps in (3, 1, 2):
    losses = trainer.train_steps(iterator, num_steps)
    assert trainer.train_traces == 1, num_steps
    assert np.isfinite(losses["loss"])
  assert int(optimizer.iterations.numpy()) == 3 + 1 + 2


def _while_loops(trainer, measure):
  """The While ops of the traced loop (`measure`: its measured version)."""
  function = trainer.trace_train_steps(
      iter(tf.data.Dataset.from_tensors(
          (np.zeros([8, 784], np.float32), np.zeros([8], np.int32)))),
      measure=measure)
  return [op for op in function.graph.get_operations()
          if op.type in ("While", "StatelessWhile")]


def test_a_measured_loop_trains_and_reports_as_a_plain_one():
  """5 steps ending at a log step: the plain steps, then the timed ones
  (the last measured) in a call of their own, carrying the same loss sums:
  the weights and the loss means are those of 5 plain steps. The measured
  version holds the timed steps only: no loop at all when only the measured
  step is timed (one worker), not a copy of the whole loop."""
  strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
  rng = np.random.default_rng(0)
  batches = [(rng.normal(size=[8, 784]).astype(np.float32),
              rng.integers(0, 10, size=[8]).astype(np.int32))
             for _ in range(5)]
  with strategy.scope():
    plain_model = mnist.create_mlp(hidden_units=4)
    measured_model = mnist.create_mlp(hidden_units=4)
  measured_model.set_weights(plain_model.get_weights())
  initial = plain_model.get_weights()
  results = {}
  for name, model, timed_steps in (("plain", plain_model, None),
                                   ("measured", measured_model, 3)):
    health = (None if timed_steps is None else health_lib.StepHealth(
        strategy=strategy, variables=model.trainable_variables,
        timed_steps=timed_steps))
    trainer = _trainer(strategy, model, health=health)
    iterator = iter(tf.data.Dataset.from_tensor_slices(
        tuple(np.stack(parts) for parts in zip(*batches))))
    results[name] = trainer.train_steps(iterator, 5,
                                        measure=health is not None)
    assert int(trainer.optimizer.iterations.numpy()) == 5
    if health is not None:
      assert trainer.last_timed_steps == 3
      assert health.take()["gradient_norm"] > 0
  assert results["measured"].keys() == results["plain"].keys()
  for term, value in results["plain"].items():
    assert abs(results["measured"][term] - value) <= 1e-6, term
  moved = max(np.max(np.abs(w - i)) for w, i in
              zip(plain_model.get_weights(), initial))
  assert moved > 1e-3
  for a, b in zip(measured_model.get_weights(), plain_model.get_weights()):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)

  with strategy.scope():
    models = [mnist.create_mlp(hidden_units=4) for _ in range(2)]
  one_worker = _trainer(strategy, models[0],
                        health=health_lib.StepHealth(strategy=strategy,
                                                     timed_steps=1))
  assert len(_while_loops(one_worker, measure=False)) == 1
  assert not _while_loops(one_worker, measure=True)
  several = _trainer(strategy, models[1],
                     health=health_lib.StepHealth(strategy=strategy,
                                                  timed_steps=3))
  assert len(_while_loops(several, measure=True)) == 1  # The timed steps.
