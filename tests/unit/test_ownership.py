"""One run owns a model_dir; a dead or stalled owner frees it by itself.

Holders and contenders are real processes; kills are real signals. Another
host is a record naming it, or a child whose socket.gethostname() says so.
"""

import contextlib
import errno
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from dist_train.outputs import ownership
from tests.helpers import processes

# argv: model_dir, lease_s, host ("" for this one), then what to do: "hold"
# (print READY and sleep), "release" (acquire and release), "raise".
_HOLDER = """
import socket, sys, time
from dist_train.outputs import ownership
model_dir, lease_s, host, action = sys.argv[1:]
if host:
  socket.gethostname = lambda: host
owner = ownership.ModelDirOwnership(model_dir, lease_s=float(lease_s))
if action == "release":
  with owner:
    pass
  sys.exit(0)
owner.acquire()
if action == "raise":
  raise RuntimeError("the training loop failed")
print("READY", flush=True)
time.sleep(300)
"""

# Reads "model_dir start_time" lines; at start_time, tries to take model_dir,
# says WON or IN_USE, and holds what it won until stdin closes.
_CONTENDER = """
import sys, time
from dist_train.outputs import ownership
print("READY", flush=True)
owners = []
for line in sys.stdin:
  model_dir, start_time = line.split()
  time.sleep(max(0.0, float(start_time) - time.time()))
  owner = ownership.ModelDirOwnership(model_dir)
  try:
    owner.acquire()
  except ownership.ModelDirInUseError:
    print("IN_USE", flush=True)
  else:
    owners.append(owner)
    print("WON", flush=True)
"""


