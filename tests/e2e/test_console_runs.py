"""What a real run prints: only its own lines, and its error, on a console
with TensorFlow's default log level (tests/unit/test_console.py checks the
bar and the log format)."""

import re
import subprocess
import sys

from tests.helpers import processes

# absl's Python prefix: "I1127 13:05:02.123456 140234 controller.py:123] ".
ABSL_PYTHON_PREFIX = re.compile(
    r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ \S+\.py:\d+\] ", re.M)
# TensorFlow's C++ INFO lines, in Abseil's format and in its older own one.
CPP_INFO_LINE = re.compile(
    r"^(I\d{4} \d\d:\d\d:\S+ +\d+ \S+:\d+\]|\S+ \S+: I \S+\.cc:\d+\])", re.M)


def run_cli_with_default_log_level(*flags):
  """The CLI as a user starts it: TF_CPP_MIN_LOG_LEVEL not set."""
  env = processes.subprocess_env()
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  return subprocess.run(
      [sys.executable, "-m", "dist_train.main", *flags],
      cwd=processes.REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def assert_no_noise(stderr):
  for noise in ["Sharding callback duration", "then broadcast to", "oneDNN",
                "cpu_feature_guard", "cudart_stub", "absl::InitializeLog",
                "recv item cancelled"]:
    assert noise not in stderr, stderr[-3000:]
  assert not ABSL_PYTHON_PREFIX.search(stderr), stderr[-3000:]
  assert not CPP_INFO_LINE.search(stderr), stderr[-3000:]


def test_quickstart_prints_only_its_own_lines(tmp_path):
  result = run_cli_with_default_log_level(
      f"--flagfile={processes.FLAGS_DIR}/quickstart.cfg",
      f"--model_dir={tmp_path / 'run'}", "--epochs=1")
  assert result.returncode == 0, result.stderr[-3000:]
  assert_no_noise(result.stderr)
  assert re.search(r"^\d\d:\d\d:\d\d Training 4000 examples", result.stderr,
                   re.M), result.stderr
  assert re.search(r"^\d\d:\d\d:\d\d epoch 1/1 done at step 63 ",
                   result.stderr, re.M), result.stderr
  assert "\r" not in result.stderr and "\x1b" not in result.stderr


def test_a_run_that_fails_inside_tensorflow_still_shows_its_error(tmp_path):
  # Two replicas: MirroredStrategy's "Reduce to ... then broadcast" INFO
  # lines would print, and the failed step makes TensorFlow log a warning.
  result = run_cli_with_default_log_level(
      f"--model_dir={tmp_path / 'run'}",
      "--dataset=tests.helpers.plugin_fixtures:blobs_with_label_12",
      "--model=tests.helpers.plugin_fixtures:blob_model", "--cpu_replicas=2",
      "--global_batch_size=32", "--epochs=1")
  assert result.returncode == 1
  assert_no_noise(result.stderr)
  assert re.search(r"^W\d{4} .*\] .*INVALID_ARGUMENT: assertion failed: "
                   r"\[label\] \[12\]", result.stderr, re.M), result.stderr
  assert processes.error_line(result).startswith(
      "dist_train: error: training steps ")
  assert "assertion failed: [label] [12]" in processes.error_line(result)
