"""The console: a quiet TensorFlow start-up, plain log lines, an epoch bar."""

import contextlib
import importlib.util
import logging
import os
import re
import subprocess
import sys
import threading
import time
from typing import Callable, Mapping, MutableMapping, Optional, TextIO

from absl import logging as absl_logging

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

# Erase the line the cursor is on and return to its start.
_ERASE_LINE = "\r\x1b[2K"


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
  for log_filter in (_TENSORFLOW_INFO, _HIDE_BAR):
    handler.removeFilter(log_filter)
  if verbose:
    handler.setFormatter(absl_logging.PythonFormatter())
  else:
    handler.setFormatter(_PlainFormatter())
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    # Before _HIDE_BAR, which should see only the records that print.
    handler.addFilter(_TENSORFLOW_INFO)
  handler.addFilter(_HIDE_BAR)
  # After absl's handler: root handlers run in order.
  if _REDRAW_BAR not in logging.root.handlers:
    logging.root.addHandler(_REDRAW_BAR)


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


def interactive(stream: TextIO,
                environ: Mapping[str, str] = os.environ) -> bool:
  """Whether `stream` is a terminal a person watches, fit for a redrawn bar.

  Args:
    stream: where the bar would be drawn.
    environ: the process environment.
  """
  return _isatty(stream) and not _plain_text_wanted(environ)


def _isatty(stream):
  try:
    return stream.isatty()
  except (AttributeError, ValueError):  # No isatty(), or closed.
    return False


def _plain_text_wanted(environ):
  """Batch jobs, and terminals that ask for plain text.

  SLURM and Kubernetes keep stderr in files, where every redraw would stay;
  some give the job a pseudo-terminal all the same.
  """
  return ("SLURM_JOB_ID" in environ or "KUBERNETES_SERVICE_HOST" in environ or
          bool(environ.get("NO_COLOR")) or environ.get("TERM") == "dumb")


# The terminal is one per process: the bar on it, if any, and the one a log
# line hid. The lock keeps a log line from another thread out of a redraw.
_lock = threading.RLock()
_shown_bar = None
_bar_hidden_by_log = None


