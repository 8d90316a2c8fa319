"""The command line end to end: real runs, event files and checkpoints read back."""

import os
import re
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from dist_train import config as config_lib
from dist_train.models import mnist
from dist_train.outputs import summaries
from tests.helpers import processes

CPU_TEST_FLAGS = f"--flagfile={processes.FLAGS_DIR}/cpu_test.cfg"
# cpu_test.cfg: 600 examples in global batches of 32 = 19 steps an epoch.
STEPS_PER_EPOCH = 19


def read_scalars(directory):
  """{tag: [(step, value), ...]} from the TensorBoard event files in directory."""
  return summaries.read_scalars(directory)


def read_checkpoint(model_dir):
  """(path, {variable name: value}) of the latest checkpoint in model_dir."""
  path = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
  reader = tf.train.load_checkpoint(path)
  names = reader.get_variable_to_shape_map()
  return path, {name: reader.get_tensor(name) for name in names}


def weights_by_shape(values):
  """The checkpoint's float arrays with 2 dimensions or more, by shape."""
  return {v.shape: v for v in values.values()
          if isinstance(v, np.ndarray) and v.ndim >= 2}


def training_state(values):
  """Every value of a checkpoint (weights, global step, epoch, step in
  epoch) but its object graph and save_counter (the number of saves)."""
  return {name: value for name, value in values.items()
          if name != "_CHECKPOINTABLE_OBJECT_GRAPH"
          and not name.startswith("save_counter/")}


@pytest.fixture(scope="module")
def trained_dir(cpu_test_run, tmp_path_factory):
  """cpu_test.cfg's run (made once for the session), copied: the resume
  test trains on in it."""
  model_dir, result = cpu_test_run
  return processes.copy_run(model_dir, tmp_path_factory.mktemp("cli") / "run"), result


