"""Killed, preempted and corrupted runs lose no work and never restart silently.

Every run here is a real `python -m dist_train.main` process; kills are real
signals; checkpoints are real files, damaged on disk.
"""

import os
import random
import shutil
import signal
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from dist_train.loop import preemption
from tests.helpers import parity
from tests.helpers import processes

# 600 examples in global batches of 32: 19 steps an epoch, 57 in 3 epochs;
# a checkpoint every 4 steps and at epoch ends.
RUN_FLAGS = [f"--flagfile={processes.FLAGS_DIR}/cpu_test.cfg", "--epochs=3",
             "--checkpoint_every_steps=4", "--steps_per_loop=2",
             "--log_every_steps=4", "--keep_checkpoints=30",
             processes.NO_HEALTH]
TOTAL_STEPS = 57


def _checkpoint_dir(model_dir):
  return os.path.join(str(model_dir), "checkpoints")


def checkpoint_values(model_dir, step=None):
  """(path, {name: value}) of the latest checkpoint, or of ckpt-<step>.

  Every value it holds (weights, global step, epoch, step in epoch) but
  save_counter, which counts the saves made in this model_dir.
  """
  path = (tf.train.latest_checkpoint(_checkpoint_dir(model_dir))
          if step is None else
          os.path.join(_checkpoint_dir(model_dir), f"ckpt-{step}"))
  reader = tf.train.load_checkpoint(path)
  values = {name: reader.get_tensor(name)
            for name in reader.get_variable_to_shape_map()
            if name != "_CHECKPOINTABLE_OBJECT_GRAPH"
            and not name.startswith("save_counter/")}
  # The weights are among them: 3 Dense layers' kernels and biases.
  assert len([v for v in values.values() if np.ndim(v) >= 1]) == 6, values
  return path, values


def max_difference(a, b):
  assert a.keys() == b.keys()
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def assert_trained_after(model_dir, step, final):
  """The weights `final` moved far from those of ckpt-<step>: the resumed
  run trained, so its agreement with an uninterrupted run is not trivial."""
  _, resumed_from = checkpoint_values(model_dir, step)
  moved = max(float(np.max(np.abs(final[k] - resumed_from[k])))
              for k in final if np.ndim(final[k]) >= 1)
  print(f"moved {moved:.2e} after resuming at step {step}")
  assert moved > 1e-3


