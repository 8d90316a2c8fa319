"""The training-health scalars of each log interval, and the straggler
warning: what `health.StepHealth` measured in the loop, the loss scale,
device memory, and every worker's own time per step gathered with one small
all-reduce per log interval."""

import resource
import statistics
import sys
from typing import Callable, NamedTuple, Optional

import numpy as np
import tensorflow as tf

from dist_train.loop import health as health_lib

# ru_maxrss is in kilobytes on Linux, in bytes on macOS.
_MAXRSS_BYTES = 1 if sys.platform == "darwin" else 1024


class HealthReport:
  """Turns each log interval's measurements into scalars (on every worker:
  the gathering is a collective) and warns of a straggler (the chief)."""

  def __init__(self, *, health: health_lib.StepHealth,
               strategy: tf.distribute.Strategy, num_workers: int,
               num_local_replicas: int, optimizer, clip_norm=None,
               straggler_warn_ratio: float = 1.5,
               histogram_every_steps: Optional[int] = None,
               warn: Callable[..., None] = lambda *args: None):
    """Creates the report.

    Args:
      health: the step's counters.
      strategy: the run's strategy, whose workers are compared.
      num_workers: worker processes; num_local_replicas: replicas of each.
      optimizer: the trained optimizer (its loss scale, if it has one).
      clip_norm: --clip_norm (None: no clipped fraction is reported).
      straggler_warn_ratio: warn when the slowest worker's time per step
        exceeds this times the median's.
      histogram_every_steps: weight and gradient histograms every N steps.
      warn: `logging.warning`-like; a no-op off the chief.
    """
    self._health = health
    self._strategy = strategy
    self._num_workers = num_workers
    self._num_local_replicas = num_local_replicas
    self._optimizer = optimizer
    self._clip_norm = clip_norm
    self._ratio = straggler_warn_ratio
    self._histogram_every_steps = histogram_every_steps
    self._warn = warn
    self._steps = 0
    self._timed_steps = 0
    self._input_seconds = 0.0
    # Steps and seconds of the loops that did not trace (one worker's time).
    self._wall_steps, self._wall_seconds = 0, 0.0
    self._gather = tf.function(self._gather_fn)  # One trace for the run.

  def loop_done(self, *, num_steps: int, timed_steps: int,
                input_seconds: float,
                seconds: Optional[float] = None) -> None:
    """Counts a compiled loop of `num_steps` steps, whose last
    `timed_steps` waited `input_seconds` for their input, and which took
    `seconds` (None: it was the first, which traced the loop)."""
    self._steps += num_steps
    self._timed_steps += timed_steps
    self._input_seconds += input_seconds
    if seconds is not None:
      self._wall_steps += num_steps
      self._wall_seconds += seconds

  def _gather_fn(self, values):
    per_replica = self._strategy.run(tf.identity, args=(values,))
    return self._strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica,
                                 axis=None)

  def _per_worker(self, values: np.ndarray) -> np.ndarray:
    """[workers, len(values)]: every worker's `values`, on every worker, by
    one SUM all-reduce of rows that are zero but for this worker's."""
    if self._num_workers == 1:
      return values[None, :]
    workers, local = self._num_workers, self._num_local_replicas

    def row(context):
      replica = context.replica_id_in_sync_group
      first_of_worker = replica % local == 0
      return tf.one_hot(replica // local, workers, dtype=tf.float64)[
          :, None] * (values[None, :] if first_of_worker else 0.0)
    rows = self._strategy.experimental_distribute_values_from_function(row)
    return self._gather(rows).numpy()

  def take(self, global_step: int) -> dict:
    """The interval's scalars (call on every worker at every log step):
    gradient_norm, weight_norm, clipped_fraction, loss_scale and
    skipped_steps, memory, and the workers' time per step."""
    taken = self._health.take()
    steps = max(1, self._steps)
    scalars = {"gradient_norm": taken["gradient_norm"],
               "weight_norm": taken["weight_norm"]}
    if self._clip_norm is not None:
      scalars["clipped_fraction"] = taken["clipped_steps"] / steps
    scale = getattr(self._optimizer, "dynamic_scale", None)
    if scale is not None:
      scalars["loss_scale"] = float(tf.convert_to_tensor(scale).numpy())
      scalars["skipped_steps"] = taken["skipped_steps"]
    scalars.update(memory_scalars(self._strategy.extended.worker_devices))
    if self._health.timed_steps:  # Several workers: the timed steps.
      times = self._per_worker(np.array(
          [self._input_seconds, taken["compute_seconds"]],
          np.float64)) / max(1, self._timed_steps)
      scalars.update(self._stragglers(global_step, times))
    elif self._wall_steps:  # One worker: its loops' wall clock.
      per_step = self._wall_seconds / self._wall_steps
      scalars.update({"worker_step_time/max": per_step,
                      "worker_step_time/min": per_step,
                      "worker_step_time/slowest_worker": 0.0})
    self._steps, self._timed_steps, self._input_seconds = 0, 0, 0.0
    self._wall_steps, self._wall_seconds = 0, 0.0
    return scalars

  def _stragglers(self, global_step, times) -> dict:
    """The worker_step_time scalars, from [workers, (input, compute)]
    seconds per step; warns when the slowest worker is a straggler."""
    own = times.sum(axis=1)
    found = find_straggler(times, self._ratio)
    if found is not None:
      self._warn(
          "Straggler at step %d: worker %d took %.1f ms per step, %.1fx the "
          "median of %.1f ms (input %.1f ms, step %.1f ms): its %s is slow",
          global_step, found.worker, 1e3 * own[found.worker],
          own[found.worker] / found.median, 1e3 * found.median,
          1e3 * times[found.worker, 0], 1e3 * times[found.worker, 1],
          found.slow_part)
    return {"worker_step_time/max": float(own.max()),
            "worker_step_time/min": float(own.min()),
            "worker_step_time/slowest_worker": float(np.argmax(own)),
            "worker_input_time/max": float(times[:, 0].max())}

  def histograms(self, global_step: int, variables) -> dict:
    """{name: values} of the weights and of the last measured step's
    summed gradients, at every --histogram_every_steps; else {}."""
    every = self._histogram_every_steps
    if not every or global_step % every:
      return {}
    values = {f"weights/{_name(v)}": tf.convert_to_tensor(v).numpy()
              for v in variables}
    values.update({f"gradients/{_name(v)}": g for v, g in zip(
        variables, self._health.gradient_values())})
    return values


