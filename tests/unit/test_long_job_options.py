"""The wall clock's decisions (loop/time_limits.py), the run record's
flagfile and resume check (outputs/run_record.py) and their bad input, with
no TensorFlow run: a fake clock, Configs, and the command line called here.

The runs that stop on the time limit, save on the clock and replay a run.cfg
are in tests/e2e/test_long_jobs.py and tests/integration/test_run_record.py.
"""

import dataclasses
import os
import subprocess

from absl.testing import flagsaver
import pytest

from dist_train import config as config_lib
from dist_train import main
from dist_train.loop import time_limits
from dist_train.outputs import run_record
from tests.helpers import processes
from tests.unit import test_flag_errors


class FakeClock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_time_limit_keeps_the_longest_interval_and_save_in_hand():
  clock = FakeClock()
  wall = time_limits.WallClock(max_runtime_s=60, start_time=90.0, clock=clock)
  wall.start_training()  # 10 s after the start.
  clock.now += 5
  wall.boundary()  # A 5 s interval.
  wall.saved(2.0)
  assert wall.margin_s == 7.0
  assert not wall.out_of_time()  # 45 s left.
  clock.now = 90.0 + 60 - 7.5  # 7.5 s left: enough for a loop and a save.
  assert not wall.out_of_time()
  clock.now = 90.0 + 60 - 6.5
  assert wall.out_of_time()
  wall.boundary()  # A 38.5 s interval (a validation pass, say) counts too.
  assert wall.margin_s == 40.5


def test_no_time_limit_never_stops_and_no_period_never_saves():
  clock = FakeClock()
  wall = time_limits.WallClock(clock=clock)
  wall.start_training()
  clock.now += 1e9
  wall.boundary()
  assert not wall.out_of_time() and not wall.checkpoint_due()


def test_checkpoint_is_due_after_the_period_since_the_last_save():
  clock = FakeClock()
  wall = time_limits.WallClock(checkpoint_every_secs=30, clock=clock)
  wall.start_training()
  clock.now += 29
  assert not wall.checkpoint_due()
  clock.now += 1
  assert wall.checkpoint_due()
  wall.saved(0.5)  # Any save starts the period again.
  assert not wall.checkpoint_due()
  clock.now += 30
  assert wall.checkpoint_due()


@pytest.mark.parametrize("name", ["max_runtime_s", "checkpoint_every_secs"])
def test_wall_clock_refuses_a_period_that_is_not_positive(name):
  with pytest.raises(ValueError, match=f"{name} must be positive, got 0"):
    time_limits.WallClock(**{name: 0})


def test_time_limit_line():
  error = time_limits.TimeLimitReached(global_step=12, max_runtime_s=3600.0)
  assert str(error) == ("stopped at step 12 after the time limit of 3600 s; "
                        "rerun the same command to resume")
  assert error.exit_code == 75


def _config(**changes):
  return config_lib.Config(model_dir="/tmp/run_record_unit", **changes)


def test_flagfile_reads_back_as_the_same_config():
  config = _config(learning_rate=0.1 + 0.2, lr_boundaries=[3, 7],
                   clip_norm=1.5, jit_compile=True, max_runtime_s=3600.5,
                   task="tests.helpers.task_fixtures:create")
  text = run_record.flagfile_text(config, started="20261202T031500Z")
  assert text.startswith("# dist_train ")
  assert "--learning_rate=0.30000000000000004\n" in text  # Exact.
  assert "# --num_train_examples unset\n" in text
  assert run_record.parse_flagfile(text, path="run.cfg") == config


def test_every_run_defining_option_is_an_option():
  names = {field.name for field in dataclasses.fields(config_lib.Config)}
  assert set(config_lib.RUN_DEFINING_OPTIONS) <= names
  assert len(set(config_lib.RUN_DEFINING_OPTIONS)) == len(
      config_lib.RUN_DEFINING_OPTIONS)


def test_changes_are_refused_when_they_change_the_mathematics():
  earlier = _config(learning_rate=0.05, log_every_steps=5)
  refused, accepted = run_record.changes(
      earlier, _config(learning_rate=0.1, log_every_steps=7, cpu_replicas=2,
                       clip_norm=1.0))
  assert refused == ["--learning_rate: 0.05 -> 0.1",
                     "--clip_norm: unset -> 1.0"]
  assert accepted == ["--log_every_steps: 5 -> 7", "--cpu_replicas: unset -> 2"]
  with pytest.raises(config_lib.ConfigError) as raised:
    run_record.check_resume(_config(learning_rate=0.1), earlier)
  message = str(raised.value)
  assert "\n" not in message
  assert "--learning_rate: 0.05 -> 0.1" in message
  assert "--allow_config_change" in message
  assert run_record.check_resume(
      _config(learning_rate=0.1, allow_config_change=True), earlier) == [
          "--learning_rate: 0.05 -> 0.1", "--log_every_steps: 5 -> 200",
          "--allow_config_change: false -> true"]


