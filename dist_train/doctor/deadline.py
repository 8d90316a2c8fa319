"""`--timeout_s` for each step of the doctor's smoke test: a thread that ends
the process with one line when a step lasts too long.

A collective whose peer died may wait for a long time (until the
coordination service notices, or for ever if it does not), and TensorFlow's
threads may keep the process from exiting after it. The doctor is a
diagnosis, not a run with anything to save: when a step is late the thread
prints the error line and ends the process with `os._exit`, whatever its
other threads are doing. (The main program aborts its collectives instead,
distribute/watchdog.py, because it has state to report and close.)

TensorFlow's join (the MultiWorkerMirroredStrategy constructor) holds
Python's lock while it waits for the peers, so no thread can act then:
`watched_from_outside` starts a small process for it instead (this file as a
script, standard library only), which prints the line and kills the doctor
when the join is late.

No TensorFlow here.
"""

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Optional, Sequence

PREFIX = "dist_train doctor: error: "
_EXIT_WATCH = []
EXIT_FAILED = 1


def fail(message: str, exit_code: int = EXIT_FAILED) -> None:
  """Prints the one error line and ends the process at once."""
  sys.stdout.flush()
  sys.stderr.write(PREFIX + message + "\n")
  sys.stderr.flush()
  os._exit(exit_code)  # pylint: disable=protected-access


class Deadline:
  """Ends the process when a guarded step lasts longer than `timeout_s`."""

  def __init__(self, *, timeout_s: float):
    self.timeout_s = timeout_s
    self._lock = threading.Condition()
    self._deadline = None
    self._message_fn = None
    self._thread = threading.Thread(target=self._watch, daemon=True,
                                    name="dist_train_doctor_deadline")
    self._thread.start()

  @contextlib.contextmanager
  def guard(self, message_fn: Callable[[], str]):
    """Watches the block; `message_fn()` says what failed if it is late (it
    runs in the watching thread, and may probe the peers)."""
    with self._lock:
      self._deadline = time.monotonic() + self.timeout_s
      self._message_fn = message_fn
      self._lock.notify()
    try:
      yield
    finally:
      with self._lock:
        self._deadline = None
        self._message_fn = None

  def _watch(self):
    with self._lock:
      while True:
        if self._deadline is None:
          self._lock.wait()
          continue
        left = self._deadline - time.monotonic()
        if left > 0:
          self._lock.wait(left)
          continue
        message_fn: Optional[Callable[[], str]] = self._message_fn
        break
    fail(message_fn())


def unreachable(addresses: Sequence[str], timeout_s: float = 1.0) -> list:
  """The host:port addresses that accept no connection now (a dead process)."""
  dead = []
  for address in addresses:
    host, port = address.rsplit(":", 1)
    try:
      with socket.create_connection((host.strip("[]"), int(port)),
                                    timeout=timeout_s):
        pass
    except (OSError, ValueError):
      dead.append(address)
  return dead


def _start_sidecar(timeout_s, message, peers):
  """Starts the watching process; returns it and the pipe end whose closing
  (or this process's end) tells it the watched part is over."""
  read_end, write_end = os.pipe()  # Not inherited by other children.
  sidecar = subprocess.Popen(
      # -I: the standard library only, not this script's folder.
      [sys.executable, "-I", os.path.abspath(__file__), str(os.getpid()),
       repr(timeout_s), PREFIX + message, *peers],
      stdin=read_end, stdout=subprocess.DEVNULL)
  os.close(read_end)
  return sidecar, write_end


@contextlib.contextmanager
def watched_from_outside(*, timeout_s: float, message: str,
                         peers: Sequence[str] = ()):
  """Kills this process with `message` on stderr when the block lasts longer
  than `timeout_s`, even while the block holds Python's lock.

  Args:
    timeout_s: how long the block may last.
    message: the error, after the prefix; `{peer}` in it becomes the first
      of `peers` ("name (host:port)") whose address answers no more, or
      "a peer" when all answer.
    peers: the peers as "name (host:port)".
  """
  sidecar, write_end = _start_sidecar(timeout_s, message, peers)
  try:
    yield
  finally:
    os.close(write_end)  # The sidecar exits (or this process has ended).
    sidecar.wait()


def watch_exit(*, timeout_s: float, message: str,
               peers: Sequence[str] = ()) -> None:
  """Like `watched_from_outside`, for the rest of this process: its exit
  included, which TensorFlow may hold (waiting for the peers)."""
  # Kept open until this process ends, which closes it.
  _EXIT_WATCH.append(_start_sidecar(timeout_s, message, peers))


def _watch_from_outside(pid: int, timeout_s: float, line: str,
                        peers: Sequence[str]) -> None:
  """The sidecar: kills `pid` with `line` unless stdin closes in time."""
  if select.select([sys.stdin], [], [], timeout_s)[0]:
    return  # Closed: the block ended in time.
  addresses = {peer.rsplit(" (", 1)[1].rstrip(")"): peer for peer in peers}
  dead = unreachable(list(addresses))
  line = line.replace("{peer}", addresses[dead[0]] if dead else "a peer")
  os.write(2, (line + "\n").encode())
  os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
  _watch_from_outside(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3],
                      sys.argv[4:])
