"""The compiled multi-step loops: many global steps in one `tf.function`.

Three tiers, kept apart:
  * the per-replica step (`replica_step.py`): one replica's step on its
    share of a global batch, run by `strategy.run`;
  * the compiled loop (`Trainer` here): a `tf.function` running `num_steps`
    global steps with a `tf.range` loop over an iterator of this worker's
    step inputs; `num_steps` is a tensor, so a loop of another length does
    not retrace;
  * the eager outer loop, which lives in `controller.py`.

As Orbit's StandardTrainer does, the Trainer owns its inputs and their
iterators: the outer loop says `train(num_steps)` and `evaluate()`. Each
step's per-replica shares come from an input: in a run, the
`inputs.ReplicaInput` of each split, which reads only this worker's rows and
slices them across the replicas inside the loop (instead of
`strategy.experimental_distribute_dataset`, whose per-step machinery cost
more than the step of the reference model on CPU replicas). The global
example count and weight sums that scale the loss (`losses.py`) come with
the shares, or, for a stream each worker reads its own shard of, from one
all-reduce in the step.
"""

import contextlib
from typing import Optional

import keras
import tensorflow as tf

from dist_train.distribute import inputs
from dist_train.distribute import strategy as strategy_lib
from dist_train.loop import ema as ema_lib
from dist_train.loop import gradients as gradients_lib
from dist_train.loop import health as health_lib
from dist_train.loop import losses
from dist_train.loop import metrics as metrics_lib
from dist_train.loop import replica_step as replica_step_lib
from dist_train.loop import shares
from dist_train.loop import sync_batchnorm as sync_batchnorm_lib
from dist_train.tasks import base


