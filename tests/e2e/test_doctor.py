"""`dist-train doctor` as a real process: it passes on 2 CPU replicas and on
2 workers started by launch.local, and a dead peer (before or after the
rendezvous), an unwritable model_dir or a late step fails it within
--timeout_s with one line and a non-zero exit code."""

import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time

import pytest

import dist_train
from launch import workers
from tests.helpers import processes

PREFIX = "dist_train doctor: error: "


def _doctor(*flags, env_overrides=None, timeout=120):
  """`python -m dist_train.main doctor FLAGS` (what `dist-train doctor`
  runs), forked from the prewarmed interpreter; (result, seconds)."""
  start = time.monotonic()
  result = processes.run_cli("doctor", *flags, timeout=timeout,
                             env_overrides=env_overrides)
  return result, time.monotonic() - start


def _error_line(result):
  lines = [line for line in result.stderr.splitlines()
           if line.startswith(PREFIX)]
  assert len(lines) == 1, result.stdout[-3000:] + result.stderr[-3000:]
  return lines[0][len(PREFIX):]


@pytest.fixture(scope="module")
def one_host(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("doctor") / "run"
  result, _ = _doctor("--cpu_replicas=2", f"--model_dir={model_dir}")
  return result, model_dir


def test_it_passes_on_two_cpu_replicas(one_host):
  result, _ = one_host
  assert result.returncode == 0, result.stderr[-3000:]
  assert "  ok  all-reduce over 2 replica(s): sum of (replica index + 1) = 3 " \
      "on every local replica\n" in result.stdout
  assert result.stdout.rstrip().endswith(
      "dist_train doctor: every check passed")
  assert PREFIX not in result.stderr


def test_it_reports_the_versions_build_devices_and_cluster(one_host):
  out = one_host[0].stdout
  for name, version in (
      ("python", platform.python_version()),
      ("tensorflow", importlib.metadata.version("tensorflow")),
      ("keras", importlib.metadata.version("keras")),
      ("dist_train", dist_train.__version__)):
    assert f"\n  {name:<12} {version}\n" in out, out
  assert re.search(r"\n  CUDA {9}\S", out), out
  assert "\n  cluster      none: this process trains alone" in out
  # --cpu_replicas=2 splits the CPU in two, as in the training run.
  assert "\n  visible      /device:CPU:0 (CPU)\n" in out
  assert "\n               /device:CPU:1 (CPU)\n" in out
  assert "\n  replicas     2: " in out


def test_the_checkpoint_is_written_read_and_removed(one_host):
  result, model_dir = one_host
  assert f"  ok  checkpoint written, read back and removed in {model_dir}\n" \
      in result.stdout
  assert os.path.isdir(model_dir) and os.listdir(model_dir) == []


def test_an_unwritable_model_dir_fails_naming_it(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  result, _ = _doctor(f"--model_dir={blocker}/run")
  assert result.returncode == 1
  line = _error_line(result)
  assert line.startswith(f"writing a test checkpoint in --model_dir="
                         f"{blocker}/run failed: "), line
  assert "  ok  all-reduce over 1 replica(s)" in result.stdout


@pytest.fixture(scope="module")
def two_workers():
  launch = processes.Launch(2, ["doctor", "--timeout_s=120",
                                "--model_dir=ram://doctor"])
  launch.wait(timeout=300)
  return launch


def test_it_passes_on_two_workers_with_the_sum_of_both(two_workers):
  assert two_workers.process.returncode == 0, two_workers.output[-6000:]
  for index in range(2):
    lines = "".join(two_workers.worker_lines(index))
    other = 1 - index
    assert re.search(
        rf"  cluster      from TF_CONFIG, 2 workers; this is worker {index} "
        rf"\(127\.0\.0\.1:\d+\)\n  peer         worker {other} "
        rf"\(127\.0\.0\.1:\d+\)\n", lines), lines
    assert f"  ok  every peer reached: worker {other} (" in lines
    # Only this worker's own device, although TensorFlow lists both.
    assert re.search(rf"  visible      /job:worker/replica:0/task:{index}/"
                     r"device:CPU:0 \(CPU\)\n  replicas", lines), lines
    assert ("  ok  all-reduce over 2 replica(s) on 2 workers: sum of "
            "(replica index + 1) = 3 on every local replica\n") in lines
    assert ("  ok  checkpoint written, read back and removed in "
            "ram://doctor\n") in lines
    assert "dist_train doctor: every check passed" in lines


def _two_worker_tf_config(index):
  """TF_CONFIG of worker `index` of 2, whose other worker nobody runs."""
  addresses = [f"127.0.0.1:{port}" for port in workers.free_ports(2)]
  return addresses, {"TF_CONFIG": json.dumps(
      workers.make_tf_config(addresses, index))}


@pytest.mark.parametrize("index", [0, 1])
def test_a_dead_peer_in_tf_config_fails_within_the_timeout(index):
  addresses, env = _two_worker_tf_config(index)
  result, seconds = _doctor("--timeout_s=2", env_overrides=env)
  assert result.returncode == 1
  dead = 1 - index
  assert _error_line(result) == (
      f"worker {dead} ({addresses[dead]}) did not join the all-reduce within "
      "2 s (nothing listens at that address: is its process running?)")
  assert seconds < 30  # Not the default --timeout_s of 60.


def test_a_dead_peer_of_a_slurm_step_fails_naming_its_address():
  port_base = processes.consecutive_free_ports(2)
  result, _ = _doctor(
      "--timeout_s=2", f"--slurm_port_base={port_base}",
      env_overrides={"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2",
                     "SLURM_STEP_NODELIST": "127.0.0.1",
                     "SLURM_STEP_TASKS_PER_NODE": "2"})
  assert result.returncode == 1
  assert (f"  cluster      from the SLURM job step, 2 workers; this is worker "
          f"0 (127.0.0.1:{port_base})\n  peer         worker 1 "
          f"(127.0.0.1:{port_base + 1})\n") in result.stdout
  assert _error_line(result).startswith(
      f"worker 1 (127.0.0.1:{port_base + 1}) did not join the all-reduce "
      "within 2 s")


def test_a_peer_that_dies_after_the_rendezvous_fails_within_the_timeout():
  """TensorFlow's join then waits, holding Python's lock: the process that
  watches it ends the doctor."""
  addresses, env = _two_worker_tf_config(0)
  peer = subprocess.Popen(
      [sys.executable, "tests/helpers/doctor_peer.py", addresses[1],
       "worker 1", addresses[0], "worker 0"],
      cwd=processes.REPO_ROOT, stdout=subprocess.PIPE, text=True)
  try:
    result, seconds = _doctor("--timeout_s=4", env_overrides=env)
  finally:
    peer.kill()
    peer.wait()
  assert peer.stdout.read() == "met\n"
  assert "  ok  every peer reached: worker 1" in result.stdout
  assert result.returncode != 0
  assert _error_line(result) == (
      f"worker 1 ({addresses[1]}) did not join the all-reduce within 4 s (it "
      "answered the rendezvous, then TensorFlow's join waited for it: did "
      "its process die?)")
  assert seconds < 40


def test_a_late_step_ends_the_process_with_its_line():
  """The deadline thread ends the process although the main thread is
  still busy in the late step, and leaves a step in time alone."""
  result = processes.run_python(["-c", (
      "import time\n"
      "from dist_train.doctor import deadline\n"
      "watch = deadline.Deadline(timeout_s=1.0)\n"
      "with watch.guard(lambda: 'the first step was late'):\n"
      "  time.sleep(0.3)\n"
      "print('in time', flush=True)\n"
      "start = time.monotonic()\n"
      "with watch.guard(lambda: f'late after {time.monotonic() - start:.2f}"
      " s'):\n"
      "  time.sleep(30)\n")], timeout=20, prewarmed=False)
  assert result.returncode == 1
  assert result.stdout == "in time\n"
  late = re.fullmatch(rf"{PREFIX}late after ([\d.]+) s\n", result.stderr)
  assert late, result.stderr
  assert 1.0 <= float(late.group(1)) < 5.0


def test_a_peer_that_dies_after_joining_fails_the_all_reduce_naming_it():
  """Whichever notices first: the coordination service (its error names the
  task) or the deadline (the peer's address no longer answers)."""
  addresses, env = _two_worker_tf_config(0)
  peer_env = {"TF_CONFIG": json.dumps(workers.make_tf_config(addresses, 1))}
  peer = {}

  def run_peer():
    peer["result"] = processes.run_python(
        ["tests/helpers/doctor_peer.py", addresses[1], "worker 1",
         addresses[0], "worker 0", "join"], timeout=120,
        env_overrides=peer_env)

  thread = threading.Thread(target=run_peer)
  thread.start()
  try:
    result, seconds = _doctor("--timeout_s=10", env_overrides=env)
  finally:
    thread.join()
  assert peer["result"].stdout == "met\njoined\n", peer["result"].stderr
  assert "  ok  every peer reached: worker 1" in result.stdout
  assert result.returncode == 1
  line = _error_line(result)
  assert line.startswith(f"worker 1 ({addresses[1]}) "), line
  assert "all-reduce" in line
  assert seconds < 40
