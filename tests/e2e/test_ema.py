"""The weight average (--ema_decay) is the same recurrence on every layout.

The test computes the average itself, step by step, from the model's own
weights of a one-device run (tests/helpers/ema_run.py records them after
every step):

    A_0 = W_0,  A_{n+1} = decay_n * A_n + (1 - decay_n) * W_{n+1},
    decay_n = d * min(1, n / warmup)

and compares the average saved in the checkpoint of the same run on 2
workers and on 2 replicas killed with SIGKILL and resumed, within 1e-6. The one-device run also shows what uses the average: its
validation, best/, the export and --mode=evaluate (and --eval_with_ema=false
the model's own weights), while the model it trains keeps its own weights.

600 examples in global batches of 32: 19 steps an epoch (the last of 24
examples: uneven shares), 38 steps, a checkpoint every 4.
"""

import concurrent.futures
import os
import signal
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import processes

DECAY, WARMUP = 0.75, 5
TOTAL_STEPS = 38
KILL_AFTER = 12
TOLERANCE = 1e-6
NUM_WEIGHTS = 6  # 3 Dense layers: kernels and biases.
FLAGS = ["--dataset=synthetic", "--num_train_examples=600",
         "--num_validation_examples=96", "--global_batch_size=32",
         "--epochs=2", "--learning_rate=0.05", "--hidden_units=16",
         "--log_every_steps=4", "--checkpoint_every_steps=4",
         "--keep_checkpoints=30", f"--ema_decay={DECAY}",
         f"--ema_warmup_steps={WARMUP}", "--best_metric=loss",
         "--optimizer=sgd"]


def _reference_run(output_dir):
  output = os.path.join(output_dir, "reference.npz")
  processes.run_python(
      ["tests/helpers/ema_run.py", output, *FLAGS, "--steps_per_loop=1",
       "--cpu_replicas=1", f"--model_dir={os.path.join(output_dir, 'one')}"],
      check=True, timeout=600)
  with np.load(output) as f:
    return dict(f)


def _two_workers(model_dir):
  launch = processes.Launch(2, [*FLAGS, "--steps_per_loop=3",
                                f"--model_dir={model_dir}"])
  assert launch.wait(timeout=600) == 0, launch.output[-6000:]
  return model_dir


