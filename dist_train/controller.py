"""The eager outer loop: epochs, loop lengths, logging, summaries, checkpoints."""

import dataclasses
import time

from absl import logging
import keras
import tensorflow as tf

from dist_train import checkpoints
from dist_train import config as config_lib
from dist_train import data
from dist_train import summaries
from dist_train import trainer as trainer_lib


# Log lines name the caller of `_log`, not `_log` itself.
logging.ABSLLogger.register_frame_to_skip(__file__, "_log")


def next_loop_length(*, global_step: int, step_in_epoch: int,
                     steps_per_epoch: int, steps_per_loop: int,
                     log_every_steps: int) -> int:
  """Steps to run in the next compiled call.

  A loop never crosses a log boundary (a multiple of `log_every_steps`) or the
  end of the epoch, so logging and epoch ends happen between calls.
  """
  to_log = log_every_steps - global_step % log_every_steps
  to_epoch_end = steps_per_epoch - step_in_epoch
  return max(1, min(steps_per_loop, to_log, to_epoch_end))


@dataclasses.dataclass
class _Throughput:
  """Examples and seconds since the last log, leaving out compiling loops."""

  examples: int = 0
  seconds: float = 0.0

  def add(self, examples, seconds):
    self.examples += examples
    self.seconds += seconds

  def take(self):
    rate = self.examples / self.seconds if self.seconds > 0 else None
    self.examples, self.seconds = 0, 0.0
    return rate


@dataclasses.dataclass(frozen=True)
class RunResult:
  """What a run reports: the trained model, last metrics and where it stopped."""

  model: keras.Model
  global_step: int
  epochs_completed: int
  train_metrics: dict
  validation_metrics: dict
  history: list  # One dict per epoch run in this process.


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
    """The distributed iterator of `epoch`, positioned at `step_in_epoch`.

    Batches already consumed are skipped on the global dataset, before it is
    split across replicas, so a resumed epoch continues with the next batch.
    """
    dataset = data.make_train_dataset(
        self._splits.train, global_batch_size=self._config.global_batch_size,
        shuffle_buffer=self._config.shuffle_buffer, seed=self._config.seed,
        epoch=epoch)
    if step_in_epoch:
      dataset = dataset.skip(step_in_epoch)
    return iter(self._strategy.experimental_distribute_dataset(dataset))

  def _train_epoch(self, epoch, step_in_epoch, throughput):
    config = self._config
    iterator = self._train_iterator(epoch, step_in_epoch)
    self._trainer.reset_train_metrics()
    while step_in_epoch < self._steps_per_epoch:
      num_steps = next_loop_length(
          global_step=self.global_step, step_in_epoch=step_in_epoch,
          steps_per_epoch=self._steps_per_epoch,
          steps_per_loop=config.steps_per_loop,
          log_every_steps=config.log_every_steps)
      first_examples = self._examples_seen(epoch, step_in_epoch)
      compiling = self._trainer.train_traces == 0
      start = time.perf_counter()
      losses = self._trainer.train(iterator, num_steps)
      seconds = time.perf_counter() - start
      step_in_epoch += num_steps
      examples_seen = self._examples_seen(epoch, step_in_epoch)
      if not compiling:
        throughput.add(examples_seen - first_examples, seconds)
      if self.global_step % config.log_every_steps == 0:
        self._log_interval(epoch, losses, examples_seen, throughput.take())

  def _log_interval(self, epoch, losses, examples_seen, examples_per_second):
    rate = "n/a" if examples_per_second is None else f"{examples_per_second:.0f}"
    self._log("step %d | epoch %d/%d | loss %.4f | examples %d | examples/s %s",
              self.global_step, epoch + 1, self._config.epochs, losses["loss"],
              examples_seen, rate)
    scalars = {
        "loss": losses["loss"],
        "accuracy": self._trainer.train_metric_results()["accuracy"],
        "learning_rate": self._trainer.learning_rate(),
    }
    if examples_per_second is not None:
      scalars["examples_per_second"] = examples_per_second
    self._summaries.write_scalars("train", scalars, self.global_step)

  def evaluate(self) -> dict:
    """One pass over the validation split; {} when there is none."""
    if not len(self._splits.validation):
      return {}
    dataset = data.make_eval_dataset(
        self._splits.validation,
        global_batch_size=self._config.global_batch_size)
    return self._trainer.evaluate(
        dataset, data.num_batches(len(self._splits.validation),
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
    history = []
    train_metrics = {}
    validation_metrics = {}
    while epoch < config.epochs:
      self._train_epoch(epoch, step_in_epoch, throughput)
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
                      "validation": validation_metrics})
    if not history:
      self._log("Already trained for %d epochs; nothing to do", config.epochs)
      validation_metrics = self.evaluate() if validate else {}
    return RunResult(model=self._trainer.model, global_step=self.global_step, epochs_completed=epoch,
                     train_metrics=train_metrics,
                     validation_metrics=validation_metrics, history=history)


def _fmt(value):
  return "n/a" if value is None else f"{value:.4f}"
