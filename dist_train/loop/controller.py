"""The eager outer loop: epochs of compiled loops, logging, summaries, saves."""

import dataclasses
import time
from typing import Callable, Iterator, Optional

import keras
import tensorflow as tf

from dist_train import errors
from dist_train.distribute import strategy as strategy_lib
from dist_train.loop import guards
from dist_train.loop import preemption
from dist_train.loop import schedule as schedule_lib
from dist_train.loop import steps
from dist_train.loop import throughput as throughput_lib
from dist_train.outputs import checkpoints
from dist_train.outputs import summaries


@dataclasses.dataclass(frozen=True)
class RunResult:
  """What a run reports: the trained model, last metrics and where it stopped."""

  model: keras.Model
  global_step: int
  epochs_completed: int
  train_metrics: dict
  validation_metrics: dict
  history: list  # One dict per epoch run in this process.
  # time.time() when the first training loop of this process returned.
  first_loop_end_time: Optional[float] = None
  # What ran: the strategy's replicas in sync and worker processes, and the
  # compiled training loops this process called (a resumed run counts its
  # own; --steps_per_loop and the log and checkpoint steps set how many).
  num_replicas: int = 1
  num_workers: int = 1
  loop_calls: int = 0


@dataclasses.dataclass(frozen=True)
class Validation:
  """The validation split as the loop reads it: a dataset of global batches
  (built on first use) and how many batches one pass has."""

  dataset_fn: Callable[[], tf.data.Dataset]
  num_steps: int


