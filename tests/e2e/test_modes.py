"""Train, evaluate and export modes, and the schedule seen in TensorBoard."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from dist_train import train
from dist_train import config as config_lib
from dist_train.models import mnist
from dist_train.outputs import summaries
from tests.helpers import processes

CPU_TEST_FLAGS = f"--flagfile={processes.FLAGS_DIR}/cpu_test.cfg"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 2-replica run with a step schedule and a SavedModel export."""
  model_dir = str(tmp_path_factory.mktemp("modes") / "run")
  processes.run_cli(CPU_TEST_FLAGS, f"--model_dir={model_dir}",
                   "--lr_schedule=step", "--lr_boundaries=10,20",
                   "--lr_decay_factor=0.5", "--export_saved_model",
                   check=True)
  return model_dir


def test_learning_rate_in_tensorboard_follows_the_schedule(trained):
  rates = dict(summaries.read_scalars(os.path.join(trained, "train"))[
      "learning_rate"])
  # The rate of the next update after `step` updates: 0.05, halved at 10, 20.
  assert rates == pytest.approx({5: 0.05, 10: 0.025, 15: 0.025, 20: 0.0125,
                                 25: 0.0125, 30: 0.0125, 35: 0.0125})


def test_evaluate_writes_the_metrics_of_the_latest_checkpoint(trained):
  result = processes.run_cli(CPU_TEST_FLAGS, f"--model_dir={trained}",
                            "--mode=evaluate", check=True)
  with open(os.path.join(trained, "eval_results.json")) as f:
    written = json.load(f)
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  assert written == printed
  assert written["global_step"] == 38
  assert written["checkpoint"].endswith("ckpt-38")
  validation = summaries.read_scalars(os.path.join(trained, "validation"))
  assert written["accuracy"] == pytest.approx(validation["accuracy"][-1][1],
                                              abs=1e-6)
  assert written["loss"] == pytest.approx(validation["loss"][-1][1], abs=1e-5)


def test_evaluate_without_checkpoint_fails_clearly(tmp_path):
  result = processes.run_cli(CPU_TEST_FLAGS, f"--model_dir={tmp_path}",
                            "--mode=evaluate")
  assert result.returncode == 1
  assert "dist_train: error: no checkpoint to evaluate in" in result.stderr


def test_train_mode_skips_validation(tmp_path):
  model_dir = tmp_path / "run"
  result = processes.run_cli(CPU_TEST_FLAGS, f"--model_dir={model_dir}",
                            "--mode=train", "--epochs=1", check=True)
  assert "validation loss n/a" in result.stderr
  assert not (model_dir / "validation").exists()


def _features(num_examples=64):
  config = config_lib.Config(model_dir="/tmp/unused", dataset="synthetic",
                             num_train_examples=num_examples,
                             num_validation_examples=0, seed=5)
  split = train.load_splits(config).train
  return split.examples[0]


def _restored_model(model_dir):
  """The reference model with the latest checkpoint's weights."""
  config = config_lib.Config(model_dir=model_dir, kernel_l2=0.0001,
                             activity_regularization=0.00001)
  model = mnist.create_model(config)
  path = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
  tf.train.Checkpoint(model=model).restore(path).expect_partial()
  return model


def test_exported_model_predicts_like_the_trained_model(trained):
  features = _features()
  expected = _restored_model(trained)(features).numpy()
  exported = keras.saving.load_model(
      os.path.join(trained, "export", "model.keras"))
  np.testing.assert_allclose(exported(features).numpy(), expected, atol=1e-6)
  saved_model = tf.saved_model.load(
      os.path.join(trained, "export", "saved_model"))
  np.testing.assert_allclose(saved_model.serve(features).numpy(), expected,
                             atol=1e-6)
  # Not trivially equal: training moved the weights from their start, the
  # model the run built after seeding (tests/test_parity.py checks that a
  # seeded build reproduces a run's initial weights).
  config = config_lib.Config(model_dir=trained, kernel_l2=0.0001,
                             activity_regularization=0.00001)
  keras.utils.set_random_seed(config.seed)
  untrained = mnist.create_model(config)
  assert np.abs(untrained(features).numpy() - expected).max() > 1e-2
