"""Training health measured inside the compiled loop: the norm of the summed
gradient, how often it was clipped, overflowed (skipped) steps, and this
worker's own compute time.

What is cheap is counted at every step (a comparison, an add, where
clipping or loss scaling computes what it counts anyway); what costs more is
measured at the end of a loop that ends at a log step only: the norm of the
summed gradient (a collective, unless clipping computes it) in its last
step (`measuring`), and this worker's input wait and compute time in its
last TIMED_STEPS steps (`timed`; the measured step alone on one worker,
where there is no straggler to find). The Trainer traces those steps apart,
so the other steps carry no extra op.

Every value lives in an ON_READ variable read from the first replica: each
replica writes its own copy without a collective, and a read stays local.
The quantities are global (every replica computes the same norm and the
same overflow), except the compute time, which is this worker's and is
gathered across workers at log steps by `health_report.py`.
"""

import contextlib
import threading

import tensorflow as tf

# How many steps at the end of a loop ending at a log step are timed (their
# input wait and compute, for the straggler report) with several workers: a
# sample of the interval, so that the other steps carry no clock. A timed
# step's clock waits for the step before, so each costs some overlap.
TIMED_STEPS = 10

_LOCAL = dict(synchronization=tf.VariableSynchronization.ON_READ,
              aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
              trainable=False, dtype=tf.float32)


class StepHealth:
  """The health counters of the training step, written in replica context.

  Attributes:
    measuring: True while the Trainer traces the measured step (the last of
      a loop ending at a log step); a Python flag read at trace time.
    timed: True while it traces the timed steps (the last `timed_steps` of
      such a loop).
    timed_steps: how many steps end such a loop timed.
  """

  def __init__(self, *, strategy: tf.distribute.Strategy, variables=(),
               keep_gradients: bool = False, timed_steps: int = TIMED_STEPS):
    """Creates the counters under the strategy's scope.

    Args:
      strategy: the run's strategy.
      variables: the trainable variables, whose weight norm is read (and,
        with `keep_gradients`, whose summed gradients are kept).
      keep_gradients: keep the summed gradient of each measured step, for
        histograms (a copy of the weights' size).
      timed_steps: how many steps at the end of a measured loop are timed
        (at least 1: the measured step): TIMED_STEPS with several workers,
        1 on one (nothing to compare its time with).
    """
    if timed_steps < 1:
      raise ValueError(f"timed_steps must be at least 1, got {timed_steps}")
    self.timed_steps = timed_steps
    self._variables = list(variables)
    with strategy.scope():
      self._gradient_norm = tf.Variable(0.0, name="health_gradient_norm",
                                        **_LOCAL)
      self._clipped_steps = tf.Variable(0.0, name="health_clipped_steps",
                                        **_LOCAL)
      self._skipped_steps = tf.Variable(0.0, name="health_skipped_steps",
                                        **_LOCAL)
      self._compute_seconds = tf.Variable(0.0, name="health_compute_seconds",
                                          **_LOCAL)
      self._gradients = [
          tf.Variable(tf.zeros(v.shape), name=f"health_gradient_{i}",
                      **_LOCAL) for i, v in enumerate(self._variables)
      ] if keep_gradients else None
    self.measuring = False
    self.timed = False
    self._replica = threading.local()  # Each replica traces in its thread.
    self._take = tf.function(self._take_fn)

  @property
  def keeps_gradients(self) -> bool:
    return self._gradients is not None

  @contextlib.contextmanager
  def tracing(self, *, timed: bool = False, measuring: bool = False):
    """The steps traced inside are timed (`timed`) and the health's
    measured step (`measuring`)."""
    self.timed, self.measuring = timed, measuring
    try:
      yield
    finally:
      self.timed, self.measuring = False, False

  # In replica context, while the step is traced.

  def step_started(self, batch) -> None:
    """Marks when this replica's share is in hand (after its input), in a
    timed step."""
    if not self.timed:
      return
    with tf.control_dependencies(
        tf.nest.flatten(batch, expand_composites=True)):
      self._replica.start = tf.timestamp()

  def gradients_computed(self, gradients) -> None:
    """Adds the time since `step_started` (the forward and backward pass,
    before any collective of the update) to this worker's compute time."""
    start = getattr(self._replica, "start", None)
    if start is None:
      return
    self._replica.start = None
    with tf.control_dependencies([g for g in gradients if g is not None]):
      self._compute_seconds.assign_add(
          tf.cast(tf.timestamp() - start, tf.float32))

  def record(self, *, norm=None, clip_norm=None, overflow=None,
             summed=None) -> None:
    """Counts this step's clipping and overflow; in the measured step, keeps
    the norm of the summed gradient (and the gradient, for histograms).

    Args:
      norm: the global norm of the summed, unscaled gradient before
        clipping (None: not computed in this step).
      clip_norm: --clip_norm, or None.
      overflow: a boolean tensor, true when the step overflowed and is
        skipped (mixed_float16), or None.
      summed: the summed, unscaled gradient of each variable (None where a
        variable has none), in the measured step.
    """
    if overflow is not None:
      self._skipped_steps.assign_add(tf.cast(overflow, tf.float32))
    if clip_norm is not None and norm is not None:
      self._clipped_steps.assign_add(tf.cast(norm > clip_norm, tf.float32))
    if not self.measuring or norm is None:
      return
    self._gradient_norm.assign(tf.cast(norm, tf.float32))
    if self._gradients is not None and summed is not None:
      for variable, gradient in zip(self._gradients, summed):
        if gradient is not None:
          variable.assign(tf.cast(gradient, tf.float32))

  # In cross-replica context, at log steps.

  def _take_fn(self):
    values = {"gradient_norm": self._gradient_norm.read_value(),
              "clipped_steps": self._clipped_steps.read_value(),
              "skipped_steps": self._skipped_steps.read_value(),
              "compute_seconds": self._compute_seconds.read_value(),
              "weight_norm": tf.linalg.global_norm(
                  [tf.cast(v, tf.float32) for v in self._variables])}
    with tf.control_dependencies(list(values.values())):
      for counter in (self._clipped_steps, self._skipped_steps,
                      self._compute_seconds):
        counter.assign(0.0)
    return values

  def take(self) -> dict:
    """The values since the last call, as floats, and the counters reset:
    gradient_norm (of the last measured step), clipped_steps,
    skipped_steps, compute_seconds (this worker's) and weight_norm."""
    return {name: float(value) for name, value in self._take().items()}

  def gradient_values(self) -> list:
    """The summed gradient of the last measured step, per variable, as
    arrays (histograms); [] unless `keep_gradients`."""
    return [v.numpy() for v in self._gradients or []]
