"""Log output: a quiet TensorFlow start-up, and plain log lines.

TensorFlow's shared libraries print a few C++ INFO lines while they load
("oneDNN custom operations are on", "Could not find cuda drivers"), before
TF_CPP_MIN_LOG_LEVEL is read, so that variable alone cannot hide them. They
could simply be documented as harmless; instead `startup_info_hidden` drops
them with a filter process, because it is small (one regular expression,
the standard library only), fails open (no filter when it cannot start:
every line is shown), lets a crash while loading still print its message,
and is tested with real processes (tests/unit/test_console.py,
tests/e2e/test_console_runs.py). The progress bar is in `progress.py`.
"""

import contextlib
import importlib.util
import logging
import os
import re
import subprocess
import sys
from typing import Mapping, MutableMapping

from absl import logging as absl_logging

from dist_train import progress

# A C++ INFO line in Abseil's format ("I0000 00:00:1795785503.537329    4660
# port.cc:153] ...") or in TensorFlow's older one ("2025-09-17 14:44:05.157831:
# I external/local_xla/xla/tsl/cuda/cudart_stub.cc:32] ...").
_CPP_INFO_LINE = re.compile(
    rb"I\d{4} \d\d:\d\d:\S+ +\d+ \S+:\d+\] "
    rb"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: I \S+:\d+\] ")
# Abseil prints this before the first line logged ahead of its set-up. It only
# says where log lines go; what follows it is kept or dropped on its own.
_ABSL_PREINIT_NOTICE = (
    b"WARNING: All log messages before absl::InitializeLog() is called")

# Run with `python -I -S -c`: the filter needs nothing beyond `re`, and starts
# in milliseconds.
_FILTER_SCRIPT = f"""
import re, signal, sys
# Ctrl-C is for the parent; the filter forwards what is left, until EOF.
signal.signal(signal.SIGINT, signal.SIG_IGN)
info = re.compile({_CPP_INFO_LINE.pattern!r})
for line in sys.stdin.buffer:
  if not (info.match(line) or line.startswith({_ABSL_PREINIT_NOTICE!r})):
    sys.stderr.buffer.write(line)
    sys.stderr.buffer.flush()
"""

def quiet_tensorflow_startup(
    environ: MutableMapping[str, str] = os.environ) -> None:
  """Hides TensorFlow's C++ INFO lines; call before TensorFlow is imported.

  TF_CPP_MIN_LOG_LEVEL=1 hides C++ INFO lines (the CPU feature banner,
  "Sharding callback duration") and keeps warnings and errors. A level the
  user set is kept. A few INFO notices are printed while TensorFlow's
  libraries load, before the level is read: import TensorFlow inside
  `startup_info_hidden()` to drop those too.

  Args:
    environ: the environment TensorFlow will read.
  """
  environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


@contextlib.contextmanager
def startup_info_hidden(environ: Mapping[str, str] = os.environ, fd: int = 2):
  """Drops the C++ INFO lines printed while TensorFlow's libraries load.

  TensorFlow's shared libraries log INFO notices ("oneDNN custom operations
  are on", "Could not find cuda drivers") from static initialisers, before
  TF_CPP_MIN_LOG_LEVEL is read. Inside this context `fd` is a pipe to a small
  filter process that forwards every other line, unchanged and in order. A
  separate process, so that a crash while loading (a CPU without the
  instructions TensorFlow was built for) still shows its message.

  Nothing is filtered when TF_CPP_MIN_LOG_LEVEL is unset or 0: INFO was asked
  for.

  Args:
    environ: the environment TensorFlow reads.
    fd: the file descriptor TensorFlow's C++ code logs to.

  Yields:
    None.
  """
  started = (None if environ.get("TF_CPP_MIN_LOG_LEVEL", "0") in ("", "0")
             else _start_filter(fd))
  if started is None:
    yield
    return
  filter_process, saved_fd = started
  try:
    yield
  finally:
    _flush_stderr()  # Python's own lines pass the filter too, in order.
    os.dup2(saved_fd, fd)
    os.close(saved_fd)
    filter_process.stdin.close()
    try:
      filter_process.wait(timeout=5)
    except subprocess.TimeoutExpired:
      pass  # A child started meanwhile holds the pipe; the filter ends with it.


def _start_filter(fd):
  """Points `fd` at a new filter process; returns it and a copy of the old fd.

  None if that cannot be done (no interpreter, `fd` closed): then nothing is
  filtered.
  """
  try:
    saved_fd = os.dup(fd)
  except OSError:
    return None
  try:
    filter_process = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _FILTER_SCRIPT],
        stdin=subprocess.PIPE, stderr=saved_fd)
  except OSError:
    os.close(saved_fd)
    return None
  _flush_stderr()
  os.dup2(filter_process.stdin.fileno(), fd)
  return filter_process, saved_fd


def _flush_stderr():
  if sys.stderr is not None:
    sys.stderr.flush()


class _PlainFormatter(logging.Formatter):
  """`HH:MM:SS message`, with `warning: ` or `error: ` before the message."""

  def __init__(self):
    super().__init__("%(asctime)s %(message)s", datefmt="%H:%M:%S")

  def formatMessage(self, record):
    if record.levelno >= logging.ERROR:
      label = "error: "
    elif record.levelno >= logging.WARNING:
      label = "warning: "
    else:
      label = ""
    return f"{record.asctime} {label}{record.message}"


def configure_logging(*, verbose: bool = False) -> None:
  """Plain log lines on stderr; call after TensorFlow is imported.

  Without `verbose`, absl prints `HH:MM:SS message` (no thread id or file
  name), and TensorFlow's Python INFO lines ("Reduce to ... then broadcast
  to ...", "Sharding callback duration") are hidden. With `verbose`, absl
  keeps its full prefix and TensorFlow's INFO lines are not hidden. Either
  way a log line clears the progress bar and redraws it below itself.

  Args:
    verbose: keep absl's full prefix and TensorFlow's INFO lines, to debug.
  """
  absl_logging.use_absl_handler()  # Already done under app.run.
  handler = absl_logging.get_absl_handler()
  for old in [f for f in handler.filters
              if isinstance(f, _TensorFlowInfoFilter)]:
    handler.removeFilter(old)
  if verbose:
    handler.setFormatter(absl_logging.PythonFormatter())
  else:
    handler.setFormatter(_PlainFormatter())
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    # Before the bar's filter, which should see only the records that print.
    handler.addFilter(_TensorFlowInfoFilter())
  # The bars drawn so far keep the line they drew on.
  (progress.BarLine.installed() or progress.BarLine()).install(handler)


class _TensorFlowInfoFilter(logging.Filter):
  """Drops INFO lines logged from TensorFlow's own files.

  Some of TensorFlow's modules (checkpointing, saving) log through absl, not
  through the `tensorflow` logger, so they are told apart by their file.
  """

  def __init__(self):
    super().__init__()
    spec = importlib.util.find_spec("tensorflow")
    self._directory = (os.path.dirname(spec.origin) + os.sep
                       if spec and spec.origin else None)

  def filter(self, record):
    return (record.levelno >= logging.WARNING or self._directory is None or
            not record.pathname.startswith(self._directory))