class Trainer:
  """Owns the task's model, optimizer and metrics, and its compiled loops.

  The model and optimizer must have been created under `strategy.scope()`;
  the metrics are created under it here. Each replica's step is a
  `replica_step.ReplicaStep`; gradients are applied by a
  `gradients.GradientApplier`. It owns the training input and its iterator
  (`start_training`, then `train(num_steps)`) and the validation input
  (`evaluate()`).
  """

  def __init__(self, *, strategy: tf.distribute.Strategy, task,
               model: keras.Model, optimizer: keras.optimizers.Optimizer,
               add_loss_reduction: str, clip_norm: Optional[float] = None,
               jit_compile: bool = False, grad_accum_steps: int = 1,
               train_input, eval_input=None, shuffle_buffer: int = 0,
               seed: int = 0,
               description: Optional[base.TaskDescription] = None,
               ema: Optional[ema_lib.WeightAverage] = None,
               eval_with_ema: bool = True,
               sync_batchnorm: Optional[bool] = None,

               health: Optional[health_lib.StepHealth] = None):
    """Creates the trainer.

    `add_loss_reduction`, `clip_norm`, `jit_compile`, `grad_accum_steps`,
    `shuffle_buffer`, `seed` and `sync_batchnorm` are the flags of the same
    names.
    `train_input` and `eval_input` (None: no validation) give the loops each
    step's per-replica shares: an `inputs.ReplicaInput`, or any object with
    its `next_shares(iterator)` and `divisors_in_batch` for callers that run
    `train_steps` on iterators of their own. `description` is the task's,
    from `tasks.base.check_task`; by default the task is checked and
    described here. `ema`, the average of the weights (`--ema_decay`), is
    updated after each step; with `eval_with_ema`, `evaluate` sees it.
    described here. `health` (None: off) records the training health
    (`health.py`); a loop run with `measure=True` keeps its last step's
    gradient norm and, with several workers, times its last steps.
    """
    if grad_accum_steps < 1:
      raise ValueError(
          f"grad_accum_steps must be positive, got {grad_accum_steps}")
    self.strategy = strategy
    self._train_input = train_input
    self._eval_input = eval_input
    self._health = health
    # Of this worker's last training loop: its timed steps (health.py) and
    # the seconds they waited for their input.
    self.last_input_seconds = 0.0
    self.last_timed_steps = 0
    self._shuffle_buffer = shuffle_buffer
    self._seed = seed
    self._train_iterator = None
    self._eval_dataset = None
    self.task = task
    self.model = model
    self.optimizer = optimizer
    self.ema = ema
    # The average that evaluation (and best/, the export) sees, if any.
    self.eval_average = ema if eval_with_ema else None
    description = description or base.check_task(
        task, getattr(task, "name", None) or type(task).__name__)
    self._custom_step = description.own_step
    loss_names = {output: (losses.TOTAL if output is None else
                           f"{output}_loss") for output in description.outputs}
    task_metrics = (task.metrics if "metrics" in description.hooks
                    else lambda: [])
    with strategy.scope():
      self.train_metrics = metrics_lib.TaskMetrics(description, task_metrics(),
                                                   loss_names)
      self.eval_metrics = metrics_lib.TaskMetrics(description, task_metrics(),
                                                  loss_names)
    if self._custom_step:
      # A task's own step reports its loss, not per-element losses: the
      # training `loss` is the mean over the epoch's steps. Created outside
      # the strategy's scope: it is updated in cross-replica context with the
      # loss already summed over replicas.
      self._step_loss = keras.metrics.Mean(name=losses.TOTAL)
    # Which share each replica runs, for the message of an error in a step.
    self._share_log = shares.ShareLog(
        strategy=strategy, num_micro_batches=grad_accum_steps,
        first_replica=inputs.replica_layout(strategy).first_replica)
    # Before the step is traced: the layers' moments are replaced on them.
    synchronized = sync_batchnorm_lib.resolve(
        requested=sync_batchnorm, model=model,
        num_replicas=strategy.num_replicas_in_sync,
        grad_accum_steps=grad_accum_steps, own_step=self._custom_step,
        jit_compile=jit_compile, log=strategy_lib.is_chief(strategy))
    sync_batchnorm_lib.synchronize(synchronized)
    self._replica_step = replica_step_lib.ReplicaStep(
        strategy=strategy, task=task, description=description, model=model,
        optimizer=optimizer,
        applier=gradients_lib.GradientApplier(optimizer=optimizer,
                                              clip_norm=clip_norm,
                                              health=health),
        train_metrics=self.train_metrics, eval_metrics=self.eval_metrics,
        share_log=self._share_log, add_loss_reduction=add_loss_reduction,
        grad_accum_steps=grad_accum_steps, jit_compile=jit_compile,
        divisors_in_batch=self._train_input.divisors_in_batch,
        synchronized_layers=synchronized)
    self.term_names = self._replica_step.term_names
    self._train_loop = tf.function(self._train_loop_fn)
    self._eval_loop = tf.function(self._eval_loop_fn)
    self._train_loop_calls = 0

  # Tier 2: many global steps in one compiled call.

  def _train_loop_fn(self, iterator, num_steps, loss_sums, input_seconds,
                     measure, timed=False):
    """Runs `num_steps` global steps; returns `loss_sums` with each step's
    loss terms added and `input_seconds` with the seconds the timed steps
    waited for their input.

    `measure` is a boolean tensor (one trace serves both values): true for a
    loop that ends at a log step, whose last step is then the health's
    measured step (health.py). `timed` (a Python bool: a trace of its own,
    made only with several workers) times every step: its input wait and
    each replica's compute, for the straggler report.
    """
    for step in tf.range(num_steps):
      loss_sums, input_seconds = self._train_step_fn(
          iterator, loss_sums, input_seconds,
          tf.logical_and(measure, step == num_steps - 1), timed)
    return loss_sums, input_seconds

  def _train_step_fn(self, iterator, loss_sums, input_seconds, measured,
                     timed):
    """One global step: (loss sums, input seconds) with this step's added
    (`timed`: the seconds this worker waited for the step's input).
    `measured`: a boolean tensor, true in the health's measured step."""
    if not timed:
      args = self._train_input.next_shares(iterator)
    else:
      # After the previous step's loss (the end of its collectives): else
      # the loop may read the clock early, and count the wait for the
      # other workers as this worker's input. This orders the step after
      # the one before, which is why only a few steps are timed.
      with tf.control_dependencies([loss_sums]):
        start = tf.timestamp()
      with tf.control_dependencies([start]):
        args = self._train_input.next_shares(iterator)
      with tf.control_dependencies(
          tf.nest.flatten(args, expand_composites=True)):
        input_seconds += tf.timestamp() - start
    if self._health is None:
      return self._train_step(args, loss_sums), input_seconds
    with self._health.step(measured=measured, timed=timed):
      return self._train_step(args, loss_sums), input_seconds

  def _train_step(self, args, loss_sums):
    """One global step on this worker's shares `args`: `loss_sums` with the
    step's loss terms added."""
    per_replica = self.strategy.run(self._replica_step.train, args=args)
    if self.ema is not None:
      self.ema.update()
    step_terms = self.strategy.reduce(tf.distribute.ReduceOp.SUM,
                                      per_replica, axis=None)
    if self._custom_step:
      self._step_loss.update_state(step_terms[0])
    return loss_sums + step_terms

  def _eval_loop_fn(self, iterator, num_steps):
    for _ in tf.range(num_steps):
      self.strategy.run(self._replica_step.evaluate,
                        args=self._eval_input.next_shares(iterator))

  # The interface the outer loop uses.

  def start_training(self, *, epoch: int, step_in_epoch: int,
                     num_epochs: int) -> None:
    """Builds the training iterator over the epochs from `epoch` to
    `num_epochs`, starting at its step `step_in_epoch`.

    Batches already consumed are skipped on the global order (or this
    worker's shard), before any split across replicas: a resumed epoch goes
    on exactly.
    """
    self._train_iterator = iter(self._train_input.train_dataset(
        shuffle_buffer=self._shuffle_buffer, seed=self._seed, epoch=epoch,
        num_epochs=num_epochs - epoch, skip_batches=step_in_epoch))

  def train(self, num_steps: int, *, measure: bool = False) -> dict:
    """Runs the next `num_steps` global steps of the training input (see
    `train_steps`); `start_training` comes first."""
    return self.train_steps(self._started_iterator(), num_steps,
                            measure=measure)

  def trace_train(self) -> None:
    """Traces the training loop without running a step (a stop request
    during a long first trace can then end the run at once), and its timed
    version where there is one (several workers), so that no log interval
    pays for a trace."""
    self.trace_train_steps(self._started_iterator())
    if self._health is not None and self._health.timed_steps:
      self.trace_train_steps(self._started_iterator(), timed=True)

  def _started_iterator(self):
    if self._train_iterator is None:
      raise RuntimeError("Trainer.train() before start_training()")
    return self._train_iterator

  @property
  def has_validation(self) -> bool:
    return self._eval_input is not None

  def evaluate(self, *, chunk_steps=None, stop_fn=None, guard=None):
    """One pass over the validation input; returns the metric values, or
    None when `stop_fn` stopped it (see `eval_steps`)."""
    if self._eval_dataset is None:  # Built once: it captures the data.
      self._eval_dataset = self._eval_input.eval_dataset()
    with ema_lib.evaluation_weights(self.eval_average):
      return self.eval_steps(self._eval_dataset,
                             self._eval_input.steps_per_epoch,
                             chunk_steps=chunk_steps, stop_fn=stop_fn,
                             guard=guard)

  def take_read_count(self) -> int:
    """Training examples this worker's pipeline read since the last call."""
    return self._train_input.take_read_count()

  def train_steps(self, iterator, num_steps: int, *,
                  measure: bool = False) -> dict:
    """Runs `num_steps` global steps from `iterator`, an iterator over the
    train input's datasets (`train` uses the trainer's own); with `measure`
    (and the health on), the last one is the health's measured step.

    Returns:
      The mean over those steps of the global-batch objective (`loss`) and
      of its terms (the task's data terms, `regularization`, `add_loss`), as
      floats.
    """
    timed_steps = (min(num_steps, self._health.timed_steps)
                   if measure and self._health is not None else 0)
    sums = tf.zeros([len(self.term_names)])
    input_seconds = tf.zeros([], tf.float64)
    try:
      # The untimed steps, then the timed ones (several workers): the same
      # sums carried through, so the means are those of one loop.
      for count, timed in ((num_steps - timed_steps, False),
                           (timed_steps, True)):
        if count:
          sums, input_seconds = self._train_loop(
              iterator, tf.constant(count, tf.int32), sums, input_seconds,
              tf.constant(measure), timed)
    except tf.errors.OpError as e:
      raise self._share_log.describe(e) from e
    self._train_loop_calls += 1
    self.last_input_seconds = float(input_seconds)
    self.last_timed_steps = timed_steps
    means = losses.unpack(sums / tf.cast(num_steps, tf.float32),
                          self.term_names)
    return {name: float(value) for name, value in means.items()}

  def trace_train_steps(self, iterator, *, timed: bool = False):
    """Traces the training loop (`timed`: its timed version) without
    running a step, and returns the concrete function. The step count and
    `measure` are tensors: one trace serves loops of every length, measured
    or not."""
    return self._train_loop.get_concrete_function(
        iterator, tf.constant(1, tf.int32), tf.zeros([len(self.term_names)]),
        tf.zeros([], tf.float64), tf.constant(False), timed)

  def eval_steps(self, dataset, num_steps: int, *, chunk_steps=None,
                 stop_fn=None, guard=None):
    """One pass over a dataset of the eval input; returns the metric
    values.

    With `stop_fn`, the pass runs in compiled calls of `chunk_steps` steps
    and asks `stop_fn()` before each; it returns None when that says stop.
    `guard()`, when given, is a context manager entered around each call
    (the collective watchdog).
    """
    self.eval_metrics.reset()
    iterator = iter(dataset)
    chunk_steps = max(1, chunk_steps or num_steps)
    for begin in range(0, num_steps, chunk_steps):
      if stop_fn is not None and stop_fn():
        return None
      with guard() if guard else contextlib.nullcontext():
        self._eval_loop(iterator, tf.constant(
            min(chunk_steps, num_steps - begin), tf.int32))
    return self.eval_metrics.results()

  @property
  def train_traces(self) -> int:
    """How often the training loop was traced; 0 before its first call."""
    return self._train_loop.experimental_get_tracing_count()

  @property
  def eval_traces(self) -> int:
    """How often the evaluation loop was traced; 0 before its first call."""
    return self._eval_loop.experimental_get_tracing_count()

  @property
  def train_loop_calls(self) -> int:
    """How many compiled training loops `train_steps` has run."""
    return self._train_loop_calls

  def learning_rate(self) -> float:
    return float(self.optimizer.learning_rate.numpy())

  def reset_train_metrics(self):
    self.train_metrics.reset()
    if self._custom_step:
      self._step_loss.reset_state()

  def train_metric_results(self) -> dict:
    results = self.train_metrics.results()
    if self._custom_step:
      results[losses.TOTAL] = float(self._step_loss.result())
    return results