def start(model_dir, *flags):
  return subprocess.Popen(
      [*processes.python_command(), "-m", "dist_train.main", *RUN_FLAGS,
       f"--model_dir={model_dir}", *flags],
      cwd=processes.REPO_ROOT, env=processes.subprocess_env(),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """{replicas: final checkpoint values} of uninterrupted runs."""
  weights = {}
  for replicas in (1, 2):
    model_dir = tmp_path_factory.mktemp(f"uninterrupted_{replicas}")
    processes.run_cli(*RUN_FLAGS, f"--model_dir={model_dir}",
                     f"--cpu_replicas={replicas}", check=True)
    path, weights[replicas] = checkpoint_values(model_dir)
    assert path.endswith(f"ckpt-{TOTAL_STEPS}")
  return weights


@pytest.mark.parametrize("replicas", [1, 2])
def test_sigkill_then_resume_matches_an_uninterrupted_run(
    uninterrupted, tmp_path, replicas):
  kill_after = random.Random(replicas).choice(range(8, 41, 4))
  model_dir = tmp_path / "run"
  process = start(model_dir, f"--cpu_replicas={replicas}")
  processes.wait_for_checkpoint(process, model_dir, kill_after)
  process.send_signal(signal.SIGKILL)
  process.communicate(timeout=60)
  assert process.returncode == -signal.SIGKILL

  result = processes.run_cli(*RUN_FLAGS, f"--model_dir={model_dir}",
                            f"--cpu_replicas={replicas}", check=True)
  assert "Resuming at step " in result.stderr
  resumed_step = int(result.stderr.split("Resuming at step ")[1].split()[0])
  # The state file names a checkpoint only once it is complete, so a kill
  # right after ckpt-<kill_after> was written may resume from the one before.
  assert resumed_step >= kill_after - 4
  path, weights = checkpoint_values(model_dir)
  assert path.endswith(f"ckpt-{TOTAL_STEPS}")
  assert_trained_after(model_dir, resumed_step, weights)
  difference = max_difference(weights, uninterrupted[replicas])
  print(f"{replicas} replica(s), killed after step {kill_after}, resumed at "
        f"{resumed_step}: max weight difference {difference:.2e}")
  assert difference <= 1e-6, (
      f"killed after step {kill_after}, resumed at {resumed_step}: weights "
      f"differ by {difference:.2e}")


def test_sigterm_saves_exits_and_resumes_identically(uninterrupted, tmp_path):
  model_dir = tmp_path / "run"
  process = start(model_dir, "--cpu_replicas=2")
  processes.wait_for_checkpoint(process, model_dir, 12)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == preemption.EXIT_PREEMPTED, stderr[-3000:]
  [line] = [l for l in stderr.splitlines() if "dist_train: error:" in l]
  assert "preempted by SIGTERM: saved the checkpoint to " in line
  saved_step = int(line.split(" at step ")[1].split(";")[0])
  assert 12 <= saved_step < TOTAL_STEPS
  assert os.path.exists(os.path.join(_checkpoint_dir(model_dir),
                                     f"ckpt-{saved_step}.index"))

  result = processes.run_cli(*RUN_FLAGS, f"--model_dir={model_dir}",
                            "--cpu_replicas=2", check=True)
  assert f"Resuming at step {saved_step} " in result.stderr
  _, weights = checkpoint_values(model_dir)
  assert_trained_after(model_dir, saved_step, weights)
  difference = max_difference(weights, uninterrupted[2])
  print(f"SIGTERM at step {saved_step}: max weight difference {difference:.2e}")
  assert difference <= 1e-6


@pytest.fixture
def trained_copy(tmp_path_factory, tmp_path):
  """A finished 1-epoch run (checkpoints at steps 4, 8, 12, 16, 19), copied
  afresh for each test."""
  source = tmp_path_factory.getbasetemp() / "one_epoch_run"
  if not source.exists():
    processes.run_cli(*RUN_FLAGS, f"--model_dir={source}", "--epochs=1",
                     check=True)
  shutil.copytree(source, tmp_path / "run")
  return tmp_path / "run"


def _checkpoint_files(model_dir):
  return sorted(os.listdir(_checkpoint_dir(model_dir)))


def _resume(model_dir, *flags):
  return processes.run_cli(*RUN_FLAGS, f"--model_dir={model_dir}",
                          "--epochs=2", *flags)


def _damage(model_dir, how):
  prefix = os.path.join(_checkpoint_dir(model_dir), "ckpt-19")
  if how == "truncated data":
    path = prefix + ".data-00000-of-00001"
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 3)
    return path
  if how == "garbage index":
    with open(prefix + ".index", "wb") as f:
      f.write(os.urandom(200))
    return prefix + ".index"
  if how == "missing prefix":
    state = os.path.join(_checkpoint_dir(model_dir), "checkpoint")
    with open(state) as f:
      content = f.read().replace('"ckpt-19"', '"ckpt-999"')
    with open(state, "w") as f:
      f.write(content)
    return "ckpt-999.index"
  raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated data", "garbage index",
                                 "missing prefix"])
def test_corrupt_latest_checkpoint_fails_naming_the_file(trained_copy, how):
  named = _damage(trained_copy, how)
  before = _checkpoint_files(trained_copy)
  result = _resume(trained_copy)
  assert result.returncode == 1
  line = processes.error_line(result)
  assert os.path.basename(named) in line, line
  assert "--on_corrupt_checkpoint=previous" in line
  assert _checkpoint_files(trained_copy) == before  # Nothing overwritten.
  assert "epoch 1/2 done" not in result.stderr  # No restart from step 0.


@pytest.mark.parametrize("how", ["truncated data", "missing prefix"])
def test_corrupt_latest_checkpoint_falls_back_when_asked(trained_copy, how):
  _damage(trained_copy, how)
  result = _resume(trained_copy, "--on_corrupt_checkpoint=previous")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "falling back to" in result.stderr
  assert "Resuming at step 16 (epoch 1, step 16 of 19)" in result.stderr
  assert "epoch 2/2 done at step 38" in result.stderr


def test_garbled_state_file_is_named(trained_copy):
  with open(os.path.join(_checkpoint_dir(trained_copy), "checkpoint"),
            "w") as f:
    f.write("this is { not a checkpoint state\n")
  result = _resume(trained_copy)
  assert result.returncode == 1
  assert "cannot read the checkpoint state file" in processes.error_line(result)


def test_changed_model_names_the_variable_and_both_shapes(trained_copy):
  # Refused first as a change of what the run computes (run.cfg) ...
  result = _resume(trained_copy, "--hidden_units=32")
  assert result.returncode == 1
  assert "--hidden_units: 64 -> 32" in processes.error_line(result)
  # ... and when allowed, the checkpoint does not fit the new model.
  result = _resume(trained_copy, "--hidden_units=32", "--allow_config_change")
  assert result.returncode == 1
  line = processes.error_line(result)
  assert "does not fit the model: variable " in line
  assert "dense_1/kernel" in line
  assert "(784, 64) in the checkpoint and (784, 32) in the model" in line


