"""`--collective_timeout_s` for a multi-worker run: one watchdog thread that
fails the run when a call that waits on peers takes too long.

TensorFlow can time out each collective op itself (`CommunicationOptions(
timeout_seconds=T)`), but it does so by starting a detached thread per
collective that sleeps for T seconds (`Env::SchedClosureAfter`): a worker
then holds (collectives per second) x T threads, thousands within a minute of
fast steps, until the process cannot start a thread and aborts ("Resource
temporarily unavailable"). So the strategy's collectives run without a
timeout, and this one thread watches the calls instead: the outer loop wraps
each call that waits on its peers (a compiled loop, the boundary agreement, a
validation pass, a checkpoint save) in `guard`, and a call that lasts longer
than the timeout aborts the worker's collectives (as TensorFlow's own
health check does when a peer dies), so the call fails with a line that says
so instead of hanging. A dead or stopped peer is noticed sooner by the
coordination service's heartbeats.
"""

import contextlib
import threading
import time
from typing import Optional

from absl import logging

from dist_train import compat


class CollectiveWatchdog:
  """Fails a guarded call that lasts longer than `timeout_s`.

  Disabled (guards are no-ops) with one worker: nothing waits on a peer.
  """

  def __init__(self, *, timeout_s: Optional[float], num_workers: int):
    self._timeout_s = timeout_s if num_workers > 1 else None
    self._lock = threading.Condition()
    self._deadline = None  # time.monotonic() deadline of the guarded call.
    self._what = None
    self._thread = None
    self.fired = None  # What the watchdog aborted, once it has.

  @property
  def enabled(self) -> bool:
    return self._timeout_s is not None

  @contextlib.contextmanager
  def guard(self, what: str, *, armed: bool = True):
    """Watches the block: `what` names it in the error (e.g. "training steps
    11-15"). `armed=False` watches nothing: a first call, which traces and
    compiles for as long as the model needs while its peers wait."""
    if not (self.enabled and armed):
      yield
      return
    with self._lock:
      self._start()
      self._deadline = time.monotonic() + self._timeout_s
      self._what = what
      self._lock.notify()
    try:
      yield
    finally:
      with self._lock:
        self._deadline = None
        self._what = None

  def _start(self):
    if self._thread is None:
      self._thread = threading.Thread(target=self._watch, daemon=True,
                                      name="dist_train_collective_watchdog")
      self._thread.start()

  def _watch(self):
    with self._lock:
      while self.fired is None:
        if self._deadline is None:
          self._lock.wait()
          continue
        left = self._deadline - time.monotonic()
        if left > 0:
          self._lock.wait(left)
          continue
        self.fired = self._what
        message = (f"{self._what} waited more than --collective_timeout_s="
                   f"{self._timeout_s:g}s for a peer worker")
        logging.error("%s; aborting this worker's collectives", message)
        compat.abort_collectives(message)