def _start(script, *args):
  return subprocess.Popen(
      [sys.executable, "-c", script, *map(str, args)], cwd=processes.REPO_ROOT,
      env=processes.subprocess_env(), stdin=subprocess.PIPE,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _next_line(child, timeout=20.0):
  """The child's next stdout line; fails if it ends or says nothing first."""
  ready, _, _ = select.select([child.stdout], [], [], timeout)
  line = child.stdout.readline() if ready else ""
  if not line:
    child.kill()
    raise AssertionError(f"no line from pid {child.pid} within {timeout}s:\n"
                         f"{child.communicate()[1][-3000:]}")
  return line.strip()


@contextlib.contextmanager
def _children(script, *args, count=1):
  """Starts `count` children and waits for their READY; kills them after."""
  children = []
  try:
    for _ in range(count):
      children.append(_start(script, *args))
    for child in children:
      assert _next_line(child) == "READY"
    yield children
  finally:
    for child in children:
      child.kill()
      child.communicate()


def _holder(model_dir, *, lease_s=60.0, host=""):
  return _children(_HOLDER, model_dir, lease_s, host, "hold")


def _run_holder(model_dir, action):
  return subprocess.run(
      [sys.executable, "-c", _HOLDER, str(model_dir), "60", "", action],
      cwd=processes.REPO_ROOT, env=processes.subprocess_env(),
      capture_output=True, text=True, timeout=60)


def _lock(model_dir):
  return model_dir / ownership.LOCK_FILE_NAME


def _write_record(model_dir, **fields):
  """Writes a record of a run on another host, changed by `fields`."""
  record = {"host": "other-host", "pid": 4242, "pid_start_time": 1,
            "boot_id": "other-boot", "started": 900.0, "renewed": 1000.0,
            "token": str(uuid.uuid4()), **fields}
  model_dir.mkdir(parents=True, exist_ok=True)
  _lock(model_dir).write_text(json.dumps(record))
  return record


def _this_machine(tmp_path):
  """The host, boot id and PID namespace this process writes in a record."""
  with ownership.ModelDirOwnership(str(tmp_path / "scratch")) as owner:
    record = owner.holder
  return {key: record[key] for key in ("host", "boot_id", "pid_ns")}


def _assert_owned_by_this_process(model_dir, left=()):
  """This process takes the model_dir and leaves nothing in it on release
  but `left` (what was there before)."""
  with ownership.ModelDirOwnership(str(model_dir)) as owner:
    assert owner.holder["pid"] == os.getpid()
  assert sorted(os.listdir(model_dir)) == sorted(left)


def test_second_run_is_refused_with_one_line_naming_the_holder(tmp_path):
  model_dir = tmp_path / "run"
  with _holder(model_dir) as (child,):
    token = json.loads(_lock(model_dir).read_text())["token"]
    with pytest.raises(ownership.ModelDirInUseError) as raised:
      ownership.ModelDirOwnership(str(model_dir)).acquire()
    assert re.fullmatch(
        re.escape(f"--model_dir={model_dir} is in use by the run with pid "
                  f"{child.pid} on host {socket.gethostname()} since ")
        + r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(lease renewed \d+s ago\); stop "
        r"that run or use another --model_dir", str(raised.value))
    assert raised.value.exit_code == 1
    # The first run carries on, its claim untouched.
    assert child.poll() is None
    assert json.loads(_lock(model_dir).read_text())["token"] == token


def test_sigkill_frees_the_dir_at_once_even_before_the_parent_reaps(tmp_path):
  model_dir = tmp_path / "run"
  with _holder(model_dir) as (child,):
    child.send_signal(signal.SIGKILL)
    # Wait until it is a zombie, but leave it unreaped.
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    _assert_owned_by_this_process(model_dir)


def test_clean_exit_leaves_no_lock(tmp_path):
  model_dir = tmp_path / "run"
  result = _run_holder(model_dir, "release")
  assert result.returncode == 0, result.stderr
  assert os.listdir(model_dir) == []


def test_crash_leaves_a_record_the_next_run_takes_over(tmp_path):
  model_dir = tmp_path / "run"
  result = _run_holder(model_dir, "raise")
  assert result.returncode == 1
  assert "the training loop failed" in result.stderr
  assert json.loads(_lock(model_dir).read_text())["pid"] != os.getpid()
  _assert_owned_by_this_process(model_dir)


@pytest.mark.parametrize("record_lease_s, age, taken_over", [
    (None, 59.0, False),
    (None, 61.0, True),
    (600.0, 61.0, False),  # The holder's own lease rules, not ours.
])
def test_other_host_is_judged_by_its_lease(tmp_path, record_lease_s, age,
                                           taken_over):
  model_dir = tmp_path / "run"
  fields = {} if record_lease_s is None else {"lease_s": record_lease_s}
  _write_record(model_dir, **fields)
  owner = ownership.ModelDirOwnership(str(model_dir), lease_s=60.0,
                                      clock=lambda: 1000.0 + age)
  if taken_over:
    with owner:
      assert owner.holder["pid"] == os.getpid()
  else:
    with pytest.raises(ownership.ModelDirInUseError,
                       match=f"pid 4242 on host other-host .* renewed "
                             f"{age:.0f}s ago"):
      owner.acquire()


@pytest.mark.parametrize("start_time_offset, boot_id, taken_over", [
    (0, None, False),  # The parent itself: alive.
    (1, None, True),  # Its pid, another process: reused.
    (0, "an-earlier-boot", True),  # Recorded before the host rebooted.
])
def test_same_host_is_judged_by_the_process(tmp_path, start_time_offset,
                                            boot_id, taken_over):
  model_dir = tmp_path / "run"
  machine = _this_machine(tmp_path)
  start_time = ownership._process_start_time(os.getppid())
  _write_record(model_dir, **dict(
      machine, pid=os.getppid(), pid_start_time=start_time + start_time_offset,
      renewed=time.time(), boot_id=boot_id or machine["boot_id"]))
  if taken_over:
    _assert_owned_by_this_process(model_dir)
  else:
    with pytest.raises(ownership.ModelDirInUseError,
                       match=f"by the run with pid {os.getppid()} "):
      ownership.ModelDirOwnership(str(model_dir)).acquire()


def test_renewal_keeps_the_lease_and_a_killed_holder_loses_it(tmp_path):
  model_dir, lease_s = tmp_path / "run", 0.6
  with _holder(model_dir, lease_s=lease_s, host="other-host") as (child,):
    first_renewal = json.loads(_lock(model_dir).read_text())["renewed"]
    deadline = time.monotonic() + 3 * lease_s
    while time.monotonic() < deadline:
      with pytest.raises(ownership.ModelDirInUseError, match="other-host"):
        ownership.ModelDirOwnership(str(model_dir)).acquire()
      time.sleep(0.05)
    last_renewal = json.loads(_lock(model_dir).read_text())["renewed"]
    assert last_renewal > first_renewal + lease_s

    child.kill()
    child.wait()
    last_renewal = json.loads(_lock(model_dir).read_text())["renewed"]
    # A kill between a renewal's temporary file and its rename leaves that
    # file (the lock keeps the record before it).
    left = [name for name in os.listdir(model_dir) if name.endswith(".tmp")]
    deadline = time.monotonic() + 10 * lease_s
    while True:
      with contextlib.suppress(ownership.ModelDirInUseError):
        _assert_owned_by_this_process(model_dir, left)
        break
      assert time.monotonic() < deadline, "the lease never ran out"
      time.sleep(0.05)
    assert time.time() - last_renewal > lease_s


def test_of_two_runs_racing_for_a_stale_record_one_wins(tmp_path):
  with _children(_CONTENDER, count=2) as children:
    for attempt in range(20):
      model_dir = tmp_path / f"run{attempt}"
      _write_record(model_dir, renewed=time.time() - 3600)
      start_time = time.time() + 0.05
      for child in children:
        child.stdin.write(f"{model_dir} {start_time}\n")
        child.stdin.flush()
      results = {child.pid: _next_line(child) for child in children}
      assert sorted(results.values()) == ["IN_USE", "WON"], attempt
      winner = json.loads(_lock(model_dir).read_text())["pid"]
      assert results[winner] == "WON", attempt
      assert os.listdir(model_dir) == [ownership.LOCK_FILE_NAME], attempt


def test_a_record_renewed_while_judged_stale_is_put_back(tmp_path,
                                                         monkeypatch):
  model_dir = tmp_path / "run"
  fresh = _write_record(model_dir, renewed=time.time())
  fresh_text = _lock(model_dir).read_text()
  read_record, reads = ownership._read_record, []

  def read_stale_first(path):
    # As if the holder renewed between this read and the move aside.
    reads.append(path)
    if len(reads) == 1:
      return dict(fresh, renewed=time.time() - 3600)
    return read_record(path)

  monkeypatch.setattr(ownership, "_read_record", read_stale_first)
  with pytest.raises(ownership.ModelDirInUseError, match="other-host"):
    ownership.ModelDirOwnership(str(model_dir)).acquire()
  assert _lock(model_dir).read_text() == fresh_text
  assert os.listdir(model_dir) == [ownership.LOCK_FILE_NAME]


def test_check_raises_once_another_run_replaced_the_record(tmp_path):
  model_dir = tmp_path / "run"
  with ownership.ModelDirOwnership(str(model_dir), lease_s=0.3) as owner:
    owner.check()
    _write_record(tmp_path / "other")
    os.replace(_lock(tmp_path / "other"), _lock(model_dir))
    other_text = _lock(model_dir).read_text()
    with pytest.raises(
        ownership.ModelDirLostError,
        match=f"^lost --model_dir={re.escape(str(model_dir))}: it is now "
              "held by the run with pid 4242 on host other-host "):
      owner.check()
    # The renewal thread saw it too, and stopped without taking it back.
    owner._renewer.join(timeout=5)
    assert not owner._renewer.is_alive()
  # Release leaves the other run's record alone.
  assert _lock(model_dir).read_text() == other_text


def test_check_raises_once_renewals_failed_for_longer_than_the_lease(
    tmp_path, monkeypatch):
  def disk_full(path, record):
    del record
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

  model_dir = tmp_path / "run"
  with ownership.ModelDirOwnership(str(model_dir), lease_s=0.3) as owner:
    monkeypatch.setattr(ownership, "_replace", disk_full)
    deadline = time.monotonic() + 5.0
    while True:
      try:
        owner.check()
      except ownership.ModelDirLostError as e:
        assert "No space left on device" in str(e)
        break
      assert time.monotonic() < deadline, "check() never gave up"
      time.sleep(0.05)
  assert os.listdir(model_dir) == []


def test_check_raises_once_the_record_was_removed(tmp_path):
  model_dir = tmp_path / "run"
  with ownership.ModelDirOwnership(str(model_dir)) as owner:
    _lock(model_dir).unlink()
    with pytest.raises(ownership.ModelDirLostError, match="was removed"):
      owner.check()


def test_release_is_idempotent_and_the_dir_can_be_taken_again(tmp_path):
  model_dir = tmp_path / "run"
  owner = ownership.ModelDirOwnership(str(model_dir))
  owner.release()
  owner.acquire()
  owner.release()
  owner.release()
  assert owner.holder is None
  with owner:
    owner.check()
  assert os.listdir(model_dir) == []


def test_an_unreadable_record_goes_stale_like_a_lease(tmp_path):
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  _lock(model_dir).write_text("{not json")
  with pytest.raises(ownership.ModelDirInUseError,
                     match="in use by an unreadable lock record"):
    ownership.ModelDirOwnership(str(model_dir)).acquire()
  os.utime(_lock(model_dir), (time.time() - 3600,) * 2)
  _assert_owned_by_this_process(model_dir)


def test_unwritable_model_dir_is_reported_not_swallowed(tmp_path):
  (tmp_path / "file").write_text("")
  model_dir = tmp_path / "file" / "run"
  with pytest.raises(
      ownership.ModelDirNotWritableError,
      match=f"--model_dir={re.escape(str(model_dir))}: .*Not a directory$"):
    ownership.ModelDirOwnership(str(model_dir)).acquire()
  if os.geteuid() != 0:  # root writes through permissions.
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o500)
    with pytest.raises(ownership.ModelDirNotWritableError,
                       match="Permission denied$"):
      ownership.ModelDirOwnership(str(read_only)).acquire()


def test_describe_holder():
  started = time.mktime((2026, 11, 27, 13, 5, 2, 0, 0, -1))
  record = {"host": "h1", "pid": 1234, "started": started,
            "renewed": started + 10}
  assert ownership.describe_holder(record, now=started + 13) == (
      "the run with pid 1234 on host h1 since 2026-11-27 13:05:02 (lease "
      "renewed 3s ago)")


def test_lease_must_be_positive():
  with pytest.raises(ValueError, match="lease_s must be positive, got 0"):
    ownership.ModelDirOwnership("/unused", lease_s=0)


def test_no_tensorflow_is_imported():
  result = processes.run_python(
      ["-c", "import sys; from dist_train.outputs import ownership; "
             "print('tensorflow' in sys.modules)"], check=True, timeout=60)
  assert result.stdout.strip() == "False"
