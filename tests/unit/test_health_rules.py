"""The rules of the training-health report that need no run: which worker
is a straggler and why, and the options' checks."""

import numpy as np
import pytest

from dist_train import config as config_lib
from dist_train.loop import health_report


def _times(*rows):
  return np.array(rows, np.float64)


def test_a_worker_with_slow_input_is_named_with_its_input():
  # Worker 2 waits 40 ms for its input; the others step in 10 ms.
  found = health_report.find_straggler(
      _times((0.001, 0.010), (0.001, 0.011), (0.040, 0.010)), ratio=1.5)
  assert found == health_report.Straggler(worker=2, median=0.012,
                                          slow_part="input")


def test_a_worker_with_a_slow_step_is_named_with_its_step():
  found = health_report.find_straggler(
      _times((0.001, 0.030), (0.002, 0.010), (0.001, 0.010)), ratio=1.5)
  assert (found.worker, found.slow_part) == (0, "step")


def test_no_straggler_at_or_below_the_ratio():
  # 18 ms is 1.5x the median of 12 ms: not more than the ratio.
  times = _times((0.002, 0.010), (0.002, 0.010), (0.008, 0.010))
  assert health_report.find_straggler(times, ratio=1.5) is None
  assert health_report.find_straggler(times, ratio=1.4).worker == 2
  assert health_report.find_straggler(_times((0.0, 0.0)), ratio=1.5) is None


def test_two_workers_compare_with_their_mean():
  # The median of two is their mean: the slower is at most 2x it.
  times = _times((0.001, 0.001), (0.030, 0.001))
  assert health_report.find_straggler(times, ratio=1.5).worker == 1
  assert health_report.find_straggler(times, ratio=2.0) is None


def test_histograms_need_the_health_scalars_and_a_log_step():
  config_lib.Config(model_dir="/tmp/x", log_every_steps=5,
                    histogram_every_steps=10)
  with pytest.raises(config_lib.ConfigError,
                     match="multiple of --log_every_steps=5, got 12"):
    config_lib.Config(model_dir="/tmp/x", log_every_steps=5,
                      histogram_every_steps=12)
  with pytest.raises(config_lib.ConfigError, match="needs --health_scalars"):
    config_lib.Config(model_dir="/tmp/x", log_every_steps=5,
                      histogram_every_steps=10, health_scalars=False)
