"""SIGTERM or SIGINT while training: save at the next loop boundary, agreed.

Schedulers (SLURM, Kubernetes, cloud spot VMs) send SIGTERM some seconds
before they kill a job. While training, `stop` records the request; the
outer loop sees it after the compiled loop it is running returns (or between
chunks of a validation pass), every worker agrees on that boundary, saves a
checkpoint and exits with EXIT_PREEMPTED. Outside training nothing is unsaved
and `stop` exits at once.
"""

import contextlib
from typing import NamedTuple

import tensorflow as tf

from dist_train import errors
from dist_train.loop import stop

EXIT_PREEMPTED = errors.EXIT_PREEMPTED


class Preempted(errors.DistTrainError):
  """Raised by the outer loop after it saved a checkpoint on a stop request."""

  exit_code = errors.EXIT_PREEMPTED

  def __init__(self, checkpoint_path, global_step: int, *,
               signal_name: str = "SIGTERM", note: str = ""):
    # Workers other than the chief save no file of their own (None).
    where = f" to {checkpoint_path}" if checkpoint_path else ""
    super().__init__(f"preempted by {signal_name}: saved the checkpoint{where} "
                     f"at step {global_step}{note}; rerun the same command "
                     "to resume")
    self.checkpoint_path = checkpoint_path
    self.global_step = global_step


class SigtermWatcher:
  """Whether this process was asked to stop (SIGTERM, SIGINT or `request`).

  Entering it installs the `stop` handlers for the block unless they already
  are (the command line installs them before TensorFlow loads); only the main
  thread can.
  """

  def __init__(self):
    self._installed = None

  @property
  def requested(self) -> bool:
    return stop.requested() is not None

  @property
  def signal_name(self) -> str:
    return stop.requested() or "SIGTERM"

  def request(self):
    """Asks for a save-and-stop, as SIGTERM does while training."""
    stop.request()

  def __enter__(self):
    self._installed = contextlib.ExitStack()
    self._installed.enter_context(stop.installed())
    return self

  def __exit__(self, *exc_info):
    self._installed.close()
    return False


class Agreed(NamedTuple):
  """What every worker agreed at a loop boundary."""

  preempted: bool  # Some worker got SIGTERM (or SIGINT): save, exit 75.
  stop: bool  # Some worker asked to end training early: save, exit 0.
  out_of_time: bool = False  # Some worker is at its --max_runtime_s.
  checkpoint_due: bool = False  # The chief's --checkpoint_every_secs.
  spike: bool = False  # Some worker saw a loss spike (loop/spikes.py).


class PreemptionAgreement:
  """Whether any worker was asked to stop, agreed by all of them.

  Every worker must stop at the same step boundary (the checkpoint save runs
  collectives), so with several workers the local requests are summed across
  workers with one small all-reduce; one process decides alone. Call
  `agreed()` at the same loop boundaries on every worker. Five requests are
  agreed at once: SIGTERM (save and exit 75), a request to end training
  early (a callback's `model.stop_training`; save, export and exit 0), the
  time limit (save and exit 75) and a time-based checkpoint (save, go on);
  and, with --recovery_max_trials, a loss spike (roll back, go on).
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

  def agreed(self, stop_requested: bool = False, *,
             out_of_time: bool = False,
             checkpoint_due: bool = False, spike: bool = False) -> Agreed:
    """What any worker asked for, agreed by all of them.

    Args:
      stop_requested: this worker asks to end training early.
      out_of_time: this worker must stop to save before its time limit.
      checkpoint_due: a time-based checkpoint is due; pass it from the chief
        only (the others pass False), so that one clock decides.
      spike: this worker saw a loss spike; every worker then rolls back.
    """
    requests = [self.watcher.requested, bool(stop_requested),
                bool(out_of_time), bool(checkpoint_due), bool(spike)]
    if self._num_workers > 1:
      summed = self._sum_over_workers(
          tf.constant(requests, tf.float32)).numpy()
      requests = [bool(value > 0) for value in summed]
    return Agreed(*requests)
