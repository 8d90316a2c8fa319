"""Bad data and bad flags stop the run with one line and a non-zero exit."""

import time

import numpy as np
import pytest

from dist_train import train
from dist_train import config as config_lib
from dist_train.data import datasets
from tests.helpers import processes

BLOBS = ["--dataset=tests.helpers.plugin_fixtures:blobs",
         "--model=tests.helpers.plugin_fixtures:blob_model", "--cpu_replicas=2",
         "--global_batch_size=32", "--epochs=1"]


def test_builtin_label_out_of_range_names_value_and_class_count(tmp_path):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, size=100).astype(np.uint8)
  labels[37] = 12
  np.savez(tmp_path / "mnist.npz",
           x_train=rng.integers(0, 256, size=(100, 28, 28), dtype=np.uint8),
           y_train=labels, x_test=labels[:1], y_test=labels[:1])
  config = config_lib.Config(model_dir=str(tmp_path / "run"), dataset="mnist",
                             data_dir=str(tmp_path),
                             num_validation_examples=10)
  with pytest.raises(datasets.DataError,
                     match=r"label 12 of example 37 is outside \[0, 10\)"):
    train.load_splits(config)


# Also NaN features and an empty split: they raise in
# tests/integration/test_error_messages.py; a label out of range, found by
# the 2 replicas' steps, stops the command line here.
@pytest.mark.parametrize("dataset, message", [
    ("blobs_with_label_12", "[label] [12] [is outside [0, 4) (4 classes)]"),
])
def test_bad_user_data_stops_the_run(tmp_path, dataset, message):
  flags = [f if not f.startswith("--dataset=") else
           f"--dataset=tests.helpers.plugin_fixtures:{dataset}" for f in BLOBS]
  result = processes.run_cli(f"--model_dir={tmp_path / 'run'}", *flags)
  assert result.returncode == 1
  assert message in processes.error_line(result)
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_empty_validation_is_refused_unless_training_only(tmp_path):
  flags = [f"--flagfile={processes.FLAGS_DIR}/cpu_test.cfg",
           "--num_validation_examples=0", "--epochs=1"]
  refused = processes.run_cli(*flags, f"--model_dir={tmp_path / 'a'}")
  assert refused.returncode == 1
  assert "validation split of --dataset=synthetic is empty" in (
      processes.error_line(refused))
  processes.run_cli(*flags, "--mode=train", f"--model_dir={tmp_path / 'b'}",
                   check=True)


# Every bad flag of tests/unit/test_flag_errors.py ends `main` there; one
# ends a real command line here, which imports no TensorFlow module.
@pytest.mark.parametrize("flag, message", [
    ("--learning_rate=-1", "--learning_rate must be positive, got -1.0"),
])
def test_bad_flags_exit_1_quickly(tmp_path, flag, message):
  start = time.monotonic()
  result = processes.run_python(
      ["-X", "importtime", "-m", "dist_train.main",
       f"--model_dir={tmp_path / 'run'}", flag])
  elapsed = time.monotonic() - start
  assert result.returncode == 1
  assert message in processes.error_line(result)
  # Before TensorFlow loads, whatever the load on the machine: Python's
  # import log (-X importtime) names no TensorFlow module.
  imported = [line.rsplit("|", 1)[-1].strip()
              for line in result.stderr.splitlines()
              if line.startswith("import time:")]
  assert "dist_train.flags" in imported
  assert not [name for name in imported
              if name.split(".")[0] in ("tensorflow", "keras")], imported
  # Well under the 5 s a user would notice on an idle machine; generous
  # here, where other tests share the cores.
  assert elapsed < 30, f"{elapsed:.1f} s"


def test_model_dir_that_is_a_file_exits_1(tmp_path):
  path = tmp_path / "not_a_dir"
  path.write_text("")
  result = processes.run_cli(f"--model_dir={path}")
  assert result.returncode == 1
  assert f"--model_dir must be a directory, got the file {path}" in (
      processes.error_line(result))
