"""Ctrl-C and SIGTERM end a worker that waits for its peers to join.

Real processes and real signals: worker 0 of a 2-worker cluster starts alone,
so it waits inside TensorFlow, holding Python's lock, for a peer that never
comes (distribute/join_guard.py).
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from dist_train import errors
from launch import workers
from tests.helpers import processes

_JOINING = "Joining the cluster as task worker:0"
_PROMPT_S = 10


def _sidecars_of(pid):
  """Pids of the running join guards watching process `pid`."""
  found = []
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        argv = f.read().decode(errors="replace").split("\0")
    except OSError:
      continue
    if any(a.endswith("join_guard.py") for a in argv) and str(pid) in argv:
      found.append(int(entry))
  return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT],
                         ids=lambda signum: signum.name)
def test_a_stop_while_waiting_for_peers_exits_75_at_once(tmp_path, signum):
  addresses = [f"{workers.LOOPBACK}:{port}" for port in workers.free_ports(2)]
  env = processes.subprocess_env({
      "TF_CONFIG": json.dumps(workers.make_tf_config(addresses, 0)),
      "TF_CPP_MIN_LOG_LEVEL": "2"})
  process = subprocess.Popen(
      [sys.executable, "-m", "dist_train.main", "--dataset=synthetic",
       f"--model_dir={tmp_path / 'run'}"],
      cwd=processes.REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)
  lines = []
  reader = threading.Thread(
      target=lambda: lines.extend(l.rstrip("\n") for l in process.stderr),
      daemon=True)
  reader.start()
  try:
    deadline = time.monotonic() + 120
    while not any(_JOINING in line for line in lines):
      assert process.poll() is None and time.monotonic() < deadline, lines
      time.sleep(0.05)
    time.sleep(1.0)  # Well inside the wait: the peer never comes.
    assert process.poll() is None, lines
    assert len(_sidecars_of(process.pid)) == 1

    start = time.monotonic()
    process.send_signal(signum)
    code = process.wait(timeout=_PROMPT_S)
    seconds = time.monotonic() - start
  finally:
    process.kill()
  reader.join(10)

  assert code == errors.EXIT_PREEMPTED, lines
  assert seconds < _PROMPT_S, seconds
  assert [l for l in lines if l.startswith("dist_train: error:")] == [
      f"dist_train: error: stopped by {signum.name} while waiting for the "
      "other workers to join: nothing to save, nothing lost; rerun the same "
      "command to resume"], lines
  assert _sidecars_of(process.pid) == []
