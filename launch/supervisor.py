"""Runs the workers of a cluster as processes of this host, and supervises them.

`run_workers` starts one process per worker, streams each one's output with a
`[worker i]` prefix, and waits. When a worker fails, or the launcher gets
SIGINT or SIGTERM, it stops the other workers and returns non-zero; no worker
outlives it. `python -m launch.local` is the command-line front end. No TensorFlow here.
"""

import ctypes
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time

from typing import Mapping, Optional, Sequence, TextIO

from dist_train import errors

_PR_SET_PDEATHSIG = 1  # From <linux/prctl.h>.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith(
    "linux") else None


def _die_with_launcher():
  """Runs in each worker before exec: the kernel kills it if the launcher dies.

  This covers the one case the launcher cannot handle itself, being killed
  with SIGKILL.
  """
  if _LIBC is not None:
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclasses.dataclass
class _Worker:
  index: int
  process: subprocess.Popen
  reader: Optional[threading.Thread] = None

  @property
  def name(self):
    return f"worker {self.index} (pid {self.process.pid})"


def describe_exit(returncode: int) -> str:
  """'exited with code 1' or 'was killed by SIGKILL'."""
  if returncode < 0:
    try:
      return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
      return f"was killed by signal {-returncode}"
  return f"exited with code {returncode}"


def _stream(worker, out, lock):
  """Copies a worker's output to `out`, a line at a time, with its prefix."""
  prefix = f"[worker {worker.index}] "
  for raw in iter(worker.process.stdout.readline, b""):
    line = raw.decode("utf-8", errors="replace")
    with lock:
      out.write(prefix + (line if line.endswith("\n") else line + "\n"))
      out.flush()
  worker.process.stdout.close()


class _Signals:
  """Records SIGINT/SIGTERM for the supervising loop, and restores handlers."""

  def __init__(self):
    self.received = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGINT, signal.SIGTERM):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = self.received or signum

  def __exit__(self, *exc_info):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


def _signal_group(worker, signum):
  """Sends `signum` to the worker's process group (it and its children)."""
  try:
    # Each worker leads its own session, so its group id is its pid.
    os.killpg(worker.process.pid, signum)
  except (ProcessLookupError, PermissionError):
    pass


def stop_workers(workers, *, signum=signal.SIGTERM, grace_s: float,
                 log) -> None:
  """Sends `signum` to the running workers; SIGKILL after `grace_s` seconds."""
  running = [w for w in workers if w.process.poll() is None]
  for worker in running:
    _signal_group(worker, signum)
    _signal_group(worker, signal.SIGCONT)  # A stopped worker must see it.
  deadline = time.monotonic() + grace_s
  for worker in running:
    try:
      worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      log(f"{worker.name} did not stop within {grace_s:g}s; killing it")
      _signal_group(worker, signal.SIGKILL)
      worker.process.wait()
    log(f"stopped {worker.name}: it {describe_exit(worker.process.returncode)}")


def run_workers(commands: Sequence[Sequence[str]],
                envs: Sequence[Mapping[str, str]], *,
                cwd: Optional[str] = None, out: TextIO = sys.stdout,
                err: TextIO = sys.stderr, grace_s: float = 10.0,
                poll_s: float = 0.1) -> int:
  """Runs worker i as `commands[i]` with `envs[i]` until all are done.

  Args:
    commands: the command line of each worker.
    envs: the environment of each worker.
    cwd: their working directory; default: this process's.
    out: where the workers' output (stdout and stderr) is copied, each line
      prefixed with `[worker i] `.
    err: where the launcher's own messages go, prefixed with `[launcher] `.
    grace_s: how long a stopped worker has to exit before SIGKILL.
    poll_s: how often the workers are checked.

  Returns:
    0 when every worker exits with 0. errors.EXIT_PREEMPTED (75) when
    they stopped on SIGTERM after saving a checkpoint together. 1 when a
    worker fails (its exit code; 1 if a signal killed it): the message
    names it and how it ended, and the others are stopped. 128 + the signal
    number when the launcher is interrupted (SIGINT, SIGTERM), which it
    forwards to the workers.
  """
  if len(commands) != len(envs):
    raise ValueError(
        f"need one environment per command, got {len(envs)} for "
        f"{len(commands)} commands")
  lock = threading.Lock()

  def log(message):
    with lock:
      err.write(f"[launcher] {message}\n")
      err.flush()

  workers = []
  with _Signals() as signals:
    try:
      # All processes are started before any reader thread: forking while
      # other threads run is unsafe for `preexec_fn`.
      for index, (command, env) in enumerate(zip(commands, envs)):
        process = subprocess.Popen(
            list(command), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_launcher)
        workers.append(_Worker(index, process))
        log(f"started {workers[-1].name}: {' '.join(command)}")
      for worker in workers:
        worker.reader = threading.Thread(target=_stream,
                                         args=(worker, out, lock), daemon=True)
        worker.reader.start()
      return _supervise(workers, signals, grace_s=grace_s, poll_s=poll_s,
                        log=log)
    finally:
      # Also on an unexpected error in the launcher: no worker outlives it.
      stop_workers(workers, signum=signal.SIGKILL, grace_s=0, log=log)
      for worker in workers:
        if worker.reader is not None:
          worker.reader.join(timeout=10)


def _all_preempted(workers):
  return all(w.process.returncode == errors.EXIT_PREEMPTED
             for w in workers)


def _outcome(returncodes):
  """What the launcher does, from one reading of every worker's return code
  (None while it runs): ("wait", None), ("fail", index of the first failed
  worker), ("done", 0) or ("done", EXIT_PREEMPTED).

  One reading, not one poll per question: a worker that ends between two
  polls would otherwise look running to one question and finished to the
  next, and two workers that both exited 0 would be reported preempted.
  """
  for index, code in enumerate(returncodes):
    # A preempted worker saved and stopped with the others at one step;
    # wait for them rather than stop them.
    if code not in (None, 0, errors.EXIT_PREEMPTED):
      return "fail", index
  if any(code is None for code in returncodes):
    return "wait", None
  if all(code == 0 for code in returncodes):
    return "done", 0
  return "done", errors.EXIT_PREEMPTED


def _supervise(workers, signals, *, grace_s, poll_s, log):
  while True:
    if signals.received is not None:
      name = signal.Signals(signals.received).name
      log(f"got {name}; forwarding it to the workers")
      stop_workers(workers, signum=signals.received, grace_s=grace_s, log=log)
      if _all_preempted(workers):
        log("every worker saved a checkpoint and stopped; rerun to resume")
        return errors.EXIT_PREEMPTED
      return 128 + signals.received
    what, value = _outcome([worker.process.poll() for worker in workers])
    if what == "fail":
      worker = workers[value]
      returncode = worker.process.returncode
      others = [w for w in workers if w is not worker]
      log(f"{worker.name} failed: it {describe_exit(returncode)}; "
          f"stopping the other {len(others)} worker(s)")
      stop_workers(others, grace_s=grace_s, log=log)
      # The worker's own code says why (3: NaN loss); a signal says less.
      return returncode if returncode > 0 else 1
    if what == "done":
      if value == 0:
        log(f"all {len(workers)} worker(s) finished")
      else:
        log("every worker saved a checkpoint and stopped; rerun to resume")
      return value
    time.sleep(poll_s)