@pytest.mark.parametrize("line, message", [
    ("--epochs=three", "line 2: --epochs must be an integer, got 'three'"),
    ("--no_such_option=1", "line 2: '--no_such_option=1' is not --option="),
    ("epochs 3", "line 2: 'epochs 3' is not --option=value"),
    ("--jit_compile=maybe", "--jit_compile must be true or false"),
    ("--epochs=-3", "--epochs must be positive, got -3"),
])
def test_a_run_cfg_edited_into_nonsense_is_named(line, message):
  text = f"--model_dir=/tmp/run\n{line}\n"
  with pytest.raises(run_record.RunRecordError) as raised:
    run_record.parse_flagfile(text, path="/tmp/run/run.cfg")
  assert "\n" not in str(raised.value)
  assert str(raised.value).startswith(
      "the run record /tmp/run/run.cfg")
  assert message in str(raised.value)


def test_print_config_round_trips_before_tensorflow(tmp_path, capsys,
                                                    monkeypatch):
  def would_start_tensorflow():
    raise AssertionError("--print_config started TensorFlow")
  monkeypatch.setattr(main.logs, "quiet_tensorflow_startup",
                      would_start_tensorflow)

  def print_config(*flags):
    capsys.readouterr()
    with flagsaver.flagsaver():
      main.main(main.parse_flags(["dist_train", *flags, "--print_config"]))
    return capsys.readouterr().out
  printed = print_config(test_flag_errors.CPU_TEST_FLAGS,
                         f"--model_dir={tmp_path / 'run'}",
                         "--learning_rate=0.02", "--lr_boundaries=4,8")
  assert "--learning_rate=0.02\n" in printed
  assert "--lr_boundaries=4,8\n" in printed
  assert "--cpu_replicas=2\n" in printed  # From cpu_test.cfg.
  flagfile = tmp_path / "printed.cfg"
  flagfile.write_text(printed)
  assert print_config(f"--flagfile={flagfile}") == printed
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, message", [
    ("--max_runtime_s=0", "--max_runtime_s must be positive, got 0.0"),
    ("--max_runtime_s=-60", "--max_runtime_s must be positive, got -60.0"),
    ("--checkpoint_every_secs=0",
     "--checkpoint_every_secs must be positive, got 0.0"),
])
def test_bad_time_limits_give_one_line(tmp_path, capsys, monkeypatch, flag,
                                       message):
  code, lines = test_flag_errors.cli_error(
      capsys, monkeypatch, test_flag_errors.CPU_TEST_FLAGS,
      f"--model_dir={tmp_path / 'run'}", flag)
  assert code == 1
  assert lines == [f"dist_train: error: {message}"]


@pytest.mark.parametrize("left, seconds", [
    ("1-02:03:04", "93784"), ("02:03:04", "7384"), ("03:04", "184"),
    ("UNLIMITED", ""), ("NOT_SET", "")])
def test_slurm_script_reads_the_time_left_from_squeue(tmp_path, left,
                                                      seconds):
  """launch/slurm.sbatch's seconds_left, with a squeue that prints `left`."""
  squeue = tmp_path / "squeue"
  squeue.write_text(f"#!/bin/sh\necho '{left}'\n")
  squeue.chmod(0o755)
  script = os.path.join(processes.REPO_ROOT, "launch", "slurm.sbatch")
  env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_END_TIME"}
  env["PATH"] = f"{tmp_path}:{env['PATH']}"
  result = subprocess.run(
      ["bash", "-c", f"source <(sed -n '/^seconds_left()/,/^}}/p' {script});"
       " seconds_left"], env=env, capture_output=True, text=True, check=True)
  assert result.stdout.strip() == seconds


@pytest.mark.parametrize("line, message", [
    ("--epochs=three", "flag --epochs=three: invalid literal"),
    ("--epochs=-3", "--epochs must be positive, got -3"),
    ("--bogus=1", "Unknown command line flag 'bogus'"),
])
def test_replaying_a_run_cfg_edited_into_nonsense_names_the_line(
    tmp_path, capsys, monkeypatch, line, message):
  run_cfg = tmp_path / "run.cfg"
  run_cfg.write_text(run_record.flagfile_text(_config()) + f"{line}\n")
  code, lines = test_flag_errors.cli_error(capsys, monkeypatch,
                                           f"--flagfile={run_cfg}")
  assert code == 1
  number = len(run_cfg.read_text().splitlines())
  [error] = lines
  assert error.startswith(f"dist_train: error: {message}")
  assert error.endswith(f" (set in {run_cfg}, line {number})")
  # Set again on the command line, the value is the command line's.
  code, lines = test_flag_errors.cli_error(
      capsys, monkeypatch, f"--flagfile={run_cfg}", "--epochs=-4",
      "--model_dir=/tmp/x")
  if line == "--epochs=-3":
    assert lines == ["dist_train: error: --epochs must be positive, got -4"]
