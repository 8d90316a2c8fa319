"""The eager outer loop: epochs, loop lengths, logging, summaries, checkpoints."""

import dataclasses
import time
from typing import Optional

from absl import logging
import keras
import tensorflow as tf

from dist_train import checkpoints
from dist_train import config as config_lib
from dist_train import data
from dist_train import guards
from dist_train import preemption
from dist_train import strategy as strategy_lib
from dist_train import summaries
from dist_train import trainer as trainer_lib


# Log lines name the caller of `_log`, not `_log` itself.
logging.ABSLLogger.register_frame_to_skip(__file__, "_log")


def next_loop_length(*, global_step: int, step_in_epoch: int,
                     steps_per_epoch: int, steps_per_loop: int,
                     log_every_steps: int,
                     checkpoint_every_steps: Optional[int] = None) -> int:
  """Steps to run in the next compiled call.

  A loop never crosses a log or checkpoint boundary (a multiple of
  `log_every_steps` or `checkpoint_every_steps`) or the end of the epoch, so
  logging, checkpoints and epoch ends happen between calls.
  """
  to_log = log_every_steps - global_step % log_every_steps
  to_epoch_end = steps_per_epoch - step_in_epoch
  to_checkpoint = (checkpoint_every_steps -
                   global_step % checkpoint_every_steps
                   if checkpoint_every_steps else to_epoch_end)
  return max(1, min(steps_per_loop, to_log, to_epoch_end, to_checkpoint))


@dataclasses.dataclass
class _Throughput:
  """Examples, steps and seconds since the last log, leaving out compiling
  loops."""

  examples: int = 0
  steps: int = 0
  seconds: float = 0.0

  def add(self, examples, steps, seconds):
    self.examples += examples
    self.steps += steps
    self.seconds += seconds

  def take(self):
    """Returns (examples per second, steps per second), or (None, None)."""
    rates = ((self.examples / self.seconds, self.steps / self.seconds)
             if self.seconds > 0 else (None, None))
    self.examples, self.steps, self.seconds = 0, 0, 0.0
    return rates


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


