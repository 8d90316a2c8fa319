"""`--timeout_s` for each step of the doctor's smoke test: a thread that ends
the process with one line when a step lasts too long.

A collective whose peer died may wait for a long time (until the
coordination service notices, or for ever if it does not), and TensorFlow's
threads may keep the process from exiting after it. The doctor is a
diagnosis, not a run with anything to save: when a step is late the thread
prints the error line and ends the process with `os._exit`, whatever its
other threads are doing. (The main program aborts its collectives instead,
distribute/watchdog.py, because it has state to report and close.)

No TensorFlow here.
"""

import contextlib
import os
import sys
import threading
import time
from typing import Callable, Optional

PREFIX = "dist_train doctor: error: "
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