class Controller:
  """Runs epochs of compiled training loops and a validation pass per epoch.

  Collaborators are handed in: the trainer (compiled steps), the loop
  schedule, a factory of training iterators, the validation data, the
  checkpoint, the summary writers, the preemption agreement and a log
  function (a no-op on workers other than the chief).
  """

  def __init__(self, *, trainer: steps.Trainer,
               schedule: schedule_lib.LoopSchedule,
               train_iterator_fn: Callable[[int, int], Iterator],
               validation: Optional[Validation],
               checkpoint: checkpoints.RunCheckpoint,
               summary_writers: summaries.SummaryWriters,
               preemption_agreement: preemption.PreemptionAgreement,
               log: Callable[..., None],
               boundary_checks: tuple = ()):
    """Creates the controller.

    Args:
      trainer: runs compiled training and evaluation loops.
      schedule: epochs, steps per epoch and loop boundaries.
      train_iterator_fn: (epoch, step_in_epoch) -> iterator over the global
        batches of the remaining epochs, starting with that step.
      validation: the validation split, or None.
      checkpoint: saves and restores the run.
      summary_writers: TensorBoard writers (writing nothing off the chief).
      preemption_agreement: whether the workers agreed to save and stop.
      log: `logging.info`-like; a no-op on workers other than the chief.
      boundary_checks: callables run between compiled loops that raise to
        stop the run (e.g. the model_dir ownership check).
    """
    self._trainer = trainer
    self._schedule = schedule
    self._train_iterator_fn = train_iterator_fn
    self._validation = validation
    self._validation_dataset = None
    self._checkpoint = checkpoint
    self._summaries = summary_writers
    self._preemption = preemption_agreement
    self._log = log
    self._boundary_checks = tuple(boundary_checks)
    self._first_loop_end_time = None

  @property
  def model(self) -> keras.Model:
    return self._trainer.model

  @property
  def has_validation(self) -> bool:
    return self._validation is not None

  @property
  def global_step(self) -> int:
    return int(self._trainer.optimizer.iterations.numpy())

  def _save(self, *, epoch, step_in_epoch):
    # Never write NaN or Inf over good work.
    guards.check_variables(self.model.variables)
    return self._checkpoint.save(epoch=epoch, step_in_epoch=step_in_epoch)

  def _train_epoch(self, iterator, epoch, step_in_epoch, throughput):
    schedule = self._schedule
    self._trainer.reset_train_metrics()
    while step_in_epoch < schedule.steps_per_epoch:
      num_steps = schedule.next_loop_length(global_step=self.global_step,
                                            step_in_epoch=step_in_epoch)
      first_examples = schedule.examples_seen(epoch, step_in_epoch)
      compiling = self._trainer.train_traces == 0
      start = time.perf_counter()
      first_step = self.global_step + 1
      with errors.phase(f"training steps {first_step}-"
                        f"{first_step + num_steps - 1}"):
        losses = self._trainer.train_steps(iterator, num_steps)
      seconds = time.perf_counter() - start
      step_in_epoch += num_steps
      # Checked every loop, and loops end at log steps: a NaN stops the run
      # within one logging interval, before any checkpoint holds it.
      guards.check_losses(losses, first_step=first_step,
                          last_step=self.global_step)
      examples_seen = schedule.examples_seen(epoch, step_in_epoch)
      if compiling:
        self._first_loop_end_time = time.time()
      else:
        throughput.add(examples=examples_seen - first_examples,
                       steps=num_steps, seconds=seconds)
      if schedule.is_log_step(self.global_step):
        self._log_interval(epoch, losses, examples_seen, *throughput.take())
      for check in self._boundary_checks:
        check()
      if step_in_epoch == schedule.steps_per_epoch:
        break  # The epoch end saves.
      if self._preemption.agreed():
        path = self._save(epoch=epoch, step_in_epoch=step_in_epoch)
        raise preemption.Preempted(path, self.global_step)
      if schedule.is_checkpoint_step(self.global_step):
        self._save(epoch=epoch, step_in_epoch=step_in_epoch)

  def _log_interval(self, epoch, losses, examples_seen, examples_per_second,
                    steps_per_second):
    self._log("step %d | epoch %d/%d | loss %.4f | examples %d | examples/s %s "
              "| steps/s %s", self.global_step, epoch + 1,
              self._schedule.num_epochs, losses["loss"], examples_seen,
              _fmt(examples_per_second, ".0f"), _fmt(steps_per_second, ".1f"))
    scalars = {
        "loss": losses["loss"],
        "accuracy": self._trainer.train_metric_results()["accuracy"],
        "learning_rate": self._trainer.learning_rate(),
    }
    if examples_per_second is not None:
      scalars["examples_per_second"] = examples_per_second
      scalars["steps_per_second"] = steps_per_second
    self._summaries.write_scalars("train", scalars, self.global_step)

  def validate(self) -> dict:
    """One pass over the validation split; {} when there is none."""
    if self._validation is None:
      return {}
    with errors.phase(f"validating at step {self.global_step}"):
      if self._validation_dataset is None:  # Built once: it captures the data.
        self._validation_dataset = self._validation.dataset_fn()
      return self._trainer.eval_steps(self._validation_dataset,
                                      self._validation.num_steps)

  def train(self, *, validate: bool = True) -> RunResult:
    """Trains from the latest checkpoint (if any) to the last epoch.

    Args:
      validate: run a validation pass after every epoch.
    """
    with errors.phase("restoring the latest checkpoint"):
      position = self._checkpoint.restore_latest()
    if position:
      epoch, step_in_epoch = position.epoch, position.step_in_epoch
      self._log("Resuming at step %d (epoch %d, step %d of %d)",
                self.global_step, epoch + 1, step_in_epoch,
                self._schedule.steps_per_epoch)
    else:
      epoch, step_in_epoch = 0, 0
    with self._preemption.watcher:
      return self._run_epochs(epoch, step_in_epoch, validate)

  def _run_epochs(self, epoch, step_in_epoch, validate):
    num_epochs = self._schedule.num_epochs
    throughput = throughput_lib.Throughput()
    history = []
    train_metrics = {}
    validation_metrics = {}
    iterator = (self._train_iterator_fn(epoch, step_in_epoch)
                if epoch < num_epochs else None)
    while epoch < num_epochs:
      start = time.perf_counter()
      self._train_epoch(iterator, epoch, step_in_epoch, throughput)
      train_seconds = time.perf_counter() - start
      train_metrics = self._trainer.train_metric_results()
      validation_metrics = self.validate() if validate else {}
      epoch, step_in_epoch = epoch + 1, 0
      self._save(epoch=epoch, step_in_epoch=0)
      if validation_metrics:
        self._summaries.write_scalars("validation", validation_metrics,
                                      self.global_step)
      self._log("epoch %d/%d done at step %d | train loss %.4f accuracy %.4f | "
                "validation loss %s accuracy %s", epoch, num_epochs,
                self.global_step, train_metrics["loss"],
                train_metrics["accuracy"],
                _fmt(validation_metrics.get("loss")),
                _fmt(validation_metrics.get("accuracy")))
      history.append({"epoch": epoch, "train": train_metrics,
                      "validation": validation_metrics,
                      "train_seconds": train_seconds})
    if not history:
      self._log("Already trained for %d epochs; nothing to do", num_epochs)
      validation_metrics = self.validate() if validate else {}
    return RunResult(model=self.model, global_step=self.global_step,
                     epochs_completed=epoch, train_metrics=train_metrics,
                     validation_metrics=validation_metrics, history=history,
                     first_loop_end_time=self._first_loop_end_time,
                     num_replicas=self._trainer.strategy.num_replicas_in_sync,
                     num_workers=strategy_lib.num_workers(
                         self._trainer.strategy),
                     loop_calls=self._trainer.train_loop_calls)


def _fmt(value, spec=".4f"):
  return "n/a" if value is None else format(value, spec)
