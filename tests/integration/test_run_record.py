"""The run record through the Python API, in this process: run.cfg and
run.json at every start, a resume that changes the mathematics refused in
one line (and accepted with allow_config_change), a changed cadence
accepted, a run.cfg edited into nonsense named; and --checkpoint_every_secs
and --max_runtime_s at loop boundaries of a real run."""

import json
import logging
import os

import pytest
import tensorflow as tf

from dist_train import config as config_lib
from dist_train import train
from dist_train.loop import time_limits
from dist_train.outputs import run_record

# 128 synthetic examples in global batches of 32: 4 steps an epoch, in
# compiled loops of 2 steps; no validation.
RUN = dict(dataset="synthetic", num_train_examples=128,
           num_validation_examples=0, global_batch_size=32, hidden_units=8,
           steps_per_loop=2, log_every_steps=2, learning_rate=0.05,
           mode="train", keep_checkpoints=20)


@pytest.fixture(scope="module")
def strategy():
  return train.create_strategy(config_lib.Config(model_dir="/tmp/unused"))


def _steps_saved(model_dir):
  return sorted(int(name[len("ckpt-"):-len(".index")]) for name in
                os.listdir(os.path.join(model_dir, "checkpoints"))
                if name.endswith(".index"))


def test_run_record_and_resume_with_changed_options(tmp_path, strategy,
                                                    caplog):
  model_dir = str(tmp_path / "run")
  first = config_lib.Config(model_dir=model_dir, epochs=1, **RUN)
  train.train_and_evaluate(first, strategy=strategy)
  with open(os.path.join(model_dir, "run.cfg")) as f:
    assert run_record.parse_flagfile(f.read(), path="run.cfg") == first
  with open(os.path.join(model_dir, "run.json")) as f:
    info = json.load(f)
  assert info["tensorflow"] == tf.__version__
  assert info["num_replicas"] == strategy.num_replicas_in_sync
  assert info["num_workers"] == 1 and info["devices"]
  assert info["start_time"].endswith("+00:00")
  assert {"python", "keras", "dist_train", "git_commit"} <= info.keys()
  assert info["recoveries"] == []  # No loss spike was recovered from.

  # A new learning rate would make another run of the checkpoint: refused
  # in one line naming the option and both values, before any training.
  changed = first.replace(epochs=2, learning_rate=0.1)
  with pytest.raises(config_lib.ConfigError) as raised:
    train.train_and_evaluate(changed, strategy=strategy)
  assert "\n" not in str(raised.value)
  assert "--learning_rate: 0.05 -> 0.1" in str(raised.value)
  assert _steps_saved(model_dir) == [4]
  # A new log cadence is accepted, and logged.
  # On absl's logger itself: a run earlier in this process may have
  # configured it not to propagate (logs.configure_logging).
  caplog.set_level("INFO", logger="absl")
  absl_logger = logging.getLogger("absl")
  absl_logger.addHandler(caplog.handler)
  try:
    result = train.train_and_evaluate(
        first.replace(epochs=2, log_every_steps=4), strategy=strategy)
  finally:
    absl_logger.removeHandler(caplog.handler)
  assert result.global_step == 8
  assert "Resuming with a changed option --log_every_steps: 2 -> 4" in (
      caplog.text)
  # With allow_config_change, the new rate is taken.
  result = train.train_and_evaluate(
      changed.replace(epochs=3, allow_config_change=True), strategy=strategy)
  assert result.global_step == 12
  earlier = [name for name in os.listdir(model_dir)
             if name.startswith("run.") and name.endswith(".cfg")]
  assert len(earlier) == 3, earlier  # run.cfg and two earlier starts.

  # A run.cfg edited into nonsense: one line naming the file.
  with open(os.path.join(model_dir, "run.cfg"), "a") as f:
    f.write("--learning_rate=fast\n")
  with pytest.raises(run_record.RunRecordError) as raised:
    train.train_and_evaluate(changed.replace(epochs=4), strategy=strategy)
  assert str(raised.value).startswith(
      f"the run record {model_dir}/run.cfg is not a flagfile")
  assert "--learning_rate must be a number, got 'fast'" in str(raised.value)


def test_checkpoint_every_secs_saves_at_each_boundary_after_the_period(
    tmp_path, strategy):
  model_dir = str(tmp_path / "run")
  train.train_and_evaluate(config_lib.Config(
      model_dir=model_dir, epochs=2, checkpoint_every_secs=1e-3, **RUN),
      strategy=strategy)
  # Every loop boundary (2 steps) is more than 1 ms after the last save.
  assert _steps_saved(model_dir) == [2, 4, 6, 8]


def test_max_runtime_s_stops_saved_at_a_boundary(tmp_path, strategy):
  model_dir = str(tmp_path / "run")
  # The API counts from the start of the run: a 1 ms limit has passed by
  # the first boundary.
  with pytest.raises(time_limits.TimeLimitReached) as raised:
    train.train_and_evaluate(config_lib.Config(
        model_dir=model_dir, epochs=2, max_runtime_s=1e-3, **RUN),
        strategy=strategy)
  assert raised.value.global_step == 2
  assert _steps_saved(model_dir) == [2]
