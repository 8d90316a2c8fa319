"""Training health across 2 worker processes (one replica each), from one
launch that several tests read, and on 2 local replicas: the gradient norm
of the global batch (split 3/3 and 2/3 over the workers or replicas) against
a hand replay of SGD, read back from the chief's event files; the
straggler warning naming worker 1, whose input sleeps; metrics.jsonl
holding the events' values."""

import os
import re

import numpy as np
import pytest

from dist_train.outputs import metrics_file
from dist_train.outputs import summaries
from tests.helpers import health_task
from tests.helpers import processes

LEARNING_RATE = 0.2
LOG_STEPS = [5, 10, 15, 20]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
  """(model_dir, the launch) of one epoch of 20 steps (120 examples, in
  global batches of 6 split 3/3), logged every 5, without validation: the
  input can read ahead by a batch or two between loops, not by a loop."""
  model_dir = str(tmp_path_factory.mktemp("health") / "run")
  launch = processes.Launch(2, [
      "--task=tests.helpers.health_task:slow_input",
      f"--model_dir={model_dir}",
      f"--global_batch_size={health_task.GLOBAL_BATCH_SIZE}",
      "--shuffle_buffer=1", "--epochs=1", "--log_every_steps=5",
      "--steps_per_loop=5", "--mode=train", f"--learning_rate={LEARNING_RATE}",
      # With 2 workers the slowest is at most 2x the median (their mean).
      "--straggler_warn_ratio=1.3",
      f"--collective_timeout_s={processes.COLLECTIVE_TIMEOUT_S}"])
  assert launch.wait(timeout=300) == 0, launch.output[-6000:]
  return model_dir, launch


def _assert_norms_match_the_replay(model_dir, log_steps, **replay):
  """gradient_norm and weight_norm in the chief's event files are, at each
  log step, those of the hand replay of SGD (health_task.reference_run)."""
  gradients, weights = health_task.reference_run(log_steps[-1], LEARNING_RATE,
                                                 **replay)
  scalars = summaries.read_scalars(os.path.join(str(model_dir), "train"))
  assert [step for step, _ in scalars["gradient_norm"]] == log_steps
  np.testing.assert_allclose(
      [value for _, value in scalars["gradient_norm"]],
      [health_task.norm(gradients[step - 1]) for step in log_steps],
      rtol=1e-5)
  np.testing.assert_allclose(
      [value for _, value in scalars["weight_norm"]],
      [health_task.norm(weights[step - 1]) for step in log_steps], rtol=1e-5)


def test_gradient_norm_is_the_global_batch_gradient_on_two_workers(
    two_workers):
  model_dir, _ = two_workers
  _assert_norms_match_the_replay(model_dir, LOG_STEPS,
                                 num_train=health_task.SLOW_INPUT_NUM_TRAIN)


def test_gradient_norm_is_the_global_batch_gradient_on_two_replicas(
    tmp_path):
  """2 local replicas of one process: 23 examples in global batches of 6,
  shares of 3/3 and, in each epoch's last batch, 3/2; no clipping, so the
  norm is that of the gradient the optimizer's all-reduce summed."""
  model_dir = tmp_path / "run"
  processes.run_cli(
      "--task=tests.helpers.health_task:linear", f"--model_dir={model_dir}",
      "--cpu_replicas=2", f"--global_batch_size={health_task.GLOBAL_BATCH_SIZE}",
      "--shuffle_buffer=1", "--epochs=2", "--log_every_steps=2",
      "--steps_per_loop=2", "--mode=train", f"--learning_rate={LEARNING_RATE}",
      check=True)
  _assert_norms_match_the_replay(model_dir, [2, 4, 6, 8])


def test_the_straggler_line_names_the_worker_with_slow_input(two_workers):
  model_dir, launch = two_workers
  lines = [line for line in launch.worker_lines(0) if "Straggler" in line]
  assert lines, launch.output[-6000:]
  for line in lines:
    assert re.search(r"worker 1 took [\d.]+ ms per step, [\d.]+x the median",
                     line), line
    assert line.rstrip().endswith("its input is slow"), line
  # Only the chief warns.
  assert not [line for line in launch.worker_lines(1) if "Straggler" in line]
  scalars = summaries.read_scalars(os.path.join(model_dir, "train"))
  slowest = [value for _, value in scalars["worker_step_time/slowest_worker"]]
  # The first interval also holds each worker's first steps (the
  # pipeline's start-up), on the chief as well.
  assert slowest[1:] == [1.0] * (len(LOG_STEPS) - 1), slowest
  for (_, most), (_, least), (_, input_time) in zip(
      scalars["worker_step_time/max"], scalars["worker_step_time/min"],
      scalars["worker_input_time/max"]):
    assert most >= input_time and most >= least > 0


def test_metrics_file_holds_the_chiefs_event_values(two_workers):
  model_dir, _ = two_workers
  records = metrics_file.read(os.path.join(model_dir, "metrics.jsonl"))
  events = summaries.read_scalars(os.path.join(model_dir, "train"))
  assert "gradient_norm" in events
  for tag, values in events.items():
    assert [(r["step"], r[tag]) for r in records if tag in r] == values, tag
  assert [r["step"] for r in records] == LOG_STEPS
  assert {(r["split"], r["epoch"]) for r in records} == {("train", 1)}


def test_plot_run_reads_the_metrics_file(two_workers, tmp_path):
  model_dir, _ = two_workers
  output = tmp_path / "curves.png"
  result = processes.run_python(
      ["scripts/plot_run.py", str(tmp_path),
       f"--metrics_file={os.path.join(model_dir, 'metrics.jsonl')}",
       f"--output={output}"], check=True)
  assert result.stdout.strip() == str(output)
  assert output.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
