"""steps_per_second and examples_per_second leave out the compiling loop."""

import os
import re

import pytest

from dist_train.loop import throughput as throughput_lib
from dist_train.outputs import summaries
from tests.helpers import processes
from tests.helpers import model_fixtures


def test_rates_are_over_the_loops_since_the_last_take():
  throughput = throughput_lib.Throughput()
  throughput.add(examples=320, steps=10, seconds=0.5)
  throughput.add(examples=96, steps=3, seconds=0.3)
  assert throughput.take() == pytest.approx((416 / 0.8, 13 / 0.8))
  throughput.add(examples=64, steps=2, seconds=2.0)
  assert throughput.take() == pytest.approx((32.0, 1.0))  # Started over.


def test_no_timed_loop_gives_no_rate():
  throughput = throughput_lib.Throughput()
  assert throughput.take() == (None, None)
  throughput.add(examples=32, steps=1, seconds=0.1)
  throughput.take()
  assert throughput.take() == (None, None)


def test_first_logged_rate_leaves_out_the_compiling_loop(tmp_path):
  """Tracing the first loop's step sleeps TRACE_SECONDS. Steps 1-5 (that
  loop) and 6-10 make the first logging interval: had the first loop counted,
  its rate could not exceed 10 steps per TRACE_SECONDS."""
  model_dir = tmp_path / "run"
  result = processes.run_cli(
      f"--model_dir={model_dir}", "--model=tests.helpers.model_fixtures:slow_first_trace",
      "--dataset=synthetic", "--num_train_examples=640", "--mode=train",
      "--global_batch_size=32", "--epochs=1", "--steps_per_loop=5",
      "--log_every_steps=10", check=True)
  scalars = summaries.read_scalars(os.path.join(model_dir, "train"))
  assert [step for step, _ in scalars["steps_per_second"]] == [10, 20]
  steps_per_second = scalars["steps_per_second"][0][1]
  examples_per_second = scalars["examples_per_second"][0][1]
  ceiling = 10 / model_fixtures.TRACE_SECONDS
  assert steps_per_second > ceiling, (steps_per_second, ceiling)
  assert examples_per_second == pytest.approx(32 * steps_per_second)
  # The console line reports the same rate.
  logged = re.search(r"step 10 \|.*steps/s ([\d.]+)", result.stderr)
  assert logged, result.stderr[-3000:]
  assert float(logged.group(1)) == pytest.approx(steps_per_second, abs=0.06)
