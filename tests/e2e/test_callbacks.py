"""Keras callbacks in the Python API (tests/helpers/callback_run.py), on 2
replicas and on 2 workers started by the launcher's supervisor.

Synthetic data, 330 examples in global batches of 32: 11 steps an epoch.
Loops are at most 5 steps and end at evaluations (every 4 steps) and epoch
ends: 4, 8, 11, 12, 16, ... A callback asking to stop at step 14 or later
is heard at the end of step 16.
"""

import concurrent.futures
import csv
import io
import json
import os
import re

import pytest

from dist_train.outputs import summaries
from launch import supervisor
from launch import workers
from tests.helpers import processes

FLAGS = ["--dataset=synthetic", "--num_train_examples=330",
         "--num_validation_examples=200", "--global_batch_size=32",
         "--epochs=3", "--optimizer=sgd", "--learning_rate=0.05",
         "--steps_per_loop=5", "--log_every_steps=100",
         "--eval_every_steps=4"]
STOP_FROM = 14
STOP_STEP = 16  # The first loop end at or after STOP_FROM.


def _run_two_workers(output_dir):
  """Both workers run the callback; only worker 1 asks to stop."""
  command = [*processes.python_command(), "tests/helpers/callback_run.py",
             output_dir, f"--stop_at_step={STOP_FROM}", "--stop_on_worker=1",
             "--reduce_lr", "--",
             *FLAGS, f"--collective_timeout_s="
             f"{processes.COLLECTIVE_TIMEOUT_S}"]
  out, err = io.StringIO(), io.StringIO()
  returncode = supervisor.run_workers(
      [command] * 2,
      workers.local_worker_envs(2, base_env=processes.subprocess_env()),
      cwd=processes.REPO_ROOT, out=out, err=err)
  return returncode, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("callbacks")
  replicas_dir, workers_dir = str(root / "replicas"), str(root / "workers")
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    two_workers = pool.submit(_run_two_workers, workers_dir)
    api = processes.run_python([
        "tests/helpers/callback_run.py", replicas_dir, "--csv",
        f"--stop_at_step={STOP_FROM}", "--reduce_lr", "--", *FLAGS,
        "--cpu_replicas=2"])
    two_workers = two_workers.result()
  assert api.returncode == 0, api.stderr[-6000:]
  return (replicas_dir, json.loads(api.stdout.strip().splitlines()[-1]),
          api.stderr, workers_dir, two_workers)


def test_csv_logger_writes_a_row_per_epoch(runs):
  model_dir = os.path.join(runs[0], "csv")
  with open(os.path.join(model_dir, "history.csv")) as f:
    rows = list(csv.DictReader(f))
  print(f"history.csv: {rows[-1]}")
  assert [row["epoch"] for row in rows] == ["0", "1", "2"]
  assert list(rows[0]) == ["epoch", "accuracy", "loss", "val_accuracy",
                           "val_loss"]
  validation = summaries.read_scalars(os.path.join(model_dir, "validation"))
  for name in ("loss", "accuracy"):
    assert [(step, pytest.approx(value, abs=1e-6))
            for step, value in validation[name]] == [
                (11 * (i + 1), float(row[f"val_{name}"]))
                for i, row in enumerate(rows)], name
  for row in rows:
    assert 0 < float(row["loss"]) < 10 and 0 <= float(row["accuracy"]) <= 1


def _check_stopped_by_a_callback(result, model_dir):
  assert result["global_step"] == STOP_STEP
  assert result["stopped_early"] == "a callback set model.stop_training"
  assert result["batch_ends"][-1] == STOP_STEP
  checkpoints = sorted(name for name in os.listdir(
      os.path.join(model_dir, "checkpoints")) if name.endswith(".index"))
  assert checkpoints == ["ckpt-11.index", f"ckpt-{STOP_STEP}.index"]
  assert os.path.isfile(os.path.join(model_dir, "export", "model.keras"))


def test_a_callback_stops_the_run_at_its_loop_boundary(runs):
  replicas_dir, results, log, _, _ = runs
  stop = results["stop"]
  print(f"2 replicas: the callback asked at step {stop['asked_at']}; "
        f"loops ended at {stop['batch_ends']}")
  assert stop["asked_at"] == STOP_STEP
  _check_stopped_by_a_callback(stop, os.path.join(replicas_dir, "stop"))
  assert (f"Stopped early at step {STOP_STEP}: a callback set "
          "model.stop_training") in log
  # Evaluations every 4 steps, each at the end of a loop.
  assert stop["evaluations"] == [4, 8, 12, 16]
  assert set(stop["evaluations"]) <= set(stop["batch_ends"])


def test_a_stop_asked_on_worker_1_stops_both_workers_at_one_step(runs):
  _, _, _, workers_dir, (returncode, out, err) = runs
  assert returncode == 0, (out + err)[-6000:]
  results = {}
  for line in out.splitlines():
    match = re.match(r"\[worker (\d)\] (\{.*\})$", line)
    if match:
      results[int(match.group(1))] = json.loads(match.group(2))["stop"]
  print(f"2 workers: worker 1 asked at step {results[1]['asked_at']}; "
        f"stopped at steps {results[0]['global_step']} and "
        f"{results[1]['global_step']}")
  assert results[0]["asked_at"] is None and results[1]["asked_at"] == (
      STOP_STEP)
  for result in results.values():
    _check_stopped_by_a_callback(result, os.path.join(workers_dir, "stop"))
  assert re.search(
      rf"\[worker 0\] .*Stopped early at step {STOP_STEP}: a callback",
      out), out[-6000:]
  assert re.search(r"\[worker 1\] .*Saved this worker's copy of the "
                   rf"checkpoint of step {STOP_STEP} ", out), out[-6000:]


def test_reduce_lr_on_plateau_cuts_at_one_step_on_every_worker(runs):
  """keras.callbacks.ReduceLROnPlateau sets `model.optimizer.learning_rate`
  on each worker from the same validation loss: both workers and the
  2-replica run see the same rate after every loop, with cuts in it, and
  end with the same weights."""
  _, results, _, _, (returncode, out, err) = runs
  assert returncode == 0, (out + err)[-6000:]
  workers_results = {}
  for line in out.splitlines():
    match = re.match(r"\[worker (\d)\] (\{.*\})$", line)
    if match:
      workers_results[int(match.group(1))] = json.loads(
          match.group(2))["reduce_lr"]
  replicas = results["reduce_lr"]
  print(f"rates after each loop: {replicas['rates']}")
  assert len(set(replicas["rates"])) >= 2  # It cut.
  assert replicas["rates"][0] == pytest.approx(0.05)
  for result in workers_results.values():
    assert result["batch_ends"] == replicas["batch_ends"]
    assert result["rates"] == pytest.approx(replicas["rates"], rel=1e-6)
    assert result["weight_sum"] == pytest.approx(replicas["weight_sum"],
                                                 abs=1e-4)