class Straggler(NamedTuple):
  worker: int  # Its index.
  median: float  # The median worker's own seconds per step.
  slow_part: str  # "input" or "step": which is further above the median.


def find_straggler(times: np.ndarray, ratio: float) -> Optional[Straggler]:
  """The slowest worker, if its own time per step (input + step) exceeds
  `ratio` times the median worker's; else None.

  Args:
    times: [workers, 2]: each worker's seconds per step waiting for its
      input, and in its step before the update's collectives.
    ratio: --straggler_warn_ratio.
  """
  own = times.sum(axis=1)
  slowest = int(np.argmax(own))
  median = float(statistics.median(own))
  if not (median > 0 and own[slowest] > ratio * median):
    return None
  input_excess = times[slowest, 0] - statistics.median(times[:, 0])
  step_excess = times[slowest, 1] - statistics.median(times[:, 1])
  return Straggler(worker=slowest, median=median,
                   slow_part="input" if input_excess >= step_excess
                   else "step")


def _name(variable) -> str:
  return getattr(variable, "path", None) or variable.name


def memory_scalars(devices) -> dict:
  """This process's memory: `memory/<device>/current_mb` and `peak_mb` of
  each GPU it uses, from TensorFlow's allocator; without GPUs the host's
  resident set (`memory/host/rss_mb`, `memory/host/peak_rss_mb`), which is
  what holds the tensors on CPU."""
  scalars = {}
  for device in devices:
    spec = tf.DeviceSpec.from_string(device)
    if spec.device_type != "GPU":
      continue
    name = f"GPU:{spec.device_index or 0}"
    info = tf.config.experimental.get_memory_info(name)
    scalars[f"memory/{name.replace(':', '_')}/current_mb"] = (
        info["current"] / 2**20)
    scalars[f"memory/{name.replace(':', '_')}/peak_mb"] = info["peak"] / 2**20
  if not scalars:
    rss = _rss_bytes()
    # The two come from different counters: the peak is at least now.
    peak = max(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss *
               _MAXRSS_BYTES)
    scalars["memory/host/rss_mb"] = rss / 2**20
    scalars["memory/host/peak_rss_mb"] = peak / 2**20
  return scalars


def _rss_bytes() -> float:
  """The resident set of this process now (Linux /proc; elsewhere its
  peak)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * resource.getpagesize()
  except OSError:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_BYTES
