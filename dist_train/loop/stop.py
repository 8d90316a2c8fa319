"""Stop requests (SIGINT, SIGTERM), honoured promptly in every phase of a run.

Python runs signal handlers in the main thread between bytecodes, so a main
thread blocked in TensorFlow (waiting for peers, building a pipeline, tracing)
would not see a handler that merely sets a flag. Instead, the C-level handler
Python installs writes the signal number to a socket (`signal.set_wakeup_fd`)
and a small thread here reads it at once and decides by the phase of the run:

  * nothing is unsaved (before the first training step, while exporting):
    one line, then the process exits at once with EXIT_PREEMPTED;
  * training (something trained since the last checkpoint): the request is
    recorded; the outer loop saves at its next boundary and exits with
    EXIT_PREEMPTED (a validation pass checks between chunks);
  * a second SIGINT (Ctrl-C again): one line, exit at once with
    EXIT_INTERRUPTED, without saving.

While a worker waits for its peers to join, TensorFlow holds Python's lock
and this thread cannot act: the signals are left pending then, for a sidecar
process to act on (`kept_pending`, distribute/join_guard.py).

The phase is kept here and nowhere else; the controller and `train` mark it.
No TensorFlow here: `main` installs this before TensorFlow loads.
"""

import contextlib
import os
import signal
import socket
import sys
import threading

from dist_train import errors

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C.
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_CLOSE_TIMEOUT_S = 5.0
# How often the watcher of blocked signals looks up from waiting, to step
# aside when asked (`kept_pending`).
_POLL_S = 0.1


class _State:
  """What the watcher thread reads and the main thread writes, under a lock."""

  def __init__(self):
    self.lock = threading.Lock()
    self.installed = False
    self.unsaved = False  # True while training: record, act at a boundary.
    self.phase = "before the first training step"
    self.requested = None  # Name of the first signal received, e.g. SIGTERM.
    self.closers = []  # Run before an immediate exit (flush, release).
    self.blocked = False  # Installed with block=True: signals can stay pending.
    self.taking = threading.Event()  # Cleared: the watcher leaves signals be.
    self.taking.set()
    self.aside = threading.Event()  # Set while the watcher leaves them be.


_STATE = _State()


def _ignore(signum, frame):
  """The Python-level handler: the watcher thread has already acted."""
  del signum, frame


def install(*, block: bool = False) -> bool:
  """Routes SIGINT and SIGTERM to the watcher thread; idempotent.

  Args:
    block: for the command line, before TensorFlow starts any thread: block
      both signals in this thread (every later thread inherits the mask) and
      take them with `signal.sigwait`. No handler runs then, so TensorFlow's
      own SIGTERM handler (the coordination service installs one while the
      workers join) cannot swallow them. Otherwise (the Python API, with
      TensorFlow's threads running) the watcher reads the wakeup fd.

  Returns:
    Whether this call installed them (only the main thread can).
  """
  with _STATE.lock:
    if _STATE.installed or (
        threading.current_thread() is not threading.main_thread()):
      return False
    if block:
      signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
      _STATE.installation = None  # For the rest of the process.
      _STATE.blocked = True
      target, args = _wait_blocked, ()
    else:
      reader, writer = socket.socketpair()
      writer.setblocking(False)
      previous_fd = signal.set_wakeup_fd(writer.fileno(),
                                         warn_on_full_buffer=False)
      previous = {signum: signal.signal(signum, _ignore)
                  for signum in _SIGNALS}
      _STATE.installation = (reader, writer, previous_fd, previous)
      target, args = _watch, (reader,)
    threading.Thread(target=target, args=args, daemon=True,
                     name="dist_train-stop").start()
    _STATE.installed = True
    return True


def _wait_blocked():
  while True:
    if not _STATE.taking.is_set():
      _STATE.aside.set()
      _STATE.taking.wait()
    info = signal.sigtimedwait(_SIGNALS, _POLL_S)
    # When another signal interrupts the wait just as its timeout runs out,
    # CPython returns the siginfo of no signal (si_signo 0, or whatever the
    # stack held) instead of None; a watcher that died on it would leave
    # every later stop request pending, and `kept_pending` waiting forever.
    if info is not None and info.si_signo in _SIGNALS:
      _on_signal(signal.Signals(info.si_signo))


