"""SIGTERM as a request to save and stop at the next loop boundary.

Schedulers (SLURM, Kubernetes, cloud spot VMs) send SIGTERM some seconds
before they kill a job. Python runs signal handlers between bytecodes, so the
handler only records the request; the outer loop sees it after the compiled
loop it is running returns, saves a checkpoint and exits with EXIT_PREEMPTED.
"""

import signal
import threading

import tensorflow as tf

from dist_train import errors

EXIT_PREEMPTED = errors.EXIT_PREEMPTED


class Preempted(errors.DistTrainError):
  """Raised by the outer loop after it saved a checkpoint on SIGTERM."""

  exit_code = errors.EXIT_PREEMPTED

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


class PreemptionAgreement:
  """Whether any worker was asked to stop, agreed by all of them.

  Every worker must stop at the same step boundary (the checkpoint save runs
  collectives), so with several workers the local requests are summed across
  workers with one small all-reduce; one process decides alone. Call
  `agreed()` at the same loop boundaries on every worker. Two requests are
  agreed at once: SIGTERM (save and exit 75) and a request to end training
  early (a callback's `model.stop_training`; save, export and exit 0).
  """

  def __init__(self, *, strategy: tf.distribute.Strategy, num_workers: int,
               watcher: SigtermWatcher):
    self._strategy = strategy
    self._num_workers = num_workers
    self.watcher = watcher
    # Compiled: an eager collective under MultiWorkerMirroredStrategy costs
    # a new collective instance (and a warning) at every loop boundary.
    self._sum_over_workers = tf.function(self._sum_fn)

  def _sum_fn(self, flags):
    per_replica = self._strategy.run(tf.identity, args=(flags,))
    return self._strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica,
                                 axis=None)

  def agreed(self, stop_requested: bool = False) -> tuple[bool, bool]:
    """(preempted, stop): whether any worker got SIGTERM, and whether any
    asked to end training early."""
    requests = [self.watcher.requested, bool(stop_requested)]
    if self._num_workers > 1:
      summed = self._sum_over_workers(
          tf.constant(requests, tf.float32)).numpy()
      requests = [bool(value > 0) for value in summed]
    return requests[0], requests[1]