class Controller:
  """Runs epochs of compiled training loops and a validation pass per epoch."""

  def __init__(self, *, config: config_lib.Config,
               strategy: tf.distribute.Strategy, trainer: trainer_lib.Trainer,
               splits: data.Splits, checkpoint: checkpoints.RunCheckpoint,
               summary_writers: summaries.SummaryWriters, is_chief: bool):
    self._config = config
    self._strategy = strategy
    self._trainer = trainer
    self._splits = splits
    self._checkpoint = checkpoint
    self._summaries = summary_writers
    self._is_chief = is_chief
    self._steps_per_epoch = data.num_batches(len(splits.train),
                                             config.global_batch_size)
    self._first_loop_end_time = None
    self._sigterm = preemption.SigtermWatcher()
    self._eval_dataset = None

  @property
  def num_validation_examples(self) -> int:
    return len(self._splits.validation)

  @property
  def model(self) -> keras.Model:
    return self._trainer.model

  @property
  def global_step(self) -> int:
    return int(self._trainer.optimizer.iterations.numpy())

  def _examples_seen(self, epoch, step_in_epoch):
    num_train = len(self._splits.train)
    return epoch * num_train + min(
        step_in_epoch * self._config.global_batch_size, num_train)

  def _log(self, message, *args):
    if self._is_chief:
      logging.info(message, *args)

  def _train_iterator(self, epoch, step_in_epoch):
    """The iterator over the global batches of the remaining epochs.

    Batches already consumed are skipped on the global dataset, before it is
    split across replicas, so a resumed epoch continues with the next batch.
    The trainer splits each global batch across replicas.
    """
    return iter(data.make_train_dataset(
        self._splits.train, global_batch_size=self._config.global_batch_size,
        shuffle_buffer=self._config.shuffle_buffer, seed=self._config.seed,
        epoch=epoch, num_epochs=self._config.epochs - epoch,
        skip_batches=step_in_epoch))

  def _train_epoch(self, iterator, epoch, step_in_epoch, throughput):
    config = self._config
    self._trainer.reset_train_metrics()
    while step_in_epoch < self._steps_per_epoch:
      num_steps = next_loop_length(
          global_step=self.global_step, step_in_epoch=step_in_epoch,
          steps_per_epoch=self._steps_per_epoch,
          steps_per_loop=config.steps_per_loop,
          log_every_steps=config.log_every_steps,
          checkpoint_every_steps=config.checkpoint_every_steps)
      first_examples = self._examples_seen(epoch, step_in_epoch)
      compiling = self._trainer.train_traces == 0
      start = time.perf_counter()
      losses = self._trainer.train(iterator, num_steps)
      seconds = time.perf_counter() - start
      step_in_epoch += num_steps
      # Checked every loop, and loops end at log steps: a NaN stops the run
      # within one logging interval, before any checkpoint holds it.
      guards.check_losses(losses, first_step=self.global_step - num_steps + 1,
                          last_step=self.global_step)
      examples_seen = self._examples_seen(epoch, step_in_epoch)
      if compiling:
        self._first_loop_end_time = time.time()
      else:
        throughput.add(examples_seen - first_examples, num_steps, seconds)
      if self.global_step % config.log_every_steps == 0:
        self._log_interval(epoch, losses, examples_seen, *throughput.take())
      if step_in_epoch == self._steps_per_epoch:
        break  # The epoch end saves.
      if self._preemption_agreed():
        path = self._checkpoint.save(epoch=epoch, step_in_epoch=step_in_epoch)
        raise preemption.Preempted(path, self.global_step)
      if (config.checkpoint_every_steps and
          self.global_step % config.checkpoint_every_steps == 0):
        self._checkpoint.save(epoch=epoch, step_in_epoch=step_in_epoch)

  def _preemption_agreed(self) -> bool:
    """Whether any worker was asked to stop, agreed by all of them.

    Every worker must stop at the same step boundary (the checkpoint save
    runs collectives), so with several workers the local flags are summed
    across workers; one process decides alone.
    """
    requested = self._sigterm.requested
    if strategy_lib.num_workers(self._strategy) > 1:
      flags = self._strategy.run(
          lambda flag: flag, args=(tf.constant(float(requested)),))
      requested = float(self._strategy.reduce(
          tf.distribute.ReduceOp.SUM, flags, axis=None)) > 0
    return requested

  def _log_interval(self, epoch, losses, examples_seen, examples_per_second,
                    steps_per_second):
    self._log("step %d | epoch %d/%d | loss %.4f | examples %d | examples/s %s "
              "| steps/s %s", self.global_step, epoch + 1, self._config.epochs,
              losses["loss"], examples_seen, _fmt(examples_per_second, ".0f"),
              _fmt(steps_per_second, ".1f"))
    scalars = {
        "loss": losses["loss"],
        "accuracy": self._trainer.train_metric_results()["accuracy"],
        "learning_rate": self._trainer.learning_rate(),
    }
    if examples_per_second is not None:
      scalars["examples_per_second"] = examples_per_second
      scalars["steps_per_second"] = steps_per_second
    self._summaries.write_scalars("train", scalars, self.global_step)

  def evaluate(self) -> dict:
    """One pass over the validation split; {} when there is none."""
    if not len(self._splits.validation):
      return {}
    if self._eval_dataset is None:  # Built once: building captures the data.
      self._eval_dataset = data.make_eval_dataset(
          self._splits.validation,
          global_batch_size=self._config.global_batch_size)
    return self._trainer.evaluate(
        self._eval_dataset, data.num_batches(len(self._splits.validation),
                                  self._config.global_batch_size))

  def run(self, *, validate: bool = True) -> RunResult:
    """Trains from the latest checkpoint (if any) to the last epoch.

    Args:
      validate: run a validation pass after every epoch.
    """
    config = self._config
    if self._checkpoint.restore_latest():
      epoch = int(self._checkpoint.epoch)
      step_in_epoch = int(self._checkpoint.step_in_epoch)
      self._log("Resuming at step %d (epoch %d, step %d of %d)",
                self.global_step, epoch + 1, step_in_epoch,
                self._steps_per_epoch)
    else:
      epoch, step_in_epoch = 0, 0
    self._log("Training %d examples, validating %d, in global batches of %d "
              "(%d steps per epoch) on %d replica(s)", len(self._splits.train),
              len(self._splits.validation), config.global_batch_size,
              self._steps_per_epoch, self._strategy.num_replicas_in_sync)

    throughput = _Throughput()
    with self._sigterm:
      return self._run_epochs(epoch, step_in_epoch, validate, throughput)

  def _run_epochs(self, epoch, step_in_epoch, validate, throughput):
    config = self._config
    history = []
    train_metrics = {}
    validation_metrics = {}
    iterator = (self._train_iterator(epoch, step_in_epoch)
                if epoch < config.epochs else None)
    while epoch < config.epochs:
      start = time.perf_counter()
      self._train_epoch(iterator, epoch, step_in_epoch, throughput)
      train_seconds = time.perf_counter() - start
      train_metrics = self._trainer.train_metric_results()
      validation_metrics = self.evaluate() if validate else {}
      epoch, step_in_epoch = epoch + 1, 0
      self._checkpoint.save(epoch=epoch, step_in_epoch=0)
      if validation_metrics:
        self._summaries.write_scalars("validation", validation_metrics,
                                      self.global_step)
      self._log("epoch %d/%d done at step %d | train loss %.4f accuracy %.4f | "
                "validation loss %s accuracy %s", epoch, config.epochs,
                self.global_step, train_metrics["loss"],
                train_metrics["accuracy"],
                _fmt(validation_metrics.get("loss")),
                _fmt(validation_metrics.get("accuracy")))
      history.append({"epoch": epoch, "train": train_metrics,
                      "validation": validation_metrics,
                      "train_seconds": train_seconds})
    if not history:
      self._log("Already trained for %d epochs; nothing to do", config.epochs)
      validation_metrics = self.evaluate() if validate else {}
    return RunResult(model=self._trainer.model, global_step=self.global_step, epochs_completed=epoch,
                     train_metrics=train_metrics,
                     validation_metrics=validation_metrics, history=history,
                     first_loop_end_time=self._first_loop_end_time)


def _fmt(value, spec=".4f"):
  return "n/a" if value is None else format(value, spec)