class EpochProgress:
  """A progress bar for one epoch, redrawn in place on an interactive stream.

      epoch 2/10 [######..............] 20/63 steps | 12,345 examples/s | ETA 0:03

  On a stream that is not interactive (see `interactive`) every method does
  nothing: the caller's log lines are the record of progress there.

  Log lines printed through absl after `configure_logging` clear the bar and
  redraw it below themselves; `clear()` is for anything else printed.
  """

  def __init__(self, epoch: int, num_epochs: int, steps_per_epoch: int,
               stream: Optional[TextIO] = None, is_tty: Optional[bool] = None,
               *, environ: Mapping[str, str] = os.environ,
               clock: Callable[[], float] = time.monotonic,
               min_redraw_seconds: float = 0.1, width: int = 20):
    """Creates the bar; nothing is drawn before the first `update`.

    Args:
      epoch: the epoch shown, counted from 1.
      num_epochs: epochs in the run.
      steps_per_epoch: steps in a full epoch.
      stream: where to draw; sys.stderr (as it is now) when None.
      is_tty: whether `stream` is a terminal; asked of the stream when None.
        Batch jobs and plain-text terminals in `environ` turn the bar off
        either way.
      environ: the process environment.
      clock: seconds, for the rate and the redraw throttle.
      min_redraw_seconds: least time between redraws, except the last step.
      width: characters between the brackets.
    """
    if steps_per_epoch <= 0:
      raise ValueError(f"steps_per_epoch must be positive, got "
                       f"{steps_per_epoch}")
    self._stream = sys.stderr if stream is None else stream
    is_tty = _isatty(self._stream) if is_tty is None else is_tty
    self.enabled = is_tty and not _plain_text_wanted(environ)
    self._prefix = f"epoch {epoch}/{num_epochs}"
    self._steps_per_epoch = steps_per_epoch
    self._clock = clock
    self._min_redraw_seconds = min_redraw_seconds
    self._width = width
    self._step = 0
    self._examples_per_second = None
    self._eta_seconds = None
    # The first update: the rate is measured from it, which leaves out the
    # loop that compiled the step.
    self._origin = None
    self._last_draw = None
    self._shown = False
    self._closed = False

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()

  def update(self, step_in_epoch: int,
             examples_per_second: Optional[float] = None) -> None:
    """Records progress and redraws, at most every `min_redraw_seconds`.

    Args:
      step_in_epoch: steps of this epoch done so far.
      examples_per_second: the latest throughput, if measured.
    """
    if not self.enabled or self._closed:
      return
    now = self._clock()
    self._step = step_in_epoch
    self._examples_per_second = examples_per_second
    if self._origin is None:
      self._origin = (step_in_epoch, now)
    self._eta_seconds = self._eta(now)
    last_step = step_in_epoch >= self._steps_per_epoch
    if (self._shown and not last_step and
        now - self._last_draw < self._min_redraw_seconds):
      return
    self._last_draw = now
    self._draw()

  def clear(self) -> None:
    """Erases the bar, so that a line can be printed; `update` redraws it."""
    global _shown_bar
    with _lock:
      if self._shown:
        self._write(_ERASE_LINE)
        self._shown = False
        if _shown_bar is self:
          _shown_bar = None

  def redraw(self) -> None:
    """Draws the bar of the last update again, after `clear`."""
    if self.enabled and not self._closed and self._origin is not None:
      self._draw()

  def close(self) -> None:
    """Erases the bar for good, at the end of the epoch."""
    self.clear()
    self._closed = True

  def render(self) -> str:
    """The bar's text for the last update."""
    filled = self._width * min(self._step, self._steps_per_epoch) // (
        self._steps_per_epoch)
    parts = [f"{self._prefix} [{'#' * filled}{'.' * (self._width - filled)}] "
             f"{self._step}/{self._steps_per_epoch} steps"]
    if self._examples_per_second is not None:
      parts.append(f"{self._examples_per_second:,.0f} examples/s")
    parts.append(f"ETA {_duration(self._eta_seconds)}")
    return " | ".join(parts)

  def _eta(self, now):
    remaining = self._steps_per_epoch - self._step
    if remaining <= 0:
      return 0.0
    origin_step, origin_time = self._origin
    if self._step <= origin_step or now <= origin_time:
      return None
    return remaining * (now - origin_time) / (self._step - origin_step)

  def _draw(self):
    global _shown_bar
    with _lock:
      if _shown_bar is not None and _shown_bar is not self:
        _shown_bar._shown = False  # This bar draws over its line.
      self._write(_ERASE_LINE + _fit(self.render(), self._stream))
      self._shown = True
      _shown_bar = self

  def _write(self, text):
    self._stream.write(text)
    self._stream.flush()


def _duration(seconds):
  if seconds is None:
    return "--"
  minutes, secs = divmod(round(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return (f"{hours}:{minutes:02d}:{secs:02d}" if hours else
          f"{minutes}:{secs:02d}")


def _fit(text, stream):
  """`text` cut to one terminal line: a wrapped line cannot be erased."""
  try:
    columns = os.get_terminal_size(stream.fileno()).columns
  except (AttributeError, OSError, ValueError):
    return text
  # A terminal that does not know its size says 0 columns.
  return text[:columns - 1] if columns > 1 else text


class _HideBarFilter(logging.Filter):
  """Erases the bar before absl's handler prints a line; keeps every record."""

  def filter(self, record):
    global _bar_hidden_by_log
    with _lock:
      bar = _shown_bar
      if bar is not None:
        bar.clear()
        _bar_hidden_by_log = bar
    return True


class _RedrawBarHandler(logging.Handler):
  """Redraws, below the line just printed, the bar `_HideBarFilter` erased."""

  def emit(self, record):
    global _bar_hidden_by_log
    with _lock:
      bar, _bar_hidden_by_log = _bar_hidden_by_log, None
      if bar is not None:
        bar.redraw()


_TENSORFLOW_INFO = _TensorFlowInfoFilter()
_HIDE_BAR = _HideBarFilter()
_REDRAW_BAR = _RedrawBarHandler()
