"""Training-health scalars on one replica, in this process, read back from
the real event files: the gradient norm of the global batch before clipping
and the clipped fraction against a hand replay of SGD; the weight norm; the
loss scale and skipped steps of mixed_float16 under a forced overflow;
histograms; host memory; metrics.jsonl holding the events' values, and a
resume that drops the lines of the steps it runs again."""

import json
import os
import shutil
import time

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from dist_train import config as config_lib
from dist_train import train
from dist_train.outputs import metrics_file
from dist_train.outputs import summaries
from tests.helpers import health_task

LEARNING_RATE = 0.2
CLIP_NORM = 0.6
# 2 epochs of 4 steps, logged every 2 steps (loops of 2: the measured step
# is the second of each loop); histograms at steps 4 and 8. With clipping:
# the norm is the one clipping computes (e2e/test_health.py has none, and
# reads the optimizer's sum).
RUN = dict(global_batch_size=health_task.GLOBAL_BATCH_SIZE, shuffle_buffer=1,
           epochs=2, log_every_steps=2, steps_per_loop=2,
           learning_rate=LEARNING_RATE, clip_norm=CLIP_NORM,
           histogram_every_steps=4, keep_checkpoints=10)
LOG_STEPS = [2, 4, 6, 8]


@pytest.fixture(scope="module")
def strategy():
  return train.create_strategy(config_lib.Config(model_dir="/tmp/unused"))


def _train(model_dir, strategy, task_fn=health_task.linear, **changes):
  config = config_lib.Config(model_dir=str(model_dir), **{**RUN, **changes})
  return train.train_and_evaluate(config, task=task_fn(config),
                                  strategy=strategy)


