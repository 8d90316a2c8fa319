"""A TensorFlow profiler trace of chosen global steps, for TensorBoard's
Profile tab (the tensorboard-plugin-profile package; see BUILD.md).

The loop schedule ends compiled loops before the first profiled step and
after the last, so the trace starts and stops between loops and holds exactly
those steps. `tf.profiler.experimental.stop` writes
`<logdir>/plugins/profile/<date_time>/<host>.xplane.pb`.
"""

import os
from typing import Optional

from absl import logging
import tensorflow as tf

from dist_train.outputs import model_dir as model_dir_lib


def profile_dir(model_dir: str, worker_index: int) -> str:
  """Where a worker's trace goes: the chief's with the train events (one
  TensorBoard run), another worker's in a run of its own, so that workers on
  one host do not write the same <host>.xplane.pb."""
  return model_dir_lib.profile_dir(model_dir, worker_index)


class StepProfiler:
  """Starts the profiler before global step `first` and stops it after step
  `last`; does nothing when `steps` is empty or this worker does not
  profile.

  Call `start_at(first_step)` before each compiled loop,
  `stop_after(last_step)` after it, and `close()` at the end of the run (a
  run that stopped early keeps what was traced).
  """

  def __init__(self, *, steps: tuple = (), logdir: Optional[str] = None):
    self._steps = tuple(steps) if logdir else ()
    self._logdir = logdir
    self._active = False

  def start_at(self, first_step: int) -> None:
    """Called before the compiled loop that starts at `first_step`."""
    if self._steps and first_step == self._steps[0]:
      tf.profiler.experimental.start(self._logdir)
      self._active = True
      logging.info("Profiling steps %d-%d into %s", *self._steps,
                   os.path.join(self._logdir, "plugins", "profile"))

  def stop_after(self, last_step: int) -> None:
    """Called after the compiled loop that ended at `last_step`."""
    if self._active and last_step >= self._steps[1]:
      self.close()

  def close(self) -> None:
    """Stops the profiler, if it runs, and writes the trace."""
    if self._active:
      self._active = False
      tf.profiler.experimental.stop()
