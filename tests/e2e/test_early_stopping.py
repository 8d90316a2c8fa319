"""Early stopping on 1 and 2 replicas and 2 workers, and an evaluator
(--mode=continuous_eval) beside the 2 workers.

The run overfits: 64 training digits of the packaged sample, Adam at 1e-2,
60 epochs of 2 steps, validation on 500 digits after each epoch. Validation
loss bottoms out within a few epochs; with a patience of 3 evaluations the
run must stop long before its last epoch, at the same step however many
replicas or workers compute the (aggregated) metrics.
"""

import concurrent.futures
import json
import os
import re
import subprocess
import time

import pytest

from dist_train.outputs import summaries
from tests.helpers import processes

EPOCHS = 60
TOTAL_STEPS = 2 * EPOCHS
DATA_FLAGS = ["--dataset=mnist_sample", "--num_train_examples=64",
              "--num_validation_examples=500", "--global_batch_size=32",
              f"--epochs={EPOCHS}", "--optimizer=adam", "--learning_rate=0.01",
              "--log_every_steps=1000", "--keep_checkpoints=100",
              processes.NO_HEALTH]
TRAIN_FLAGS = [*DATA_FLAGS, "--best_metric=loss",
               "--early_stopping_patience=3",
               "--early_stopping_min_delta=0.01"]
# Long enough that an evaluator waiting it out would fail the timing below.
EVAL_TIMEOUT_S = 120
STOPPED = re.compile(r"Stopped early at step (\d+): validation loss has not "
                     r"improved by more than 0.01 for 3 evaluations")


class _Evaluator:
  """`dist_train.main --mode=continuous_eval` with its output in a file."""

  def __init__(self, model_dir, log_path):
    self._log_path = log_path
    self._log = open(log_path, "w")
    self.process = subprocess.Popen(
        [*processes.python_command(), "-m", "dist_train.main", *DATA_FLAGS,
         f"--model_dir={model_dir}", "--mode=continuous_eval",
         f"--eval_timeout_s={EVAL_TIMEOUT_S}", "--cpu_replicas=1"],
        cwd=processes.REPO_ROOT, env=processes.subprocess_env(),
        stdout=self._log, stderr=subprocess.STDOUT)
    self.end_time = None

  @property
  def output(self):
    with open(self._log_path) as f:
      return f.read()

  def wait_until_watching(self, timeout=240):
    """Until it built its model and watches for checkpoints."""
    deadline = time.monotonic() + timeout
    while "Training 64 examples, validating 500" not in self.output:
      assert self.process.poll() is None, self.output[-3000:]
      assert time.monotonic() < deadline, self.output[-3000:]
      time.sleep(0.2)

  def wait(self, timeout):
    try:
      self.process.wait(timeout=timeout)
      self.end_time = time.monotonic()
    finally:
      if self.process.poll() is None:
        self.process.kill()
        self.process.wait()
      self._log.close()
    return self.process.returncode


def _two_workers_beside_an_evaluator(model_dir, log_path):
  evaluator = _Evaluator(model_dir, log_path)
  try:
    # Watching before the first checkpoint exists: it can see them all.
    evaluator.wait_until_watching()
    launch = processes.Launch(2, [
        *TRAIN_FLAGS, f"--model_dir={model_dir}",
        f"--collective_timeout_s={processes.COLLECTIVE_TIMEOUT_S}"])
    launch.wait(timeout=300)
    trainers_end = time.monotonic()
    evaluator.wait(timeout=EVAL_TIMEOUT_S + 120)
  finally:
    if evaluator.process.poll() is None:
      evaluator.process.kill()
      evaluator.process.wait()
  return launch, evaluator, evaluator.end_time - trainers_end


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("early_stopping")
  dirs = {name: str(root / name) for name in
          ("one_replica", "two_replicas", "two_workers")}
  with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
    local = {replicas: pool.submit(
        processes.run_cli, *TRAIN_FLAGS, f"--cpu_replicas={replicas}",
        f"--model_dir={dirs[name]}")
             for replicas, name in ((1, "one_replica"), (2, "two_replicas"))}
    beside = pool.submit(_two_workers_beside_an_evaluator,
                         dirs["two_workers"], str(root / "evaluator.log"))
    launch, evaluator, evaluator_lag = beside.result()
    results = {replicas: future.result() for replicas, future in local.items()}
  return dirs, results, launch, evaluator, evaluator_lag