@pytest.fixture(scope="module")
def run(strategy, tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("health") / "run"
  _train(model_dir, strategy)
  return str(model_dir)


def _scalars(model_dir, split="train"):
  return summaries.read_scalars(os.path.join(model_dir, split))


def test_gradient_norm_is_the_global_batch_gradient_before_clipping(run):
  gradients, weights = health_task.reference_run(8, LEARNING_RATE, CLIP_NORM)
  scalars = _scalars(run)
  assert [step for step, _ in scalars["gradient_norm"]] == LOG_STEPS
  np.testing.assert_allclose(
      [value for _, value in scalars["gradient_norm"]],
      [health_task.norm(gradients[step - 1]) for step in LOG_STEPS],
      rtol=1e-5)
  # The weights moved far from where they started, and weight_norm follows.
  initial = health_task.norm((health_task.INITIAL_KERNEL,
                              health_task.INITIAL_BIAS))
  final = health_task.norm(weights[-1])
  assert abs(final - initial) > 1e-2
  np.testing.assert_allclose(
      [value for _, value in scalars["weight_norm"]],
      [health_task.norm(weights[step - 1]) for step in LOG_STEPS], rtol=1e-5)


def test_clipped_fraction_counts_each_interval(run):
  gradients, _ = health_task.reference_run(8, LEARNING_RATE, CLIP_NORM)
  clipped = [health_task.norm(g) > CLIP_NORM for g in gradients]
  expected = [np.mean(clipped[step - 2:step]) for step in LOG_STEPS]
  assert 0 < sum(clipped) < len(clipped)  # Some steps clip, some do not.
  assert [value for _, value in _scalars(run)["clipped_fraction"]] == (
      pytest.approx(expected))


def test_histograms_of_weights_and_summed_gradients(run):
  accumulator = event_accumulator.EventAccumulator(
      os.path.join(run, "train"),
      size_guidance={event_accumulator.TENSORS: 0})
  accumulator.Reload()
  tags = accumulator.Tags()["tensors"]
  kernel_tag = next(t for t in tags if t.startswith("gradients/") and
                    t.endswith("kernel"))
  events = accumulator.Tensors(kernel_tag)
  assert [e.step for e in events] == [4, 8]
  gradients, _ = health_task.reference_run(8, LEARNING_RATE, CLIP_NORM)
  for event in events:
    buckets = tf.make_ndarray(event.tensor_proto)  # [left, right, count].
    kernel_gradient = gradients[event.step - 1][0]
    assert buckets[:, 2].sum() == kernel_gradient.size
    np.testing.assert_allclose([buckets[0, 0], buckets[-1, 1]],
                               [kernel_gradient.min(), kernel_gradient.max()],
                               rtol=1e-5)
  assert any(t.startswith("weights/") for t in tags)


def test_host_memory_is_reported_on_cpu(run):
  scalars = _scalars(run)
  rss = [value for _, value in scalars["memory/host/rss_mb"]]
  peak = [value for _, value in scalars["memory/host/peak_rss_mb"]]
  assert len(rss) == len(LOG_STEPS) and min(rss) > 50
  assert all(p >= r for p, r in zip(peak, rss))
  assert not any(tag.startswith("memory/GPU") for tag in scalars)


def test_one_worker_times_its_steps_by_the_wall_clock(run):
  """One worker has no clock in its steps: its time per step is the wall
  clock of its loops after the first (which traces), so the interval of
  step 2, the first loop's alone, has none; its input wait is not
  measured apart."""
  scalars = _scalars(run)
  steps = [step for step, _ in scalars["worker_step_time/max"]]
  assert steps == LOG_STEPS[1:]
  for tag in ("worker_step_time/min", "worker_step_time/slowest_worker"):
    assert [step for step, _ in scalars[tag]] == steps, tag
  assert "worker_input_time/max" not in scalars
  for (_, most), (_, least), (_, slowest) in zip(
      scalars["worker_step_time/max"], scalars["worker_step_time/min"],
      scalars["worker_step_time/slowest_worker"]):
    assert most == least > 0 and slowest == 0


def _check_file_matches_events(model_dir, *, every_event=True):
  """Each line's scalars are the events' values at its step (the same
  float32 values, exactly; the later ones where a resumed run wrote a step
  again); with `every_event`, every event has its line."""
  records = metrics_file.read(os.path.join(model_dir, "metrics.jsonl"))
  for split in ("train", "validation"):
    events = {tag: dict(values) for tag, values in
              _scalars(model_dir, split).items()}
    lines = [r for r in records if r["split"] == split]
    steps = [r["step"] for r in lines]
    assert lines and steps == sorted(set(steps)), split  # Each step once.
    for record in lines:
      scalars = {k: v for k, v in record.items()
                 if k not in ("step", "epoch", "split", "wall_time")}
      assert scalars == {tag: events[tag][record["step"]] for tag in scalars}
      assert record["epoch"] == (record["step"] - 1) // 4 + 1
      if every_event:
        assert set(scalars) == {tag for tag, values in events.items()
                                if record["step"] in values}
    if every_event:
      assert {s for values in events.values() for s in values} == set(steps)
  return records


def test_metrics_file_holds_the_event_values(run):
  records = _check_file_matches_events(run)
  assert [r["step"] for r in records if r["split"] == "train"] == LOG_STEPS
  assert [r["step"] for r in records if r["split"] == "validation"] == [4, 8]


def test_resume_drops_the_lines_of_steps_run_again(run, strategy, tmp_path):
  model_dir = str(tmp_path / "resumed")
  shutil.copytree(run, model_dir)
  # As if the run had stopped after logging steps 6 and 8 but before it
  # saved them: its latest checkpoint is that of step 4.
  checkpoints = os.path.join(model_dir, "checkpoints")
  for name in os.listdir(checkpoints):
    if name.startswith("ckpt-8"):
      os.remove(os.path.join(checkpoints, name))
  with open(os.path.join(checkpoints, "checkpoint"), "w") as f:
    f.write('model_checkpoint_path: "ckpt-4"\n'
            'all_model_checkpoint_paths: "ckpt-4"\n')
  before = {(r["split"], r["step"]): r["wall_time"] for r in
            metrics_file.read(os.path.join(model_dir, "metrics.jsonl"))}
  resumed_at = time.time()
  _train(model_dir, strategy)
  # The first run's events of step 6 stay beside the resumed run's; the
  # resumed run logs no throughput at its first interval.
  records = _check_file_matches_events(model_dir, every_event=False)
  assert [(r["split"], r["step"]) for r in records] == [
      ("train", 2), ("train", 4), ("validation", 4), ("train", 6),
      ("train", 8), ("validation", 8)]
  for record in records:
    key = (record["split"], record["step"])
    if record["step"] <= 4:
      assert record["wall_time"] == before[key]  # Kept as written.
    else:
      assert record["wall_time"] > resumed_at  # Written by the resume.


def test_loss_scale_halves_and_counts_a_forced_overflow(strategy, tmp_path):
  _train(tmp_path / "overflow", strategy,
         task_fn=health_task.overflow_at_step,
         mixed_precision="mixed_float16", clip_norm=None,
         histogram_every_steps=None)
  scalars = _scalars(str(tmp_path / "overflow"))
  # The batch of step 3 (read again as the 7th batch, in epoch 2) overflows:
  # skipped, and the scale halved from Keras' initial 2**15. A skipped step
  # is no optimizer step: 8 batches make 6 steps, logged at 2, 4 and 6.
  assert scalars["loss_scale"] == [(2, 2.0**15), (4, 2.0**14), (6, 2.0**13)]
  assert scalars["skipped_steps"] == [(2, 0.0), (4, 1.0), (6, 1.0)]
  assert "clipped_fraction" not in scalars
  with open(tmp_path / "overflow" / "metrics.jsonl") as f:
    assert [json.loads(line)["loss_scale"] for line in f
            if '"train"' in line] == [2.0**15, 2.0**14, 2.0**13]


def test_metrics_file_where_files_cannot_be_appended_to():
  path = "ram://health_test/run/metrics.jsonl"
  assert metrics_file.resolve_path(None, "ram://health_test/run") == path
  assert metrics_file.resolve_path("none", "ram://health_test/run") is None
  first = metrics_file.MetricsFile(path, steps_per_epoch=4)
  first.start(0)
  first("train", {"loss": 1.0}, 2)
  first("train", {"loss": 0.5}, 4)
  first("validation", {"loss": 0.75}, 4)
  first("train", {"loss": 0.25}, 6)
  assert [(r["split"], r["step"], r["epoch"], r["loss"])
          for r in metrics_file.read(path)] == [
              ("train", 2, 1, 1.0), ("train", 4, 1, 0.5),
              ("validation", 4, 1, 0.75), ("train", 6, 2, 0.25)]
  resumed = metrics_file.MetricsFile(path, steps_per_epoch=4)
  resumed.start(4)
  resumed("train", {"loss": 0.125}, 6)
  assert [(r["step"], r["loss"]) for r in metrics_file.read(path)] == [
      (2, 1.0), (4, 0.5), (4, 0.75), (6, 0.125)]