def _killed_and_resumed(model_dir):
  """2 replicas, SIGKILLed after ckpt-KILL_AFTER, then the same command;
  returns (model_dir, the step it resumed at)."""
  command = [*FLAGS, "--steps_per_loop=2", "--cpu_replicas=2",
             f"--model_dir={model_dir}"]
  process = subprocess.Popen(
      [*processes.python_command(), "-m", "dist_train.main", *command],
      cwd=processes.REPO_ROOT, env=processes.subprocess_env(),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  processes.wait_for_checkpoint(process, model_dir, KILL_AFTER)
  process.send_signal(signal.SIGKILL)
  process.communicate(timeout=60)
  assert process.returncode == -signal.SIGKILL
  result = processes.run_cli(*command, check=True, timeout=600)
  assert "Resuming at step " in result.stderr, result.stderr[-3000:]
  return model_dir, int(result.stderr.split("Resuming at step ")[1].split()[0])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The module's runs, two processes at a time (one per core)."""
  root = tmp_path_factory.mktemp("ema")
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    futures = {
        "workers": pool.submit(_two_workers, str(root / "workers")),
        "reference": pool.submit(_reference_run, str(root)),
        "killed": pool.submit(_killed_and_resumed, str(root / "killed")),
    }
    return {"root": str(root),
            **{name: future.result() for name, future in futures.items()}}


def _raw(reference, step):
  return [reference[f"raw_{step}_{i}"] for i in range(NUM_WEIGHTS)]


def recurrence(reference, last_step=TOTAL_STEPS):
  """[A_0, ..., A_last] of the module docstring, in float32 as the run."""
  averages = [_raw(reference, 0)]
  for n in range(last_step):
    decay = np.float32(DECAY * min(1.0, n / WARMUP))
    averages.append([decay * a + (np.float32(1) - decay) * w for a, w in
                     zip(averages[-1], _raw(reference, n + 1))])
  return averages


def _difference(a, b):
  assert len(a) == len(b) == NUM_WEIGHTS
  return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def checkpoint_average(model_dir):
  """(step, the average, the model's own weights) of the latest checkpoint."""
  path = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
  reader = tf.train.load_checkpoint(path)
  average = [reader.get_tensor(f"ema/averages/{i}/.ATTRIBUTES/VARIABLE_VALUE")
             for i in range(NUM_WEIGHTS)]
  own = [reader.get_tensor(f"optimizer/_trainable_variables/{i}/.ATTRIBUTES/"
                           "VARIABLE_VALUE") for i in range(NUM_WEIGHTS)]
  assert int(reader.get_tensor("ema/updates/.ATTRIBUTES/VARIABLE_VALUE")) == (
      int(path.rsplit("-", 1)[1]))
  return int(path.rsplit("-", 1)[1]), average, own


def test_the_average_lags_the_weights(runs):
  """The recurrence is not trivially the weights: the average is far from
  them, and the warmup matters."""
  reference = runs["reference"]
  final = recurrence(reference)[-1]
  lag = _difference(final, _raw(reference, TOTAL_STEPS))
  print(f"average vs weights after {TOTAL_STEPS} steps: {lag:.2e}")
  assert lag > 100 * TOLERANCE


@pytest.mark.parametrize("layout", ["workers", "killed"])
def test_average_matches_the_one_device_recurrence(runs, layout):
  model_dir = runs[layout][0] if layout == "killed" else runs[layout]
  step, average, own = checkpoint_average(model_dir)
  assert step == TOTAL_STEPS
  expected = recurrence(runs["reference"])
  difference = _difference(average, expected[-1])
  own_difference = _difference(own, _raw(runs["reference"], TOTAL_STEPS))
  print(f"{layout}: average vs recurrence {difference:.2e}, own weights vs "
        f"one device {own_difference:.2e}")
  assert difference <= TOLERANCE
  # A one-step lag (an update before instead of after the step) shows.
  assert _difference(average, expected[-2]) > 100 * TOLERANCE


def test_resume_after_sigkill_continued_the_saved_average(runs):
  _, resumed_at = runs["killed"]
  assert KILL_AFTER - 4 <= resumed_at < TOTAL_STEPS


def test_training_keeps_its_own_weights(runs):
  """The one-device run's checkpoint holds the average beside weights that
  trained on as without it (what the callback saw after the last step)."""
  reference = runs["reference"]
  _, average, own = checkpoint_average(os.path.join(runs["root"], "one"))
  assert _difference(own, _raw(reference, TOTAL_STEPS)) == 0
  assert _difference(average, recurrence(reference)[-1]) <= TOLERANCE


def test_export_best_and_evaluation_use_the_average(runs):
  reference = runs["reference"]
  averages = recurrence(reference)
  exported = [reference[f"export_{i}"] for i in range(NUM_WEIGHTS)]
  assert _difference(exported, averages[-1]) <= TOLERANCE
  best_step = int(reference["best_step"])
  best = [reference[f"best_{i}"] for i in range(NUM_WEIGHTS)]
  assert _difference(best, averages[best_step]) <= TOLERANCE
  # --mode=evaluate sees the average of the last checkpoint, as the run's
  # last validation did; --eval_with_ema=false the model's own weights.
  ema_loss = float(reference["evaluate_ema_loss"])
  raw_loss = float(reference["evaluate_raw_loss"])
  print(f"validation loss: average {ema_loss:.6f}, own weights "
        f"{raw_loss:.6f}")
  assert ema_loss == pytest.approx(float(reference["validation_loss"]),
                                   abs=1e-6)
  assert abs(ema_loss - raw_loss) > 1e-4
