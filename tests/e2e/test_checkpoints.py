"""Which checkpoints a run keeps, and checkpoints it refuses to guess about."""

import hashlib
import os
import shutil

import pytest
import tensorflow as tf

from tests.helpers import processes

# cpu_test.cfg on 320 examples: 10 steps of 32 in one epoch; a checkpoint
# every 2 steps, of which the newest 2 are kept.
_RUN_FLAGS = [f"--flagfile={processes.FLAGS_DIR}/cpu_test.cfg",
              "--num_train_examples=320", "--epochs=1",
              "--checkpoint_every_steps=2", "--steps_per_loop=2",
              "--log_every_steps=2", "--keep_checkpoints=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("checkpoints") / "run"
  result = processes.run_cli(*_RUN_FLAGS, f"--model_dir={model_dir}",
                            check=True)
  return model_dir, result


def _prefixes(checkpoint_dir):
  return sorted({name.split(".")[0] for name in os.listdir(checkpoint_dir)
                 if name.startswith("ckpt-")})


def test_keep_checkpoints_deletes_older_ones(trained):
  model_dir, result = trained
  checkpoint_dir = str(model_dir / "checkpoints")
  for step in (2, 4, 6, 8, 10):  # Every one was written...
    assert f"Saved checkpoint {checkpoint_dir}/ckpt-{step}\n" in result.stderr
  # ... and only the newest 2 remain, on disk and in the state file.
  assert _prefixes(checkpoint_dir) == ["ckpt-10", "ckpt-8"]
  state = tf.train.get_checkpoint_state(checkpoint_dir)
  assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == [
      "ckpt-8", "ckpt-10"]


def _snapshot(directory):
  """{relative path: (size, mtime_ns, sha256)} of every file below."""
  files = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
      stat = os.stat(path)
      files[os.path.relpath(path, directory)] = (stat.st_size,
                                                 stat.st_mtime_ns, digest)
  return files


def test_checkpoints_without_a_state_file_are_refused(trained, tmp_path):
  model_dir = tmp_path / "run"
  shutil.copytree(trained[0], model_dir)
  checkpoint_dir = model_dir / "checkpoints"
  os.remove(checkpoint_dir / "checkpoint")
  before = _snapshot(model_dir)
  result = processes.run_cli(*_RUN_FLAGS, f"--model_dir={model_dir}",
                            "--epochs=2")
  assert result.returncode == 1, result.stderr[-3000:]
  assert processes.error_line(result) == (
      f"dist_train: error: {checkpoint_dir} holds checkpoints but no state "
      f"file {checkpoint_dir}/checkpoint; restore it or move the checkpoints "
      "away")
  assert "step 2 |" not in result.stderr  # No restart from step 0.
  assert _snapshot(model_dir) == before  # Nothing written or overwritten.
