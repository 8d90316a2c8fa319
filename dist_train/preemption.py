"""SIGTERM as a request to save and stop at the next loop boundary.

Schedulers (SLURM, Kubernetes, cloud spot VMs) send SIGTERM some seconds
before they kill a job. Python runs signal handlers between bytecodes, so the
handler only records the request; the outer loop sees it after the compiled
loop it is running returns, saves a checkpoint and exits with EXIT_PREEMPTED.
"""

import signal
import threading

# EX_TEMPFAIL from sysexits.h: a temporary failure; rerunning the same command
# resumes from the checkpoint saved on the way out.
EXIT_PREEMPTED = 75


class Preempted(Exception):
  """Raised by the outer loop after it saved a checkpoint on SIGTERM."""

  def __init__(self, checkpoint_path, global_step: int):
    # Workers other than the chief save no file of their own (None).
    where = f" to {checkpoint_path}" if checkpoint_path else ""
    super().__init__(f"preempted by SIGTERM: saved the checkpoint{where} at "
                     f"step {global_step}; rerun the same command to resume")
    self.checkpoint_path = checkpoint_path
    self.global_step = global_step


class SigtermWatcher:
  """Records SIGTERM while installed; restores the previous handler on exit.

  Usable only from the main thread (a Python rule for signal handlers);
  elsewhere it installs nothing and never reports a request.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    self._installed = False

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def request(self):
    """Asks for a save-and-stop, as SIGTERM does."""
    self._event.set()

  def _handle(self, signum, frame):
    del signum, frame
    self._event.set()

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    return self

  def __exit__(self, *exc_info):
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False
    return False