def _checkpoint_steps(model_dir):
  return sorted(int(name[len("ckpt-"):-len(".index")])
                for name in os.listdir(os.path.join(model_dir, "checkpoints"))
                if name.endswith(".index"))


def _check_stopped_run(model_dir, log):
  """The stop step of a run that stopped early, after checking its outputs."""
  [stop] = STOPPED.findall(log)
  stop = int(stop)
  assert stop < TOTAL_STEPS - 2, log[-3000:]  # Before its last epoch.
  assert f"epoch {stop // 2}/{EPOCHS} done at step {stop} |" in log
  assert f"epoch {stop // 2 + 1}/{EPOCHS}" not in log
  assert _checkpoint_steps(model_dir)[-1] == stop
  assert os.path.isfile(os.path.join(model_dir, "export", "model.keras"))
  with open(os.path.join(model_dir, "training_done.json")) as f:
    done = json.load(f)  # What the run returned (RunResult).
  assert done["global_step"] == stop
  assert STOPPED.match(f"Stopped early at step {stop}: "
                       f"{done['stopped_early']}"), done
  return stop


def test_an_overfitting_run_stops_early_at_the_same_step_everywhere(runs):
  dirs, results, launch, _, _ = runs
  for replicas, result in results.items():
    assert result.returncode == 0, result.stderr[-3000:]
  assert launch.process.returncode == 0, launch.output[-6000:]
  one = _check_stopped_run(dirs["one_replica"], results[1].stderr)
  two = _check_stopped_run(dirs["two_replicas"], results[2].stderr)
  chief_log = "".join(launch.worker_lines(0))
  workers = _check_stopped_run(dirs["two_workers"], chief_log)
  print(f"stopped early at step {one} (1 replica), {two} (2 replicas), "
        f"{workers} (2 workers) of {TOTAL_STEPS}")
  assert one == two == workers
  # Worker 1 took part in every save of the chief, up to the same step.
  copies = [int(step) for step in re.findall(
      r"Saved this worker's copy of the checkpoint of step (\d+)",
      "".join(launch.worker_lines(1)))]
  assert copies == _checkpoint_steps(dirs["two_workers"])
  assert copies[-1] == workers


def test_the_evaluator_beside_the_workers_evaluates_each_checkpoint_once(
    runs):
  dirs, _, launch, evaluator, evaluator_lag = runs
  model_dir = dirs["two_workers"]
  output = evaluator.output
  assert evaluator.process.returncode == 0, output[-3000:]
  checkpoint_dir = os.path.join(model_dir, "checkpoints")
  evaluated = [int(step) for step in re.findall(
      rf"Evaluated {re.escape(checkpoint_dir)}/ckpt-(\d+) \|", output)]
  [stop] = STOPPED.findall("".join(launch.worker_lines(0)))
  eval_scalars = summaries.read_scalars(os.path.join(model_dir, "eval"))
  print(f"the evaluator evaluated steps {evaluated} of checkpoints "
        f"{_checkpoint_steps(model_dir)}; it ended {evaluator_lag:.1f}s after "
        "the trainers")
  # Each checkpoint it saw, once, in order, ending with the last one.
  assert evaluated == sorted(set(evaluated))
  assert set(evaluated) <= set(_checkpoint_steps(model_dir))
  assert evaluated[-1] == int(stop)
  for tag in ("loss", "accuracy"):
    assert [step for step, _ in eval_scalars[tag]] == evaluated, tag
  with open(os.path.join(model_dir, "eval_results.json")) as f:
    results = json.load(f)
  assert results["global_step"] == int(stop)
  assert results["checkpoint"] == os.path.join(checkpoint_dir,
                                               f"ckpt-{stop}")
  # It stopped by itself after the final checkpoint, not by its timeout.
  assert f"Evaluated the final checkpoint (step {stop}); done" in output
  assert evaluator_lag < 30
  # The same weights give the trainers' validation metrics.
  validation = summaries.read_scalars(os.path.join(model_dir, "validation"))
  for tag in ("loss", "accuracy"):
    trained = dict(validation[tag])
    for step, value in eval_scalars[tag]:
      assert abs(value - trained[step]) < 1e-5, (tag, step)
