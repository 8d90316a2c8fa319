"""--profile_steps: a real TensorFlow profiler trace of exactly those steps."""

import collections
import glob
import os

import pytest
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from dist_train import config as config_lib
from dist_train.loop import schedule as schedule_lib
from dist_train.outputs import profiler
from tests.helpers import processes


def test_loops_end_before_the_first_and_after_the_last_profiled_step():
  schedule = schedule_lib.LoopSchedule(
      num_examples=600, global_batch_size=32, num_epochs=1, steps_per_loop=5,
      log_every_steps=5, profile_steps=(3, 7))
  loops, step = [], 0
  while step < schedule.steps_per_epoch:
    length = schedule.next_loop_length(global_step=step, step_in_epoch=step)
    loops.append((step + 1, step + length))
    step += length
  assert loops[:4] == [(1, 2), (3, 5), (6, 7), (8, 10)]


@pytest.mark.parametrize("steps", [(3,), (5, 4), (0, 2), (1, 2, 3)])
def test_impossible_profile_steps_are_refused(steps):
  with pytest.raises(config_lib.ConfigError, match="--profile_steps"):
    config_lib.Config(model_dir="/tmp/unused", profile_steps=steps)


def test_each_worker_profiles_into_its_own_run():
  assert profiler.profile_dir("/runs/a", 0) == "/runs/a/train"
  assert profiler.profile_dir("/runs/a", 2) == "/runs/a/train/worker_2"


def _train_loop_calls(path):
  """How many compiled training loops the trace's host plane holds."""
  space = xplane_pb2.XSpace()
  with open(path, "rb") as f:
    space.ParseFromString(f.read())
  calls = collections.Counter()
  for plane in space.planes:
    names = {key: m.name for key, m in plane.event_metadata.items()}
    for line in plane.lines:
      for event in line.events:
        if names.get(event.metadata_id) == "_train_loop_fn":
          calls[plane.name] += 1
  return calls


def test_profile_steps_capture_a_trace_of_those_steps(tmp_path):
  model_dir = tmp_path / "run"
  result = processes.run_cli(
      f"--flagfile={processes.FLAGS_DIR}/cpu_test.cfg",
      f"--model_dir={model_dir}", "--epochs=1", "--profile_steps=3,7",
      check=True)
  profile_root = os.path.join(model_dir, "train", "plugins", "profile")
  assert f"Profiling steps 3-7 into {profile_root}" in result.stderr
  traces = glob.glob(os.path.join(profile_root, "*", "*.xplane.pb"))
  assert len(traces) == 1, os.listdir(profile_root)
  assert os.path.getsize(traces[0]) > 1000
  # Steps 3-5 and 6-7, not the first loop (1-2) or the next: one call
  # each, the one ending at a log step (5) too.
  assert _train_loop_calls(traces[0]) == {"/host:CPU": 2}
