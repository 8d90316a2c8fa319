"""Shared test helpers: running the CLI and helper scripts as real processes."""

import os
import subprocess
import sys


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS_DIR = os.path.join(REPO_ROOT, "launch", "flags")

# TensorFlow's C++ start-up banner hides the lines tests assert on; errors
# (level 3) still print.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def subprocess_env(overrides=None):
  # A cluster around the test run (TF_CONFIG, a SLURM job step) would make
  # --strategy=auto multi_worker; tests that want one set their own.
  env = {name: value for name, value in os.environ.items()
         if name != "TF_CONFIG" and not name.startswith("SLURM_")}
  env.update(overrides or {})
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return env


def run_python(args, *, timeout=300, check=False, env_overrides=None):
  """Runs `python ARGS` from the repository root; returns CompletedProcess."""
  result = subprocess.run(
      [sys.executable, *args], cwd=REPO_ROOT,
      env=subprocess_env(env_overrides),
      capture_output=True, text=True, timeout=timeout)
  if check and result.returncode != 0:
    raise AssertionError(
        f"python {' '.join(args)} exited {result.returncode}:\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
  return result


def run_cli(*flags, timeout=300, check=False, env_overrides=None):
  """Runs `python -m dist_train.main FLAGS`."""
  return run_python(["-m", "dist_train.main", *flags], timeout=timeout,
                    check=check, env_overrides=env_overrides)


def error_line(result):
  """The one `dist_train: error:` line a failed run printed."""
  lines = [line for line in result.stderr.splitlines()
           if line.startswith("dist_train: error:")]
  assert len(lines) == 1, result.stderr[-3000:]
  return lines[0]
