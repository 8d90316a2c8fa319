"""The eager outer loop: epochs of compiled loops, logging, summaries, saves."""

import dataclasses
import time
from typing import Any, Callable, Optional, Sequence

import keras

from dist_train import errors
from dist_train.distribute import strategy as strategy_lib
from dist_train.distribute import watchdog as watchdog_lib
from dist_train.loop import guards
from dist_train.loop import health_report as health_report_lib
from dist_train.loop import preemption
from dist_train.loop import schedule as schedule_lib
from dist_train.loop import spikes
from dist_train.loop import steps
from dist_train.loop import stop
from dist_train.loop import throughput as throughput_lib
from dist_train.loop import time_limits
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
  # Why training ended before its last step (early stopping, a callback).
  stopped_early: Optional[str] = None
  # What ran: the strategy's replicas in sync and worker processes, and the
  # compiled training loops this process called (a resumed run counts its
  # own; --steps_per_loop and the log and checkpoint steps set how many).
  num_replicas: int = 1
  num_workers: int = 1
  loop_calls: int = 0


class Controller:
  """Runs epochs of compiled training loops and a validation pass per epoch.

  Collaborators are handed in: the trainer (its inputs and compiled steps),
  the loop schedule, the checkpoint, the summary writers, the preemption
  agreement, a log function (a no-op on workers other than the chief), and
  one list of hooks, Keras callbacks: the user's and the run's own
  (`hooks.py`).
  """

  def __init__(self, *, trainer: steps.Trainer,
               schedule: schedule_lib.LoopSchedule,
               checkpoint: checkpoints.RunCheckpoint,
               summary_writers: summaries.SummaryWriters,
               preemption_agreement: preemption.PreemptionAgreement,
               log: Callable[..., None],
               callbacks: Sequence[keras.callbacks.Callback] = (),
               progress_fn: Optional[Callable[[int, int, int], Any]] = None,
               watchdog: Optional[watchdog_lib.CollectiveWatchdog] = None,
               wall_clock: Optional[time_limits.WallClock] = None,
               spike_policy: Optional[spikes.SpikePolicy] = None,
               recovery_fn: Optional[Callable[[spikes.Recovery], Any]] = None,

               health_report: Optional[health_report_lib.HealthReport] = None):
    """Creates the controller.

    Args:
      trainer: runs compiled training and evaluation loops on its inputs.
      schedule: epochs, steps per epoch and loop boundaries.
      checkpoint: saves and restores the run.
      summary_writers: TensorBoard writers (writing nothing off the chief).
      preemption_agreement: whether the workers agreed to save and stop.
      log: `logging.info`-like; a no-op on workers other than the chief.
      callbacks: keras.callbacks.Callback objects, called in this order at
        loop boundaries (see `hooks.py`); one that sets
        `model.stop_training` ends the run at the next boundary.
      progress_fn: (epoch from 1, epochs, steps per epoch) -> a progress bar
        with `update(step_in_epoch, examples_per_second)`, `close()` and
        `enabled` (console.EpochProgress); while a bar is shown, the log line
        of each interval is left out (TensorBoard still gets its scalars).
      watchdog: fails a call that waits on peer workers for too long (the
        compiled loops after their first, the agreement at each boundary).
      wall_clock: --max_runtime_s and --checkpoint_every_secs, asked at each
        boundary and agreed with the stop requests.
      spike_policy: --loss_upper_bound and --recovery_max_trials: what a
        loss spike is and whether the run rolls back from it.
      recovery_fn: called with each `spikes.Recovery` made (the chief
        records it in run.json).
      health_report: the training-health scalars of each log interval
        (--health_scalars; None: none). A loop ending at a log step
        measures its last step.
    """
    self._trainer = trainer
    self._schedule = schedule
    self._checkpoint = checkpoint
    self._summaries = summary_writers
    self._preemption = preemption_agreement
    self._log = log
    self._progress_fn = progress_fn or _NoProgress
    # The params Keras' fit gives its callbacks.
    self._callbacks = keras.callbacks.CallbackList(
        list(callbacks), model=trainer.model, epochs=schedule.num_epochs,
        steps=schedule.steps_per_epoch, verbose=0)
    self._watchdog = watchdog or watchdog_lib.CollectiveWatchdog(
        timeout_s=None, num_workers=1)
    self._wall_clock = wall_clock or time_limits.WallClock()
    self._spikes = spike_policy or spikes.SpikePolicy()
    self._recovery_fn = recovery_fn or (lambda recovery: None)
    self._health = health_report
    self._checkpoint_due = False  # Agreed at the last boundary.
    self._first_loop_end_time = None
    self._stop_reason = None  # Set when training should end early.
    self._validate = True
    self._last_validation = {}

  @property
  def model(self) -> keras.Model:
    return self._trainer.model

  @property
  def eval_average(self):
    """The weight average evaluation and the export use, or None."""
    return self._trainer.eval_average

  @property
  def total_steps(self) -> int:
    return self._schedule.total_steps

  @property
  def has_validation(self) -> bool:
    return self._trainer.has_validation

  @property
  def global_step(self) -> int:
    return int(self._trainer.optimizer.iterations.numpy())

  def _save(self, *, epoch, step_in_epoch):
    # Never write NaN or Inf over good work.
    guards.check_variables(self.model.variables)
    start = time.perf_counter()
    path = self._checkpoint.save(epoch=epoch, step_in_epoch=step_in_epoch)
    self._wall_clock.saved(time.perf_counter() - start)
    return path

  def _train_epoch(self, epoch, step_in_epoch, throughput):
    schedule = self._schedule
    self._trainer.reset_train_metrics()
    progress = self._progress_fn(epoch + 1, schedule.num_epochs,
                                 schedule.steps_per_epoch)
    try:
      return self._train_loops(epoch, step_in_epoch, throughput, progress)
    finally:
      progress.close()

  def _train_loops(self, epoch, step_in_epoch, throughput, progress):
    schedule = self._schedule
    while step_in_epoch < schedule.epoch_length(epoch):
      num_steps = schedule.next_loop_length(global_step=self.global_step,
                                            step_in_epoch=step_in_epoch)
      first_examples = schedule.examples_seen(epoch, step_in_epoch)
      compiling = self._trainer.train_traces == 0
      start = time.perf_counter()
      first_step = self.global_step + 1
      last_step = first_step + num_steps - 1
      measure = self._health is not None and schedule.is_log_step(last_step)
      self._callbacks.on_train_batch_begin(first_step)
      what = f"training steps {first_step}-{last_step}"
      if compiling:
        # Nothing trained yet: a stop request during the trace exits at once.
        # An error in the trace is one of these steps' (the model's call).
        with errors.phase(what):
          self._trainer.trace_train()
        stop.check_now()
      stop.set_unsaved()
      with errors.phase(what), (
          self._watchdog.guard(what, armed=not compiling)):
        losses = self._trainer.train(num_steps, measure=measure)
      seconds = time.perf_counter() - start
      if self._health is not None:
        self._health.loop_done(
            num_steps=num_steps, timed_steps=self._trainer.last_timed_steps,
            input_seconds=self._trainer.last_input_seconds,
            seconds=None if compiling else seconds)
      step_in_epoch += num_steps
      if not self._spikes.recovers:
        # Checked every loop, and loops end at log steps: a NaN stops the run
        # within one logging interval, before any checkpoint holds it.
        guards.check_losses(losses, first_step=first_step,
                            last_step=self.global_step)
        self._spikes.check(losses, first_step=first_step,
                           last_step=self.global_step)
      examples_seen = schedule.examples_seen(epoch, step_in_epoch)
      if compiling:
        self._first_loop_end_time = time.time()
      else:
        throughput.add(examples=examples_seen - first_examples,
                       steps=num_steps, seconds=seconds)
      progress.update(step_in_epoch, None if compiling or seconds <= 0 else
                      (examples_seen - first_examples) / seconds)
      if self._spikes.recovers and self._recovered_from_spike(
          epoch, step_in_epoch, losses, first_step=first_step):
        continue  # The data position stays past the skipped batches.
      if schedule.is_log_step(self.global_step):
        self._log_interval(epoch, losses, examples_seen, *throughput.take(),
                           to_console=not progress.enabled)
      self._callbacks.on_train_batch_end(self.global_step, logs=dict(losses))
      # After a recovery the global step trails the data position by the
      # batches skipped: the run ends at the last batch, not at total_steps.
      at_run_end = (epoch + 1 == schedule.num_epochs and
                    step_in_epoch == schedule.epoch_length(epoch))
      if self._validate and (schedule.is_eval_step(self.global_step) or (
          at_run_end and schedule.eval_every_steps)):
        self._evaluate(epoch, step_in_epoch)
      if step_in_epoch == schedule.epoch_length(epoch):
        return step_in_epoch  # The epoch end (or the run's last step) saves.
      if self._agreed_stop(epoch, step_in_epoch):
        return step_in_epoch
      if schedule.is_checkpoint_step(self.global_step) or self._checkpoint_due:
        self._save(epoch=epoch, step_in_epoch=step_in_epoch)
    return step_in_epoch

  def _recovered_from_spike(self, epoch, step_in_epoch, losses, *,
                            first_step) -> bool:
    """With --recovery_max_trials: whether the workers agreed on a loss
    spike in the loop that just ran; if so, the run is rolled back here.

    Asked right after the loop, before anything reads the new weights (the
    log line, callbacks, validation, saves), in an agreement of its own:
    the usual one follows validation, whose early stopping it must see, and
    decides on the stop requests (a SIGTERM during the spike's loop is
    acted on at the next boundary, after the rollback was saved). The
    rollback restores the latest checkpoint (weights, optimizer and its
    step, the early-stopping state) and resets the epoch's training
    metrics, but leaves the data position where the loop ended: the
    iterator goes on with the batch after the spike's, so the batches from
    the checkpoint's position to the spike's are skipped, not replayed.
    The rolled-back state is saved at once with that position (over the
    checkpoint it came from, same step), so a resume skips them too.

    Raises:
      spikes.LossSpikeError: the recoveries are used up, or there is no
        checkpoint to roll back to.
    """
    spike_step = self.global_step
    reason = self._spikes.reason(losses)
    with self._watchdog.guard(f"the agreement at step {spike_step}"):
      agreed = self._preemption.agreed(spike=reason is not None)
    if not agreed.spike:
      return False
    # A worker whose own bound was not crossed rolls back on a peer's word.
    reason = reason or "seen by another worker"
    action = self._spikes.decide(
        has_checkpoint=self._checkpoint.has_checkpoint())
    if action is not spikes.Action.RECOVER:
      raise self._spikes.error(action, first_step=first_step,
                               last_step=spike_step, reason=reason)
    with errors.phase(f"rolling back from the loss spike at step "
                      f"{spike_step}"):
      position = self._checkpoint.restore_latest()
    self._trainer.reset_train_metrics()
    trial = self._spikes.recovered()
    skipped, first, last = spikes.skipped_window(
        steps_per_epoch=self._schedule.steps_per_epoch,
        checkpoint_position=(position.epoch, position.step_in_epoch),
        spike_position=(epoch, step_in_epoch))
    recovery = spikes.Recovery(
        spike_step=spike_step, rolled_back_to_step=self.global_step,
        batches_skipped=skipped, first_skipped=first, last_skipped=last,
        loss=losses.get("loss", float("nan")), reason=reason)
    self._log("%s", recovery.log_line(trial=trial,
                                      max_trials=self._spikes.max_trials))
    self._recovery_fn(recovery)
    self._save(epoch=epoch, step_in_epoch=step_in_epoch)
    return True

  def _agreed_stop(self, epoch, step_in_epoch, *, saved=False) -> bool:
    """Whether every worker agreed to stop here: on SIGTERM or at the time
    limit it saves (unless `saved`) and raises Preempted or
    TimeLimitReached; when training should end early it saves and returns
    True. Whether a time-based checkpoint is due is kept for the caller."""
    clock = self._wall_clock
    clock.boundary()
    with self._watchdog.guard(f"the agreement at step {self.global_step}"):
      agreed = self._preemption.agreed(
          self._stop_reason is not None or self.model.stop_training,
          out_of_time=clock.out_of_time(),
          checkpoint_due=clock.checkpoint_due())
    stop = agreed.stop
    self._checkpoint_due = agreed.checkpoint_due and not saved
    # Ending early wins over the time limit: the run is done either way.
    if agreed.preempted or (agreed.out_of_time and not stop):
      path = (self._checkpoint.latest if saved else
              self._save(epoch=epoch, step_in_epoch=step_in_epoch))
      if agreed.preempted:
        raise preemption.Preempted(
            path, self.global_step,
            signal_name=self._preemption.watcher.signal_name)
      self._log("Time limit: stopping at step %d with %.1f s of margin "
                "(longest loop interval %.1f s, longest save %.1f s)",
                self.global_step, clock.margin_s, clock.longest_interval,
                clock.longest_save)
      raise time_limits.TimeLimitReached(
          global_step=self.global_step, max_runtime_s=clock.max_runtime_s)
    if stop:
      self._stop_reason = self._stop_reason or (
          "a callback set model.stop_training")
      if not saved:
        self._save(epoch=epoch, step_in_epoch=step_in_epoch)
    return stop

  def _evaluate(self, epoch, step_in_epoch) -> dict:
    """A validation pass and what follows it (best model, early stopping).

    A stop request agreed during the pass abandons it between compiled
    calls: the trained position is saved without it and Preempted raised.
    At an epoch's end that position is the epoch's last step, so a resume
    runs the epoch's validation (and its save) first.
    """
    self._callbacks.on_test_begin()
    metrics = self.validate(stop_fn=self._stop_agreed_in_validation)
    if metrics is None:
      path = self._save(epoch=epoch, step_in_epoch=step_in_epoch)
      redone = (step_in_epoch == self._schedule.epoch_length(epoch) and
                not self._schedule.eval_every_steps)
      raise preemption.Preempted(
          path, self.global_step,
          signal_name=self._preemption.watcher.signal_name,
          note=(" before its validation, which the resume runs" if redone
                else ", leaving out its unfinished validation"))
    self._last_validation = metrics
    if metrics:
      # Validation summaries, the best model, the user's callbacks and early
      # stopping, in the list's order.
      self._callbacks.on_test_end(dict(metrics))
      reason = self._callback_stop_reason()
      if reason:
        self._stop_reason = reason
    if metrics and self._schedule.eval_every_steps:
      self._log("validation at step %d | %s", self.global_step,
                _fmt_metrics(metrics))
    return metrics

  def _callback_stop_reason(self) -> Optional[str]:
    """Why a callback that names its reason (early stopping) asked to stop;
    None when none did."""
    if not self.model.stop_training:
      return None
    return next((callback.stop_reason for callback in self._callbacks.callbacks
                 if getattr(callback, "stop_reason", None)), None)

  def _log_interval(self, epoch, losses, examples_seen, examples_per_second,
                    steps_per_second, *, to_console=True):
    if to_console and self._schedule.epoch_less:
      self._log("step %d/%d | loss %.4f | examples %d | examples/s %s | "
                "steps/s %s", self.global_step, self._schedule.total_steps,
                losses["loss"], examples_seen,
                _fmt(examples_per_second, ".0f"),
                _fmt(steps_per_second, ".1f"))
    elif to_console:
        self._log("step %d | epoch %d/%d | loss %.4f | examples %d | examples/s %s "
              "| steps/s %s", self.global_step, epoch + 1,
                self._schedule.num_epochs, losses["loss"], examples_seen,
                _fmt(examples_per_second, ".0f"),
                _fmt(steps_per_second, ".1f"))
    scalars = {**self._trainer.train_metric_results(),
               "loss": losses["loss"],
               "learning_rate": self._trainer.learning_rate()}
    if examples_per_second is not None:
      scalars["examples_per_second"] = examples_per_second
      scalars["steps_per_second"] = steps_per_second
    if self._health is not None:
      # Every worker: the workers' times are gathered by a collective.
      with self._watchdog.guard(
          f"gathering worker step times at step {self.global_step}"):
        scalars.update(self._health.take(self.global_step))
      self._summaries.write_histograms(
          "train", self._health.histograms(
              self.global_step, self.model.trainable_variables),
          self.global_step)
    self._summaries.write_scalars("train", scalars, self.global_step)

  def _stop_agreed_in_validation(self) -> bool:
    # Every worker asks at the same chunk boundaries: the answer is agreed.
    with self._watchdog.guard(f"the agreement at step {self.global_step}"):
      return self._preemption.agreed()[0]

  def validate(self, stop_fn=None) -> Optional[dict]:
    """One pass over the validation split; {} when there is none.

    Args:
      stop_fn: asked before each compiled call of `--steps_per_loop` steps;
        when it says stop, the pass is abandoned and None returned.
    """
    if not self._trainer.has_validation:
      return {}
    what = f"validating at step {self.global_step}"
    with errors.phase(what):
      return self._trainer.evaluate(
          chunk_steps=self._schedule.steps_per_loop, stop_fn=stop_fn,
          guard=lambda: self._watchdog.guard(
              what, armed=self._trainer.eval_traces > 0))

  def train(self, *, validate: bool = True) -> RunResult:
    """Trains from the latest checkpoint (if any) to the last epoch, or
    until early stopping or a callback ends it.

    Args:
      validate: run validation passes (every epoch, or every
        `eval_every_steps` steps and at the end).
    """
    self._validate = validate
    with errors.phase("restoring the latest checkpoint"):
      position = self._checkpoint.restore_latest()
    if position:
      epoch, step_in_epoch = self._resumed_position(position)
      if self._schedule.epoch_less:
        self._log("Resuming at step %d of %d", self.global_step,
                  self._schedule.total_steps)
      else:
        self._log("Resuming at step %d (epoch %d, step %d of %d)",
                  self.global_step, epoch + 1, step_in_epoch,
                  self._schedule.steps_per_epoch)
    else:
      epoch, step_in_epoch = 0, 0
    self.model.stop_training = False
    self._wall_clock.start_training()
    self._callbacks.on_train_begin()
    with self._preemption.watcher:
      result = self._run_epochs(epoch, step_in_epoch)
      # Every step is saved: a stop request from here on exits at once.
      stop.set_phase("after the last checkpoint")
      stop.check_now()
    self._callbacks.on_train_end(
        logs={**result.train_metrics, **_val_logs(result.validation_metrics)})
    return result

  def _resumed_position(self, position):
    """(epoch, step in epoch) to resume at. A run that ended at a smaller
    --train_steps saved the start of the next epoch; raised, it continues
    inside the epoch it ended in, from its global step."""
    steps_per_epoch = self._schedule.steps_per_epoch
    if (self._schedule.train_steps is not None and
        position.epoch * steps_per_epoch > self.global_step):
      return divmod(self.global_step, steps_per_epoch)
    return position.epoch, position.step_in_epoch

  def _run_epochs(self, epoch, step_in_epoch):
    num_epochs = self._schedule.num_epochs
    throughput = throughput_lib.Throughput()
    history = []
    train_metrics = {}
    if epoch < num_epochs:
      with errors.phase("building the training input pipeline"):
        self._trainer.start_training(epoch=epoch, step_in_epoch=step_in_epoch,
                                     num_epochs=num_epochs)
    while epoch < num_epochs and self._stop_reason is None:
      self._callbacks.on_epoch_begin(epoch)
      start = time.perf_counter()
      trained_to = self._train_epoch(epoch, step_in_epoch, throughput)
      train_seconds = time.perf_counter() - start
      train_metrics = self._trainer.train_metric_results()
      epoch_length = self._schedule.epoch_length(epoch)
      if self._stop_reason is not None and (
          epoch_length != trained_to):
        break  # Stopped inside the epoch, where it was saved.
      validation_metrics = {}
      if self._validate and not self._schedule.eval_every_steps:
        validation_metrics = self._evaluate(epoch, epoch_length)
      elif self._schedule.eval_every_steps:
        validation_metrics = self._last_validation
      epoch, step_in_epoch = epoch + 1, 0
      self._save(epoch=epoch, step_in_epoch=0)
      if self._schedule.epoch_less:
        self._log("training done at step %d | train %s | validation %s",
                  self.global_step, _fmt_metrics(train_metrics),
                  _fmt_metrics(validation_metrics) or "loss n/a")
      else:
        self._log("epoch %d/%d done at step %d | train %s | validation %s",
                  epoch, num_epochs, self.global_step,
                  _fmt_metrics(train_metrics),
                  _fmt_metrics(validation_metrics) or "loss n/a")
      # An epoch-less run is summarised by its step alone.
      history.append({**({} if self._schedule.epoch_less else
                         {"epoch": epoch}),
                      "global_step": self.global_step,
                      "train": train_metrics,
                      "validation": validation_metrics,
                      "train_seconds": train_seconds})
      self._callbacks.on_epoch_end(
          epoch - 1, logs={**train_metrics, **_val_logs(validation_metrics)})
      if epoch < num_epochs and self._agreed_stop(epoch, 0, saved=True):
        break
    if not history and self._stop_reason is None:
      if self._schedule.train_steps is not None:
        self._log("Already trained to step %d; nothing to do",
                  self._schedule.total_steps)
      else:
        self._log("Already trained for %d epochs; nothing to do",
                  num_epochs)
      self._last_validation = self.validate() if self._validate else {}
    if self._stop_reason is not None:
      self._log("Stopped early at step %d: %s", self.global_step,
                self._stop_reason)
    return RunResult(model=self.model, global_step=self.global_step,
                     epochs_completed=epoch, train_metrics=train_metrics,
                     validation_metrics=self._last_validation,
                     history=history,
                     first_loop_end_time=self._first_loop_end_time,
                     stopped_early=self._stop_reason,
                     num_replicas=self._trainer.strategy.num_replicas_in_sync,
                     num_workers=strategy_lib.num_workers(
                         self._trainer.strategy),
                     loop_calls=self._trainer.train_loop_calls)


class _NoProgress:
  """No progress bar (workers other than the chief, the Python API)."""

  enabled = False

  def __init__(self, *args):
    del args

  def update(self, *args):
    del args

  def close(self):
    pass


def _val_logs(metrics: dict) -> dict:
  """Validation metrics as Keras callbacks name them: `val_<name>`."""
  return {f"val_{name}": value for name, value in metrics.items()}


def _fmt_metrics(metrics: dict) -> str:
  """"loss 0.4178 accuracy 0.8882": loss first, then the rest by name."""
  names = sorted(metrics, key=lambda name: (name != "loss", name))
  return " ".join(f"{name} {metrics[name]:.4f}" for name in names)


def _fmt(value, spec=".4f"):
  return "n/a" if value is None else format(value, spec)
