"""Long cluster jobs: the time limit stops every worker at one step, saved,
with the resumable exit code; time-based checkpoints are agreed; run.cfg
replays a run bit for bit.

Real `python -m dist_train.main` processes (and `launch.local` clusters);
the weights compared are those of the final checkpoints.
"""

import os

import numpy as np

from dist_train import errors
from tests.helpers import parity
from tests.helpers import processes

# 256 examples in global batches of 32: 8 steps an epoch, 16 in 2 epochs,
# in compiled loops of 2 steps.
RUN_FLAGS = ["--dataset=synthetic", "--num_train_examples=256",
             "--num_validation_examples=64", "--global_batch_size=32",
             "--epochs=2", "--learning_rate=0.05", "--steps_per_loop=2",
             "--log_every_steps=4", "--keep_checkpoints=20",
             processes.NO_HEALTH]
TOTAL_STEPS = 16


def _steps_saved(model_dir):
  names = os.listdir(os.path.join(str(model_dir), "checkpoints"))
  return sorted(int(name[len("ckpt-"):-len(".index")]) for name in names
                if name.startswith("ckpt-") and name.endswith(".index"))


def _final(model_dir):
  step, values = parity.checkpoint_values(str(model_dir))
  assert step == TOTAL_STEPS
  return {name: value for name, value in values.items()
          if not name.startswith("save_counter/")}


def _max_difference(a, b):
  assert a.keys() == b.keys()
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def test_time_limit_saves_exits_75_and_the_rerun_matches_and_replays(
    tmp_path):
  """A 1 s limit has passed by the first loop boundary: the run saves there
  and exits 75; rerun (with a longer limit: a change that is accepted), it
  ends with the weights of an uninterrupted run, which its run.cfg
  replays bit for bit."""
  uninterrupted = tmp_path / "uninterrupted"
  processes.run_cli(*RUN_FLAGS, f"--model_dir={uninterrupted}", check=True)
  expected = _final(uninterrupted)

  limited = tmp_path / "limited"
  result = processes.run_cli(*RUN_FLAGS, f"--model_dir={limited}",
                             "--max_runtime_s=1")
  assert result.returncode == errors.EXIT_PREEMPTED, result.stderr[-3000:]
  assert processes.error_line(result) == (
      "dist_train: error: stopped at step 2 after the time limit of 1 s; "
      "rerun the same command to resume")
  assert _steps_saved(limited) == [2]

  result = processes.run_cli(*RUN_FLAGS, f"--model_dir={limited}",
                             "--max_runtime_s=3600", check=True)
  assert "Resuming at step 2 " in result.stderr
  assert "Resuming with a changed option --max_runtime_s: 1.0 -> 3600.0" in (
      result.stderr)
  difference = _max_difference(_final(limited), expected)
  print(f"time limit at step 2, resumed: max weight difference "
        f"{difference:.2e}")
  assert difference <= 1e-6
  # The earlier start's options are kept beside the new run.cfg.
  kept = [name for name in os.listdir(limited)
          if name.startswith("run.") and name.endswith(".cfg")]
  assert len(kept) == 2 and "run.cfg" in kept, kept

  replayed = tmp_path / "replayed"
  processes.run_cli(f"--flagfile={uninterrupted}/run.cfg",
                    f"--model_dir={replayed}", check=True)
  replay = _final(replayed)
  assert all(np.array_equal(replay[k], expected[k]) for k in expected)


def test_two_workers_stop_at_one_step_on_the_time_limit(tmp_path):
  model_dir = tmp_path / "run"
  launch = processes.Launch(2, [
      *RUN_FLAGS, "--steps_per_loop=1", "--max_runtime_s=1",
      f"--collective_timeout_s={processes.COLLECTIVE_TIMEOUT_S}",
      f"--model_dir={model_dir}"])
  assert launch.wait(timeout=300) == errors.EXIT_PREEMPTED, (
      launch.output[-6000:])
  step = launch.stop_step("after the time limit of 1 s")
  assert _steps_saved(model_dir) == [step]


def test_two_workers_checkpoint_on_the_chiefs_clock(tmp_path):
  """A period shorter than any loop: a checkpoint at every loop boundary,
  the same steps on both workers (a save runs collectives: a disagreement
  would hang until --collective_timeout_s)."""
  model_dir = tmp_path / "run"
  launch = processes.Launch(2, [
      *RUN_FLAGS, "--mode=train", "--checkpoint_every_secs=0.001",
      f"--collective_timeout_s={processes.COLLECTIVE_TIMEOUT_S}",
      f"--model_dir={model_dir}"])
  assert launch.wait(timeout=300) == 0, launch.output[-6000:]
  assert _steps_saved(model_dir) == list(range(2, TOTAL_STEPS + 1, 2))
