"""The weight average through the Python API, in this process: a resume that
turns --ema_decay on for a run whose checkpoint has no average starts it
from the restored weights (and says so), and the warmup rule is the
documented one from there; bad values stop with one line."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from dist_train import config as config_lib
from dist_train import errors
from dist_train import train

# 128 synthetic examples in global batches of 32: 4 steps an epoch; no
# validation; a compiled loop per step, so a callback sees every step.
RUN = dict(dataset="synthetic", num_train_examples=128,
           num_validation_examples=0, global_batch_size=32, hidden_units=8,
           steps_per_loop=1, log_every_steps=1, learning_rate=0.1,
           mode="train")
DECAY, WARMUP = 0.6, 2


@pytest.fixture(scope="module")
def strategy():
  return train.create_strategy(config_lib.Config(model_dir="/tmp/unused"))


class _Record(keras.callbacks.Callback):
  """The model's own weights after each step, by global step."""

  def __init__(self):
    super().__init__()
    self.weights = {}

  def on_train_batch_end(self, batch, logs=None):
    self.weights[batch] = [v.numpy() for v in self.model.trainable_variables]


def _average(model_dir):
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(
      f"{model_dir}/checkpoints"))
  return [reader.get_tensor(f"ema/averages/{i}/.ATTRIBUTES/VARIABLE_VALUE")
          for i in range(6)]


def test_resume_turning_the_average_on_starts_it_from_the_weights(
    tmp_path, strategy, caplog):
  model_dir = str(tmp_path / "run")
  first = _Record()
  train.train_and_evaluate(config_lib.Config(model_dir=model_dir, epochs=1,
                                             **RUN),
                           strategy=strategy, callbacks=[first])
  resumed = _Record()
  # On absl's logger itself: a run earlier in this process may have
  # configured it not to propagate (logs.configure_logging).
  caplog.set_level(logging.INFO, logger="absl")
  absl_logger = logging.getLogger("absl")
  absl_logger.addHandler(caplog.handler)
  try:
    train.train_and_evaluate(
        config_lib.Config(model_dir=model_dir, epochs=3, ema_decay=DECAY,
                          ema_warmup_steps=WARMUP, allow_config_change=True,
                          **RUN),
        strategy=strategy, callbacks=[resumed])
  finally:
    absl_logger.removeHandler(caplog.handler)
  assert "The weight average (--ema_decay=0.6) starts from the weights of " \
      "step 4: the checkpoint has none" in caplog.text
  # A_0 = the weights of step 4; then n = 0, 1, ... counts averaging steps.
  average = first.weights[4]
  for n, step in enumerate(range(5, 13)):
    decay = np.float32(DECAY * min(1.0, n / WARMUP))
    average = [decay * a + (np.float32(1) - decay) * w
               for a, w in zip(average, resumed.weights[step])]
  saved = _average(model_dir)
  difference = max(float(np.max(np.abs(a - b)))
                   for a, b in zip(saved, average))
  lag = max(float(np.max(np.abs(a - b)))
            for a, b in zip(saved, resumed.weights[12]))
  print(f"average vs recurrence {difference:.2e}; vs the weights {lag:.2e}")
  assert difference <= 1e-6
  assert lag > 1e-4


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5])
def test_ema_decay_outside_the_open_interval_is_refused(tmp_path, decay):
  with pytest.raises(config_lib.ConfigError) as raised:
    config_lib.Config(model_dir=str(tmp_path), ema_decay=decay)
  assert str(raised.value) == f"--ema_decay must be in (0, 1), got {decay}"
  assert raised.value.exit_code == errors.EXIT_BAD_INPUT


def test_plateau_without_validation_is_refused(tmp_path, strategy):
  with pytest.raises(errors.DistTrainError) as raised:
    train.train_and_evaluate(
        config_lib.Config(model_dir=str(tmp_path / "run"), epochs=1,
                          **{**RUN, "mode": "train_and_evaluate"},
                          lr_schedule="plateau"), strategy=strategy)
  message = str(raised.value)
  assert message.startswith("--lr_schedule=plateau cuts the rate after "
                            "validation passes, but this run has none")
  assert "\n" not in message
  assert raised.value.exit_code == errors.EXIT_BAD_INPUT
  with pytest.raises(config_lib.ConfigError, match="--mode=train runs none"):
    config_lib.Config(model_dir=str(tmp_path), mode="train",
                      lr_schedule="plateau")
