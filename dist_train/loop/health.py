"""Training health measured inside the compiled loop: the norm of the summed
gradient, how often it was clipped, overflowed (skipped) steps, and this
worker's own input and compute time.

The norm and the counts are measured in the one trace of the training
step, so that on one worker the health costs no second trace (and no
second first-call build) of the step:

* The norm of the summed gradient needs the gradient summed over every
  replica. The optimizer makes that sum anyway (its all-reduce); the step
  reads it there (`compat.observe_summed_gradients`) instead of making a
  second all-reduce, or from clipping, which computes the norm at every
  step. The norm itself (and, for histograms, a copy of the gradient) is
  computed in the measured step only, the last of a loop that ends at a log
  step: a `tf.cond` on a predicate the compiled loop sets (`measured`).
* Clipped and overflowed steps are counted at every step, from what
  clipping and loss scaling compute anyway.
* With several workers, the last TIMED_STEPS steps of a loop ending at a
  log step are timed, for the straggler report: their input wait (by the
  compiled loop, `steps.py`) and each replica's compute (a clock when its
  share is in hand and one when its gradients are). The input clock must
  wait for the previous step's end, which orders the step after it: timed
  at every step, the clocks cost the reference CNN 15% of its examples per
  second on 2 CPU replicas. The timed steps are therefore a version of the
  loop of their own, traced with several workers only. One worker, with no
  straggler to find, has no clock in its steps: its time per step is its
  loops' wall clock (`health_report.py`).

Every value lives in an ON_READ variable read from this worker's first
replica, which alone writes it (its copy, without a collective; the other
replicas carry none of these ops), and a read stays local.
The quantities are global (every replica computes the same norm and the
same overflow), except the compute time, which is this worker's and is
gathered across workers at log steps by `health_report.py`.
"""

import contextlib
import threading

import tensorflow as tf

from dist_train import compat
from dist_train.distribute import inputs

# How many steps at the end of a loop ending at a log step are timed with
# several workers: a sample of the interval, so that the other steps carry
# no clock.
TIMED_STEPS = 10

_LOCAL = dict(synchronization=tf.VariableSynchronization.ON_READ,
              aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
              trainable=False, dtype=tf.float32)


class StepHealth:
  """The health counters of the training step, written in replica context.

  Attributes:
    measured: while the compiled loop traces a step, a boolean tensor, true
      in the step whose gradient norm is kept (the last of a loop ending at
      a log step); set by `step`, None outside it.
  """

  def __init__(self, *, strategy: tf.distribute.Strategy, variables=(),
               keep_gradients: bool = False, timed_steps: int = 0):
    """Creates the counters under the strategy's scope.

    Args:
      strategy: the run's strategy.
      variables: the trainable variables, whose weight norm is read (and,
        with `keep_gradients`, whose summed gradients are kept).
      keep_gradients: keep the summed gradient of each measured step, for
        histograms (a copy of the weights' size).
      timed_steps: how many steps end a loop ending at a log step timed:
        TIMED_STEPS with several workers, 0 on one.
    """
    self.timed_steps = timed_steps
    self._timed = False
    # This worker's first replica, which writes the values it reads.
    self._first_replica = inputs.replica_layout(strategy).first_replica
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
    self.measured = None
    self._replica = threading.local()  # Each replica traces in its thread.

  @property
  def keeps_gradients(self) -> bool:
    return self._gradients is not None

  def observe(self, optimizer) -> None:
    """Keeps the norm of the gradient `optimizer` sums over the replicas, in
    the measured step (without --clip_norm, which gives `record` the norm
    of the sum before clipping)."""
    compat.observe_summed_gradients(optimizer, self._variables, self._summed)

  @contextlib.contextmanager
  def step(self, *, measured, timed: bool = False):
    """The compiled loop traces its step inside (cross-replica context):
    `measured`, a boolean tensor, is true in the measured step; `timed`,
    the step's compute is timed. Outside, nothing is kept: an optimizer
    observed here and stepped by another loop records nothing."""
    self.measured, self._timed = measured, timed
    try:
      yield
    finally:
      self.measured, self._timed = None, False

  # In replica context, while the step is traced.

  def _writes(self) -> bool:
    """Whether this replica writes the values: this worker's first, whose
    copies are read (or every replica, where its id is not known while
    tracing)."""
    replica = tf.get_static_value(
        tf.distribute.get_replica_context().replica_id_in_sync_group)
    return replica is None or replica == self._first_replica

  def step_started(self, batch) -> None:
    """Marks when this replica's share is in hand (after its input), in a
    timed step."""
    if not self._timed or not self._writes():
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
        clipping, computed by clipping (None: the optimizer's sum gives it,
        see `observe`).
      clip_norm: --clip_norm, or None.
      overflow: a boolean tensor, true when the step overflowed and is
        skipped (mixed_float16), or None. The measured step's norm is then
        NaN: the optimizer sums no gradient.
      summed: the summed, unscaled gradient of each variable (None where a
        variable has none), with `norm`.
    """
    if not self._writes():
      return
    if overflow is not None:
      self._skipped_steps.assign_add(tf.cast(overflow, tf.float32))
    if clip_norm is not None and norm is not None:
      self._clipped_steps.assign_add(tf.cast(norm > clip_norm, tf.float32))
    if norm is not None:
      self._keep(lambda: (norm, summed))
    elif overflow is not None:
      self._keep(lambda: (tf.constant(float("nan")), None),
                 when=tf.logical_and(self.measured, overflow))

  def _summed(self, gradients) -> None:
    """The optimizer's summed gradients, one per variable (None where a
    variable has none), unscaled."""
    self._keep(lambda: (tf.linalg.global_norm(
        [g for g in gradients if g is not None]), gradients))

  def _keep(self, norm_and_summed, when=None) -> None:
    """In the measured step (or `when`), assigns the norm and (for
    histograms) the summed gradients that `norm_and_summed()` computes."""

    def keep():
      norm, summed = norm_and_summed()
      updates = [self._gradient_norm.assign(tf.cast(norm, tf.float32))]
      if self._gradients is not None and summed is not None:
        updates += [variable.assign(tf.cast(gradient, tf.float32))
                    for variable, gradient in zip(self._gradients, summed)
                    if gradient is not None]
      with tf.control_dependencies(updates):
        return tf.constant(True)

    if self.measured is None or not self._writes():  # Not this loop's step.
      return
    tf.cond(self.measured if when is None else when, keep,
            lambda: tf.constant(False))

  # In cross-replica context, at log steps.

  def take(self) -> dict:
    """The values since the last call, as floats, and the counters reset:
    gradient_norm (of the last measured step), clipped_steps,
    skipped_steps, compute_seconds (this worker's) and weight_norm.

    Eager: a few reads a log interval cost less than tracing a function
    for them, which every run would pay."""
    values = {"gradient_norm": self._gradient_norm,
              "clipped_steps": self._clipped_steps,
              "skipped_steps": self._skipped_steps,
              "compute_seconds": self._compute_seconds}
    taken = {name: float(variable.read_value())
             for name, variable in values.items()}
    taken["weight_norm"] = float(tf.linalg.global_norm(
        [tf.cast(v, tf.float32) for v in self._variables]))
    for counter in (self._clipped_steps, self._skipped_steps,
                    self._compute_seconds):
      counter.assign(0.0)
    return taken

  def gradient_values(self) -> list:
    """The summed gradient of the last measured step, per variable, as
    arrays (histograms); [] unless `keep_gradients`."""
    return [v.numpy() for v in self._gradients or []]
