"""Ctrl-C and SIGTERM end a run promptly in every phase (loop/stop.py).

Real processes and real signals: each test starts `dist_train.main`, waits
for the line that marks a phase (tests/stop_fixtures.py makes each phase
last far longer than the test waits), sends the signal and checks the exit
code, the one `dist_train: error:` line and how long the exit took.
"""

import os
import signal
import subprocess
import threading
import time

import pytest

from dist_train import errors
from tests.helpers import processes

_SYNTHETIC = ("--dataset=synthetic", "--num_train_examples=256",
              "--num_validation_examples=0", "--global_batch_size=32")
# Seconds from the signal to the exit: the exit itself (TensorFlow's
# teardown) on a loaded 2-core machine, plus at most one compiled call.
_PROMPT_S = 15


class _Run:
  """`python -m dist_train.main` with its stderr read by a thread.

  Started through the prewarmed stand-in for `python`, which passes the
  signals on to the run: every phase signalled here comes after
  TensorFlow's import, which the stand-in's run has already paid."""

  def __init__(self, model_dir, *flags):
    self.process = subprocess.Popen(
        [*processes.python_command(), "-m", "dist_train.main", "--mode=train",
         f"--model_dir={model_dir}", *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        cwd=processes.REPO_ROOT, env=processes.subprocess_env())
    self.lines = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.process.stderr:
      self.lines.append(line.rstrip("\n"))

  def wait_for(self, text, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if any(text in line for line in self.lines):
        return time.monotonic()
      if self.process.poll() is not None:
        break
      time.sleep(0.05)
    self.process.kill()
    raise AssertionError(f"no line with {text!r}:\n" +
                         "\n".join(self.lines[-40:]))

  def stop(self, *signums, gap_s=0.0):
    """Sends the signals; returns (exit code, seconds to exit, error line)."""
    start = time.monotonic()
    for signum in signums:
      self.process.send_signal(signum)
      time.sleep(gap_s)
    try:
      code = self.process.wait(timeout=120)
    except subprocess.TimeoutExpired:
      self.process.kill()
      raise
    seconds = time.monotonic() - start
    self._reader.join(10)
    error = [l for l in self.lines if l.startswith("dist_train: error:")]
    assert len(error) == 1, "\n".join(self.lines[-40:])
    return code, seconds, error[0]


def _nothing_lost(code, seconds, line, name, phase):
  assert code == errors.EXIT_PREEMPTED, line
  assert seconds < _PROMPT_S, seconds
  assert line == (f"dist_train: error: stopped by {name} {phase}: nothing to "
                  "save, nothing lost; rerun the same command to resume")


def test_sigint_while_building_the_input(tmp_path):
  run = _Run(tmp_path / "run", "--dataset=tests.helpers.stop_fixtures:slow_blobs",
             "--model=tests.helpers.plugin_fixtures:blob_model",
             "--global_batch_size=32", "--epochs=1")
  run.wait_for("MARK building input")
  _nothing_lost(*run.stop(signal.SIGINT), "SIGINT",
                "before the first training step")


def test_sigterm_during_the_first_trace(tmp_path):
  run = _Run(tmp_path / "run", *_SYNTHETIC, "--epochs=1",
             "--model=tests.helpers.stop_fixtures:slow_trace")
  run.wait_for("MARK tracing")
  _nothing_lost(*run.stop(signal.SIGTERM), "SIGTERM",
                "before the first training step")
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "checkpoint")


def test_sigterm_during_validation_saves_the_trained_step_first(tmp_path):
  """The epoch-end validation is abandoned between compiled calls; the
  epoch's last step is saved without it, for the resume to validate."""
  run = _Run(tmp_path / "run", "--dataset=synthetic",
             "--num_train_examples=64", "--num_validation_examples=2000",
             "--global_batch_size=32", "--epochs=3", "--steps_per_loop=2",
             "--mode=train_and_evaluate",
             "--model=tests.helpers.stop_fixtures:slow_validation")
  run.wait_for("MARK validating")
  code, seconds, line = run.stop(signal.SIGTERM)
  assert code == errors.EXIT_PREEMPTED, line
  # The whole pass takes 63 steps x 0.5 s; one compiled call, 2 x 0.5 s.
  assert seconds < _PROMPT_S, seconds
  assert line.startswith("dist_train: error: preempted by SIGTERM: saved "
                         "the checkpoint to "), line
  assert line.endswith("at step 2 before its validation, which the resume "
                       "runs; rerun the same command to resume"), line
  assert os.path.exists(tmp_path / "run" / "checkpoints" / "ckpt-2.index")


def test_sigint_during_the_export(tmp_path):
  run = _Run(tmp_path / "run", *_SYNTHETIC, "--epochs=1",
             "--model=tests.helpers.stop_fixtures:slow_export")
  run.wait_for("MARK exporting")
  _nothing_lost(*run.stop(signal.SIGINT), "SIGINT",
                "while exporting the model")
  # The last step is saved; training_done.json is not written: the rerun
  # exports again.
  assert os.path.exists(tmp_path / "run" / "checkpoints" / "ckpt-8.index")
  assert not os.path.exists(tmp_path / "run" / "training_done.json")


def test_second_sigint_exits_at_once_without_saving(tmp_path):
  run = _Run(tmp_path / "run", *_SYNTHETIC, "--epochs=1",
             "--steps_per_loop=8", "--log_every_steps=8",
             "--model=tests.helpers.stop_fixtures:slow_step")
  run.wait_for("MARK step")  # Inside a compiled loop of 8 x 0.2 s steps.
  code, seconds, line = run.stop(signal.SIGINT, signal.SIGINT, gap_s=0.2)
  assert code == 130, line
  assert seconds < _PROMPT_S, seconds
  assert line.startswith("dist_train: error: interrupted again by SIGINT: "
                         "exited at once without saving"), line
  assert any("SIGINT received: saving at the end of the current training "
             "loop" in l for l in run.lines)
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "checkpoint")


def test_many_epochs_start_fast_and_sigterm_in_training_saves(tmp_path):
  """--epochs=100000 reaches its first step as fast as one epoch would (a
  pipeline built one epoch at a time took over 10 minutes); SIGTERM while
  training finishes the loop, saves and exits 75."""
  run = _Run(tmp_path / "run", "--dataset=synthetic",
             "--num_train_examples=640", "--num_validation_examples=0",
             "--global_batch_size=64", "--epochs=100000",
             "--log_every_steps=10")
  start = run.wait_for("Training 640 examples")
  first_step = run.wait_for("step 10 |")
  print(f"--epochs=100000: first logged step {first_step - start:.1f}s after "
        "the run described its data")
  assert first_step - start < 60
  code, seconds, line = run.stop(signal.SIGTERM)
  assert code == errors.EXIT_PREEMPTED, line
  assert seconds < _PROMPT_S, seconds
  assert "preempted by SIGTERM: saved the checkpoint to " in line, line