def test_no_half_written_checkpoint_is_left(trained_copy):
  """A save killed mid-way leaves `<prefix>_temp` files; the next run clears
  them, and finished runs leave none."""
  assert not [f for f in _checkpoint_files(trained_copy) if "_temp" in f]
  leftover = os.path.join(_checkpoint_dir(trained_copy), "ckpt-23_temp")
  os.makedirs(leftover)
  with open(os.path.join(leftover, "part-00000-of-00001.data-00000-of-00001"),
            "wb") as f:
    f.write(b"partial")
  result = _resume(trained_copy)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "left by an interrupted save" in result.stderr
  assert not os.path.exists(leftover)


def test_non_finite_loss_stops_within_one_interval(tmp_path):
  model_dir = tmp_path / "run"
  result = processes.run_cli(*RUN_FLAGS, f"--model_dir={model_dir}",
                            "--learning_rate=1e5", "--checkpoint_every_steps=2")
  assert result.returncode == 3
  line = processes.error_line(result)
  assert "non-finite loss in steps " in line
  first, last = map(int, line.split("in steps ")[1].split(":")[0].split("-"))
  assert last - first + 1 <= 4  # One logging interval (--log_every_steps=4).
  assert "cross_entropy=nan" in line or "cross_entropy=inf" in line
  # Every checkpoint written holds finite values only.
  for name in os.listdir(_checkpoint_dir(model_dir)):
    if name.endswith(".index"):
      reader = tf.train.load_checkpoint(
          os.path.join(_checkpoint_dir(model_dir), name[:-len(".index")]))
      for variable in reader.get_variable_to_shape_map():
        value = reader.get_tensor(variable)
        if np.issubdtype(np.asarray(value).dtype, np.floating):
          assert np.all(np.isfinite(value)), (name, variable)


# The single-device reference of the resumed two workers: trained once for
# the session.
PARITY_RUNS = {1: [parity.PARITY_CASE]}


def test_two_workers_stop_together_on_sigterm_to_one_and_resume(tmp_path,
                                                                parity_runs):
  """SIGTERM to one worker: both agree on one step, save, exit 75, and the
  resumed run matches one device."""
  flags = [*parity.PARITY_FLAGS, "--checkpoint_every_steps=2",
           "--steps_per_loop=1", processes.NO_HEALTH,
           f"--collective_timeout_s={processes.COLLECTIVE_TIMEOUT_S}"]
  output_dir, results = parity_runs
  reference_dir = os.path.join(output_dir, f"{parity.PARITY_CASE}_1")
  reference = results[(parity.PARITY_CASE, 1)]
  model_dir = tmp_path / "run"
  launch = processes.Launch(2, [*flags, f"--model_dir={model_dir}"])
  processes.wait_for_checkpoint(launch.process, model_dir, 6, timeout=240,
                                output_fn=lambda: launch.output,
                                # The launcher passes SIGTERM on to its
                                # workers.
                                stop_fn=launch.process.terminate)
  # As when a scheduler preempts one node: only worker 1 gets SIGTERM, and
  # the chief must stop at the same step.
  os.kill(launch.worker_pids()[1], signal.SIGTERM)
  assert launch.wait(timeout=120) == preemption.EXIT_PREEMPTED, (
      launch.output[-6000:])
  step = launch.stop_step("preempted by SIGTERM")
  assert os.path.exists(os.path.join(_checkpoint_dir(model_dir),
                                     f"ckpt-{step}.index"))

  resumed = processes.Launch(2, [*flags, f"--model_dir={model_dir}"])
  assert resumed.wait(timeout=300) == 0, resumed.output[-6000:]
  assert f"Resuming at step {step} " in resumed.output
  difference = parity.max_checkpoint_difference(
      str(model_dir), reference_dir, reference)
  print(f"2 workers, SIGTERM at step {step}, resumed: max difference from "
        f"1 device {difference:.2e}")
  assert difference < 1e-5


def test_non_finite_loss_stops_every_worker(tmp_path):
  launch = processes.Launch(2, [
      *parity.PARITY_FLAGS, "--learning_rate=1e5", processes.NO_HEALTH,
      f"--collective_timeout_s={processes.COLLECTIVE_TIMEOUT_S}",
      f"--model_dir={tmp_path / 'run'}"])
  assert launch.wait(timeout=300) == 3, launch.output[-6000:]
  assert any("non-finite loss in steps" in l for l in launch.worker_lines(0)
             ) or any("non-finite loss in steps" in l
                      for l in launch.worker_lines(1))