@contextlib.contextmanager
def kept_pending(phase: str):
  """Leaves SIGINT and SIGTERM pending for the block, for another process to
  see in /proc/<pid>/status: while the main thread waits in TensorFlow holding
  Python's lock, the watcher thread cannot act on a signal it takes, and
  taking it would hide it (see distribute/join_guard.py).

  Args:
    phase: how a stop request in the block is reported, e.g. "while waiting
      for the other workers to join".

  Yields:
    Whether the signals stay pending: only when `install(block=True)` was
    called (the command line); the Python API's handler takes them at once.
  """
  with _STATE.lock:
    previous = (_STATE.unsaved, _STATE.phase)
    _STATE.unsaved, _STATE.phase = False, phase
  kept = _STATE.blocked
  if kept:
    _STATE.taking.clear()
    _STATE.aside.wait()  # At most _POLL_S: the watcher's wait times out.
  try:
    yield kept
  finally:
    if kept:
      _STATE.aside.clear()  # Before the watcher resumes: one writer each.
      _STATE.taking.set()
    with _STATE.lock:
      _STATE.unsaved, _STATE.phase = previous


def uninstall():
  """Restores the handlers `install` replaced and ends the watcher thread."""
  with _STATE.lock:
    if not _STATE.installed or _STATE.installation is None:
      return
    reader, writer, previous_fd, previous = _STATE.installation
    signal.set_wakeup_fd(previous_fd)
    for signum, handler in previous.items():
      signal.signal(signum, handler)
    writer.close()  # The watcher reads end-of-file and returns.
    del reader
    _STATE.installed = False


@contextlib.contextmanager
def installed():
  """Installs the handlers for the block unless they already are (the
  Python API: a notebook's Ctrl-C behaves as before once the run returns)."""
  mine = install()
  try:
    yield
  finally:
    if mine:
      uninstall()


def _watch(reader):
  while True:
    data = reader.recv(64)
    if not data:
      reader.close()
      return
    for signum in data:
      if signum in _SIGNALS:
        _on_signal(signal.Signals(signum))


def _on_signal(signum: signal.Signals):
  name = signum.name
  with _STATE.lock:
    first = _STATE.requested is None
    if first:
      _STATE.requested = name
    unsaved, phase = _STATE.unsaved, _STATE.phase
  if not first:
    if signum == signal.SIGINT:
      exit_now("interrupted again by SIGINT: exited at once without saving; "
               "training since the last checkpoint is lost (rerun the same "
               "command to resume from that checkpoint)", EXIT_INTERRUPTED)
    return  # A repeated SIGTERM: already saving.
  if not unsaved:
    exit_now(f"stopped by {name} {phase}: nothing to save, nothing lost; "
             "rerun the same command to resume", errors.EXIT_PREEMPTED)
  _print(f"dist_train: {name} received: saving at the end of the current "
         "training loop, then exiting"
         f"{' (Ctrl-C again to exit at once without saving)' if signum == signal.SIGINT else ''}")


def _print(line: str):
  with contextlib.suppress(Exception):
    print(line, file=sys.stderr, flush=True)


def exit_now(message: str, exit_code: int):
  """Prints `dist_train: error: <message>`, runs the closers (for at most a
  few seconds) and ends the process at once, from any thread."""
  _print(f"dist_train: error: {message}")
  closers = list(_STATE.closers)

  def close():
    for close_fn in reversed(closers):
      with contextlib.suppress(Exception):
        close_fn()
  if closers:
    thread = threading.Thread(target=close, daemon=True)
    thread.start()
    thread.join(_CLOSE_TIMEOUT_S)
  with contextlib.suppress(Exception):
    sys.stdout.flush()
    sys.stderr.flush()
  os._exit(exit_code)  # pylint: disable=protected-access


def requested() -> str | None:
  """The name of the signal that asked the run to stop, or None."""
  return _STATE.requested


def request(name: str = "SIGTERM"):
  """Asks for a save-and-stop at the next loop boundary, as SIGTERM does
  while training."""
  with _STATE.lock:
    _STATE.requested = _STATE.requested or name


def clear():
  """Forgets a request (a new run in the same process starts clean)."""
  with _STATE.lock:
    _STATE.requested = None


def set_phase(phase: str):
  """Marks a phase where nothing is unsaved, e.g. "while exporting the
  model": a stop request there exits at once."""
  with _STATE.lock:
    _STATE.unsaved, _STATE.phase = False, phase


def set_unsaved():
  """Marks training: from here a stop request waits for a boundary."""
  with _STATE.lock:
    _STATE.unsaved = True


@contextlib.contextmanager
def closing(close_fn):
  """Runs `close_fn` before an immediate exit inside the block (flushing a
  writer, releasing model_dir)."""
  with _STATE.lock:
    _STATE.closers.append(close_fn)
  try:
    yield
  finally:
    with _STATE.lock:
      _STATE.closers.remove(close_fn)


def check_now():
  """Exits at once if a stop was requested and nothing is unsaved; for the
  main thread when it enters a phase where nothing is unsaved."""
  with _STATE.lock:
    name, unsaved, phase = _STATE.requested, _STATE.unsaved, _STATE.phase
  if name and not unsaved:
    exit_now(f"stopped by {name} {phase}: nothing to save, nothing lost; "
             "rerun the same command to resume", errors.EXIT_PREEMPTED)
