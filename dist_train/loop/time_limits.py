"""Wall-clock limits: --max_runtime_s and --checkpoint_every_secs.

A SLURM allocation (or any scheduler's time limit) ends a job at a time, not
at a step. The outer loop asks `WallClock` at every loop boundary whether the
time left is less than it needs to reach the next boundary and save there;
the workers then agree (loop/preemption.py, the same all-reduce as SIGTERM),
save at one step and exit with EXIT_PREEMPTED, so that the same command
resumes. The margin is measured, not guessed: the longest interval between
two boundaries seen so far plus the longest checkpoint save.

No TensorFlow here: the command line marks the start of the process before
TensorFlow loads.
"""

import time
from typing import Callable, Optional

from dist_train import errors

_PROCESS_START: Optional[float] = None


def mark_process_start() -> None:
  """Records now as the start of this process (the command line, first)."""
  global _PROCESS_START  # pylint: disable=global-statement
  if _PROCESS_START is None:
    _PROCESS_START = time.monotonic()


def run_start() -> float:
  """time.monotonic() of the start --max_runtime_s counts from: the process's
  (the command line marks it), else now (a run of the Python API)."""
  return _PROCESS_START if _PROCESS_START is not None else time.monotonic()


class TimeLimitReached(errors.DistTrainError):
  """Raised by the outer loop after it saved at the agreed step."""

  exit_code = errors.EXIT_PREEMPTED

  def __init__(self, *, global_step: int, max_runtime_s: float):
    super().__init__(f"stopped at step {global_step} after the time limit of "
                     f"{max_runtime_s:g} s; rerun the same command to resume")
    self.global_step = global_step


class WallClock:
  """What the wall clock asks of this worker at a loop boundary.

  Both answers are this worker's view; `PreemptionAgreement` makes them one
  decision for every worker (any worker out of time stops all; the chief's
  checkpoint timer decides the time-based saves).
  """

  def __init__(self, *, max_runtime_s: Optional[float] = None,
               checkpoint_every_secs: Optional[float] = None,
               start_time: Optional[float] = None,
               clock: Callable[[], float] = time.monotonic):
    """Creates the clock.

    Args:
      max_runtime_s: seconds from `start_time` by which the run must have
        saved and stopped; None: no limit.
      checkpoint_every_secs: seconds between time-based checkpoints; None:
        none.
      start_time: `clock()` at the start of the process; default: now.
      clock: monotonic seconds (a test passes its own).
    """
    for name, value in (("max_runtime_s", max_runtime_s),
                        ("checkpoint_every_secs", checkpoint_every_secs)):
      if value is not None and not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    self._clock = clock
    self.max_runtime_s = max_runtime_s
    self._checkpoint_every_secs = checkpoint_every_secs
    self._start = clock() if start_time is None else start_time
    self._last_boundary = None
    self._last_save = self._clock()
    self.longest_interval = 0.0
    self.longest_save = 0.0

  def start_training(self) -> None:
    """Marks the start of the first loop: intervals count from here."""
    self._last_boundary = self._clock()
    self._last_save = self._last_boundary

  def boundary(self) -> None:
    """Marks a loop boundary; the interval since the last one is measured
    (it holds the loop, its logging, validation and saves)."""
    now = self._clock()
    if self._last_boundary is not None:
      self.longest_interval = max(self.longest_interval,
                                  now - self._last_boundary)
    self._last_boundary = now

  def saved(self, seconds: float) -> None:
    """Notes a checkpoint save that took `seconds`; the time-based
    checkpoint timer starts again."""
    self.longest_save = max(self.longest_save, seconds)
    self._last_save = self._clock()

  @property
  def margin_s(self) -> float:
    """The time to keep in hand: one more interval, then a save."""
    return self.longest_interval + self.longest_save

  def out_of_time(self) -> bool:
    """Whether the run must stop here to save before its time limit."""
    if self.max_runtime_s is None:
      return False
    remaining = self.max_runtime_s - (self._clock() - self._start)
    return remaining < self.margin_s

  def checkpoint_due(self) -> bool:
    """Whether --checkpoint_every_secs have passed since the last save."""
    return (self._checkpoint_every_secs is not None and
            self._clock() - self._last_save >= self._checkpoint_every_secs)