def test_writes_event_files_with_the_expected_tags(trained_dir):
  model_dir, _ = trained_dir
  train = read_scalars(os.path.join(model_dir, "train"))
  validation = read_scalars(os.path.join(model_dir, "validation"))
  assert {"loss", "accuracy", "learning_rate", "examples_per_second",
          "steps_per_second"} <= set(train)
  assert {"loss", "accuracy"} <= set(validation)
  # Steps are global optimizer steps: every 5 steps (log_every_steps) for
  # training, each epoch end for validation.
  assert [step for step, _ in train["loss"]] == list(range(5, 40, 5))
  assert [step for step, _ in validation["accuracy"]] == [
      STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
  assert all(value == pytest.approx(0.05) for _, value in
             train["learning_rate"])
  assert all(value > 0 for _, value in train["examples_per_second"])
  # Both rates are over the same interval: their ratio is the examples per
  # step, 32 (a global batch) or less where an epoch's last batch of 24 is in.
  for (_, examples), (_, steps) in zip(train["examples_per_second"],
                                       train["steps_per_second"]):
    assert 24 <= examples / steps <= 32 + 1e-3, (examples, steps)
  losses = [value for _, value in train["loss"]]
  assert losses[-1] < losses[0], losses  # It learns.


def test_console_reports_steps_and_epochs(trained_dir):
  _, result = trained_dir
  log = result.stderr
  assert "step 10 | epoch 1/2 | loss " in log
  assert "examples 320 | examples/s " in log
  assert re.search(r"examples/s \d+ \| steps/s \d+\.\d", log), log[-2000:]
  assert "epoch 2/2 done at step 38 | train loss" in log
  assert "validation loss" in log


def test_writes_checkpoints_that_restore(trained_dir):
  model_dir, _ = trained_dir
  path, values = read_checkpoint(model_dir)
  assert path.endswith("ckpt-38")
  assert values["epoch/.ATTRIBUTES/VARIABLE_VALUE"] == 2
  iterations = [v for k, v in values.items()
                if k.startswith("optimizer/") and "iteration" in k]
  assert iterations == [2 * STEPS_PER_EPOCH]
  kernels = weights_by_shape(values)
  assert {(784, 64), (64, 64), (64, 10)} <= set(kernels)
  assert all(np.all(np.isfinite(k)) for k in kernels.values())

  # A model built afresh and restored from it computes what the trained model
  # (exported at the end of the run) computes.
  model = mnist.create_model(config_lib.Config(
      model_dir=model_dir, kernel_l2=0.0001, activity_regularization=0.00001))
  tf.train.Checkpoint(model=model).restore(
      path).assert_existing_objects_matched()
  trained = keras.saving.load_model(
      os.path.join(model_dir, "export", "model.keras"))
  features = np.random.default_rng(0).uniform(size=(16, 784)).astype(
      np.float32)
  np.testing.assert_allclose(model(features).numpy(),
                             trained(features).numpy(), atol=1e-6)


def test_rerun_resumes_from_the_latest_checkpoint(trained_dir, tmp_path):
  model_dir, _ = trained_dir
  result = processes.run_cli(CPU_TEST_FLAGS, f"--model_dir={model_dir}",
                            "--epochs=3", check=True)
  assert "Restored " in result.stderr and "ckpt-38" in result.stderr
  assert "Resuming at step 38 (epoch 3, step 0 of 19)" in result.stderr
  assert "epoch 1/3 done" not in result.stderr  # Not restarted.
  assert "epoch 3/3 done at step 57" in result.stderr
  path, resumed = read_checkpoint(model_dir)
  assert path.endswith("ckpt-57")
  assert resumed["epoch/.ATTRIBUTES/VARIABLE_VALUE"] == 3

  # 2 epochs + 1 resumed epoch end with the weights of 3 epochs in one go.
  straight_dir = tmp_path / "straight"
  processes.run_cli(CPU_TEST_FLAGS, f"--model_dir={straight_dir}",
                   "--epochs=3", check=True)
  _, straight = read_checkpoint(str(straight_dir))
  resumed, straight = training_state(resumed), training_state(straight)
  assert sorted(resumed) == sorted(straight)
  assert len([v for v in resumed.values() if np.ndim(v) >= 1]) == 6
  for name in resumed:
    np.testing.assert_allclose(resumed[name], straight[name], atol=1e-6,
                               err_msg=name)

  # Training for the completed number of epochs again does nothing.
  again = processes.run_cli(CPU_TEST_FLAGS, f"--model_dir={model_dir}",
                           "--epochs=3", check=True)
  assert "Already trained for 3 epochs" in again.stderr
  assert read_checkpoint(model_dir)[0].endswith("ckpt-57")


# Every bad flag of tests/unit/test_flag_errors.py ends `main` there; one
# ends a real command line here.
@pytest.mark.parametrize("flags, message", [
    (["--global_batch_size=-4"],
     "--global_batch_size must be positive, got -4"),
])
def test_bad_input_exits_with_one_line_before_training(tmp_path, flags,
                                                       message):
  model_dir = tmp_path / "run"
  start = time.monotonic()
  result = processes.run_cli(CPU_TEST_FLAGS, f"--model_dir={model_dir}",
                             *flags)
  assert result.returncode == 1
  error_lines = [line for line in result.stderr.splitlines()
                 if line.startswith("dist_train: error:")]
  assert len(error_lines) == 1 and message in error_lines[0], result.stderr
  assert not model_dir.exists()  # No training work was done.
  assert time.monotonic() - start < 60  # Generous: no training started.


def test_missing_mnist_fails_at_once_naming_both_remedies(tmp_path):
  env_home = tmp_path / "keras_home"
  result = processes.run_python(
      ["-c", "import os, sys, keras; "
             "keras.datasets.mnist.load_data = lambda: (_ for _ in ()).throw("
             "OSError('no network')); "
             "from absl import app; from dist_train import main; "
             "app.run(main.main, flags_parser=main.parse_flags)",
       f"--model_dir={tmp_path / 'run'}", "--dataset=mnist",
       f"--data_dir={tmp_path}"],
      env_overrides={"KERAS_HOME": str(env_home)})
  assert result.returncode == 1
  [line] = [l for l in result.stderr.splitlines() if "dist_train: error" in l]
  assert "put mnist.npz in --data_dir" in line
  assert "--dataset=mnist_sample" in line


def test_quickstart_reaches_90_percent(tmp_path):
  model_dir = tmp_path / "quickstart"
  processes.run_cli(f"--flagfile={processes.FLAGS_DIR}/quickstart.cfg",
                   f"--model_dir={model_dir}", check=True)
  validation = read_scalars(str(model_dir / "validation"))
  final_step, final_accuracy = validation["accuracy"][-1]
  assert final_step == 10 * 63  # 10 epochs of 4,000 digits in batches of 64.
  assert final_accuracy >= 0.90


def test_reference_flagfile_trains_on_an_mnist_file(tmp_path):
  """mnist.cfg through the real loader, on a small file in the Keras format."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(300, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, size=300).astype(np.uint8)
  np.savez(tmp_path / "mnist.npz", x_train=images, y_train=labels,
           x_test=images[:10], y_test=labels[:10])
  model_dir = tmp_path / "run"
  result = processes.run_cli(
      f"--flagfile={processes.FLAGS_DIR}/mnist.cfg", f"--data_dir={tmp_path}",
      f"--model_dir={model_dir}", "--num_validation_examples=100",
      "--epochs=1", "--cpu_replicas=2", check=True)
  assert "Training 200 examples, validating 100" in result.stderr
  assert "epoch 1/1 done at step 4" in result.stderr
