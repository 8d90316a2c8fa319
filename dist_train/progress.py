"""The epoch progress bar, drawn in place below the log lines on a terminal."""

import logging
import os
import sys
import threading
import time
from typing import Callable, Mapping, Optional, TextIO

# Erase the line the cursor is on and return to its start.
_ERASE_LINE = "\r\x1b[2K"


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


class BarLine:
  """The terminal line bars are drawn on, shared with the log lines.

  It knows which bar is shown (a new bar draws over an older one's line) and
  which one a log line erased, to redraw it below that line. `install` hooks
  it into logging; a bar created without a line of its own uses the
  installed one. The lock keeps a log line from another thread out of a
  redraw.
  """

  def __init__(self):
    self._lock = threading.RLock()
    self._shown = None
    self._hidden_by_log = None
    self._hide = _HideBarFilter(self)
    self._redraw = _RedrawBarHandler(self)

  @staticmethod
  def installed() -> Optional["BarLine"]:
    """The line `install` hooked into logging, if any."""
    return next((h.line for h in logging.root.handlers
                 if isinstance(h, _RedrawBarHandler)), None)

  def install(self, handler: logging.Handler) -> None:
    """Log lines printed by `handler` clear the bar and redraw it below
    themselves; replaces a line installed before.

    Args:
      handler: the handler that prints log lines (absl's). Its filters that
        drop records should come first: the bar is cleared only for the
        records that print.
    """
    for old in [f for f in handler.filters if isinstance(f, _HideBarFilter)]:
      handler.removeFilter(old)
    for old in [h for h in logging.root.handlers
                if isinstance(h, _RedrawBarHandler)]:
      logging.root.removeHandler(old)
    handler.addFilter(self._hide)
    # After the printing handler: root handlers run in order.
    logging.root.addHandler(self._redraw)

  def draw(self, bar: "EpochProgress", text: str) -> None:
    with self._lock:
      if self._shown is not None and self._shown is not bar:
        self._shown.shown = False  # This bar draws over its line.
      bar.write(_ERASE_LINE + text)
      bar.shown = True
      self._shown = bar

  def clear(self, bar: "EpochProgress") -> None:
    with self._lock:
      if bar.shown:
        bar.write(_ERASE_LINE)
        bar.shown = False
        if self._shown is bar:
          self._shown = None

  def hide_for_log(self) -> None:
    """Erases the shown bar before a log line prints."""
    with self._lock:
      bar = self._shown
      if bar is not None:
        bar.clear()
        self._hidden_by_log = bar

  def redraw_after_log(self) -> None:
    """Redraws, below the line just printed, the bar `hide_for_log` erased."""
    with self._lock:
      bar, self._hidden_by_log = self._hidden_by_log, None
      if bar is not None:
        bar.redraw()


class _HideBarFilter(logging.Filter):
  """Erases the bar before the handler prints a line; keeps every record."""

  def __init__(self, line: BarLine):
    super().__init__()
    self.line = line

  def filter(self, record):
    self.line.hide_for_log()
    return True


class _RedrawBarHandler(logging.Handler):
  """Redraws the bar `_HideBarFilter` erased, after the line is printed."""

  def __init__(self, line: BarLine):
    super().__init__()
    self.line = line

  def emit(self, record):
    self.line.redraw_after_log()


class EpochProgress:
  """A progress bar for one epoch, redrawn in place on an interactive stream.

      epoch 2/10 [######..............] 20/63 steps | 12,345 examples/s | ETA 0:03

  On a stream that is not interactive (see `interactive`) every method does
  nothing: the caller's log lines are the record of progress there.

  Log lines printed through absl after `logs.configure_logging` clear the bar
  and redraw it below themselves; `clear()` is for anything else printed.
  """

  def __init__(self, epoch: int, num_epochs: int, steps_per_epoch: int,
               stream: Optional[TextIO] = None, is_tty: Optional[bool] = None,
               *, environ: Mapping[str, str] = os.environ,
               clock: Callable[[], float] = time.monotonic,
               min_redraw_seconds: float = 0.1, width: int = 20,
               line: Optional[BarLine] = None):
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
      line: the line shared with log lines; when None, the one installed in
        logging (`BarLine.installed`), else one of the bar's own.
    """
    if steps_per_epoch <= 0:
      raise ValueError(f"steps_per_epoch must be positive, got "
                       f"{steps_per_epoch}")
    self._stream = sys.stderr if stream is None else stream
    is_tty = _isatty(self._stream) if is_tty is None else is_tty
    self.enabled = is_tty and not _plain_text_wanted(environ)
    self._line = line or BarLine.installed() or BarLine()
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
    # Whether the bar is on the terminal now; its BarLine keeps it true.
    self.shown = False
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
    if (self.shown and not last_step and
        now - self._last_draw < self._min_redraw_seconds):
      return
    self._last_draw = now
    self._line.draw(self, _fit(self.render(), self._stream))

  def clear(self) -> None:
    """Erases the bar, so that a line can be printed; `update` redraws it."""
    self._line.clear(self)

  def redraw(self) -> None:
    """Draws the bar of the last update again, after `clear`."""
    if self.enabled and not self._closed and self._origin is not None:
      self._line.draw(self, _fit(self.render(), self._stream))

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

  def write(self, text: str) -> None:
    """Writes to the bar's stream at once (for its BarLine)."""
    self._stream.write(text)
    self._stream.flush()

  def _eta(self, now):
    remaining = self._steps_per_epoch - self._step
    if remaining <= 0:
      return 0.0
    origin_step, origin_time = self._origin
    if self._step <= origin_step or now <= origin_time:
      return None
    return remaining * (now - origin_time) / (self._step - origin_step)


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
