"""The compiled training loop: loops of any length share one trace, and the
health's measurements (health.py) change no update."""

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


def test_the_health_keeps_the_last_steps_norm_and_changes_no_update():
  """The health on, in the same traced step: 5 steps train and report as
  without it, also when the last 3 run timed, as with several workers (a
  version of the loop of their own, carrying the same loss sums); without
  timed steps, one trace serves loops with and without a measured step.
  Only a measured loop keeps a gradient norm, its last step's: 4 plain
  steps then a measured one keep the norm that 5 steps measured at the
  fifth keep."""
  strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
  rng = np.random.default_rng(0)
  batches = [(rng.normal(size=[8, 784]).astype(np.float32),
              rng.integers(0, 10, size=[8]).astype(np.int32))
             for _ in range(5)]
  with strategy.scope():
    models = {name: mnist.create_mlp(hidden_units=4)
              for name in ("plain", "measured", "split")}
  initial = models["plain"].get_weights()
  for model in models.values():
    model.set_weights(initial)

  def trainer_of(name):
    model = models[name]
    health = None if name == "plain" else health_lib.StepHealth(
        strategy=strategy, variables=model.trainable_variables,
        timed_steps=3 if name == "measured" else 0)
    iterator = iter(tf.data.Dataset.from_tensor_slices(
        tuple(np.stack(parts) for parts in zip(*batches))))
    return _trainer(strategy, model, health=health), health, iterator

  plain, _, iterator = trainer_of("plain")
  plain_losses = plain.train_steps(iterator, 5)
  measured, measured_health, iterator = trainer_of("measured")
  measured_losses = measured.train_steps(iterator, 5, measure=True)
  assert measured_losses.keys() == plain_losses.keys()
  for term, value in plain_losses.items():
    assert abs(measured_losses[term] - value) <= 1e-6, term
  moved = max(np.max(np.abs(w - i)) for w, i in
              zip(models["plain"].get_weights(), initial))
  assert moved > 1e-3
  for a, b in zip(models["measured"].get_weights(),
                  models["plain"].get_weights()):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  assert measured.last_timed_steps == 3
  kept = measured_health.take()
  assert kept["gradient_norm"] > 0 and kept["compute_seconds"] > 0

  split, split_health, iterator = trainer_of("split")
  split.train_steps(iterator, 4)
  assert split_health.take()["gradient_norm"] == 0.0  # Nothing measured.
  split.train_steps(iterator, 1, measure=True)
  assert split.train_traces == 1
  np.testing.assert_allclose(split_health.take()["gradient_norm"],
                             kept["gradient_norm"], rtol=1e-6)
