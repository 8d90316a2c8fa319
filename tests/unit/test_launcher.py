"""The launcher supervising real processes: small Python workers, no TF."""

import io
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from launch import supervisor as launcher
from tests.helpers import processes


def _worker(code):
  return [sys.executable, "-c", textwrap.dedent(code)]


def _alive(pid):
  """True while `pid` runs (a zombie does not count)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def _pids(err_text):
  """{worker index: pid} from the `started worker i (pid N)` lines."""
  pids = {}
  for line in err_text.splitlines():
    if "] started worker " in line:
      words = line.split("started worker ", 1)[1].split()
      pids[int(words[0])] = int(words[2].rstrip("):"))
  return pids


def _run(commands, **kwargs):
  out, err = io.StringIO(), io.StringIO()
  start = time.monotonic()
  code = launcher.run_workers(commands, [processes.subprocess_env()] * len(
      commands), out=out, err=err, **kwargs)
  return code, out.getvalue(), err.getvalue(), time.monotonic() - start


def _after_file(path, code):
  """Worker code that runs `code` once `path` exists: the file another
  worker creates when it is ready, instead of a guess at how long it takes."""
  return (f"import os, time\nwhile not os.path.exists({str(path)!r}):\n"
          f"  time.sleep(0.01)\n{textwrap.dedent(code)}")


def test_output_is_prefixed_and_success_is_zero():
  code, out, err, _ = _run([
      _worker("print('hello from 0'); print('bye')"),
      _worker("import sys; print('hello from 1', file=sys.stderr)")])
  assert code == 0
  assert "[worker 0] hello from 0\n" in out
  assert "[worker 0] bye\n" in out
  assert "[worker 1] hello from 1\n" in out
  assert "[launcher] all 2 worker(s) finished" in err
  pids = _pids(err)
  assert len(pids) == 2 and not any(_alive(pid) for pid in pids.values())


def test_a_failing_worker_stops_the_others_and_is_named(tmp_path):
  ready = tmp_path / "worker0.ready"
  code, out, err, seconds = _run([
      _worker(f"""
          import time
          print('waiting', flush=True)
          open({str(ready)!r}, 'w').close()
          time.sleep(120)
          """),
      _worker(_after_file(ready, "import sys; sys.exit(3)"))], grace_s=10)
  pids = _pids(err)
  assert code == 3  # The failing worker's own exit code.
  assert (f"[launcher] worker 1 (pid {pids[1]}) failed: it exited with code 3; "
          "stopping the other 1 worker(s)") in err
  assert (f"[launcher] stopped worker 0 (pid {pids[0]}): it was killed by "
          "SIGTERM") in err
  assert "[worker 0] waiting" in out
  assert seconds < 30
  assert not any(_alive(pid) for pid in pids.values())


def test_a_worker_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path):
  ready = tmp_path / "worker0.ready"
  code, _, err, seconds = _run([
      _worker(f"""
          import signal, time
          signal.signal(signal.SIGTERM, signal.SIG_IGN)
          open({str(ready)!r}, 'w').close()
          time.sleep(120)
          """),
      _worker(_after_file(ready, "raise SystemExit(1)"))], grace_s=2)
  pids = _pids(err)
  assert code == 1
  assert f"worker 0 (pid {pids[0]}) did not stop within 2s; killing it" in err
  assert f"stopped worker 0 (pid {pids[0]}): it was killed by SIGKILL" in err
  assert seconds < 30
  assert not any(_alive(pid) for pid in pids.values())


_HARNESS = """
import os, sys
from launch import supervisor as launcher
sleeper = [sys.executable, "-c", '''
import signal, sys, time
def on_signal(signum, frame):
  open(sys.argv[1], "w").write("got " + signal.Signals(signum).name)
  sys.exit(0)
for signum in (signal.SIGINT, signal.SIGTERM):
  signal.signal(signum, on_signal)
print("ready", flush=True)
time.sleep(120)
''']
marks = sys.argv[1:]
sys.exit(launcher.run_workers([sleeper + [m] for m in marks],
                              [dict(os.environ)] * len(marks)))
"""


def _start_harness(tmp_path):
  """A launcher process running 2 workers that record the signal they get."""
  marks = [str(tmp_path / f"worker{i}.mark") for i in range(2)]
  process = subprocess.Popen(
      [sys.executable, "-c", _HARNESS, *marks], cwd=processes.REPO_ROOT,
      env=processes.subprocess_env(), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  ready = 0
  while ready < 2:  # Both workers run and have installed their handler.
    line = process.stdout.readline()
    assert line, process.stderr.read()
    ready += line.endswith("] ready\n")
  return process, marks


# SIGINT is what Ctrl-C sends to the launcher; the workers lead sessions of
# their own, away from the terminal, and get it only from the launcher.
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM],
                         ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_launcher_is_forwarded_to_the_workers(tmp_path,
                                                              signum):
  process, marks = _start_harness(tmp_path)
  process.send_signal(signum)
  out, err = process.communicate(timeout=60)
  assert process.returncode == 128 + signum, out + err
  assert f"[launcher] got {signum.name}; forwarding it to the workers" in err
  pids = _pids(err)
  for index, mark in enumerate(marks):
    with open(mark) as f:
      assert f.read() == f"got {signum.name}"
    assert (f"[launcher] stopped worker {index} (pid {pids[index]}): it "
            "exited with code 0") in err
  assert not any(_alive(pid) for pid in pids.values())


def test_workers_die_with_a_killed_launcher(tmp_path):
  process, _ = _start_harness(tmp_path)
  process.kill()
  process.wait(timeout=30)
  err = process.stderr.read()
  pids = _pids(err)
  assert len(pids) == 2, err
  deadline = time.monotonic() + 30
  while any(_alive(pid) for pid in pids.values()):
    assert time.monotonic() < deadline, f"workers {pids} outlived the launcher"
    time.sleep(0.1)


def test_commands_and_environments_must_pair():
  with pytest.raises(ValueError, match="one environment per command, got 1 "
                                       "for 2 commands"):
    launcher.run_workers([["true"], ["true"]], [{}])


@pytest.mark.parametrize("returncode, text", [
    (0, "exited with code 0"), (3, "exited with code 3"),
    (-9, "was killed by SIGKILL"), (-15, "was killed by SIGTERM")])
def test_describe_exit(returncode, text):
  assert launcher.describe_exit(returncode) == text


@pytest.mark.parametrize("returncodes, outcome", [
    ((None, None), ("wait", None)),
    ((0, None), ("wait", None)),
    ((75, None), ("wait", None)),
    ((0, 0), ("done", 0)),
    ((0, 75), ("done", 75)),
    ((75, 0), ("done", 75)),
    ((0, 0, 0), ("done", 0)),
    ((0, 75, 0), ("done", 75)),
    ((0, None, 0), ("wait", None)),
    ((75, 75), ("done", 75)),
    ((None, 1), ("fail", 1)),
    ((0, -9), ("fail", 1)),
    ((3, 75), ("fail", 0))])
def test_the_outcome_is_decided_from_one_reading_of_every_worker(
    returncodes, outcome):
  """Two workers that both exit 0 finish with 0, whenever each ends: the
  decision reads every return code once (a worker ending between two polls
  once made a finished run look preempted, exit 75)."""
  assert launcher._outcome(list(returncodes)) == outcome
