"""The run's own hooks, as Keras callbacks on the one list the Controller
calls (with the user's): ownership checks, the read report, the profiler,
validation summaries, the best model and early stopping.

The Controller calls the list at loop boundaries with the global step as
the batch number: on_train_batch_begin(first step of the loop),
on_train_batch_end(last step), on_epoch_begin/end, on_test_begin/end
around each validation pass (on_test_end with the validation metrics) and
on_train_begin/end. A callback that sets `model.stop_training` ends the run
at the next loop boundary, agreed across workers; one with a `stop_reason`
names why.
"""

from typing import Callable, Optional

from absl import logging
import keras

from dist_train.loop import early_stopping as early_stopping_lib
from dist_train.loop import ema as ema_lib
from dist_train.outputs import best as best_lib
from dist_train.outputs import profiler as profiler_lib
from dist_train.outputs import summaries as summaries_lib

GlobalStepFn = Callable[[], int]


class BoundaryCheck(keras.callbacks.Callback):
  """Runs `check()` at the end of each compiled loop; it raises to stop the
  run (the model_dir ownership check does)."""

  def __init__(self, check: Callable[[], None]):
    super().__init__()
    self._check = check

  def on_train_batch_end(self, batch, logs=None):
    self._check()


class AtTrainBegin(keras.callbacks.Callback):
  """Calls `fn` once training is about to start: after the latest checkpoint
  restored, so that a run refused or failing before that (a damaged
  checkpoint, a changed model) writes nothing into its model_dir."""

  def __init__(self, fn: Callable[[], None]):
    super().__init__()
    self._fn = fn

  def on_train_begin(self, logs=None):
    self._fn()


class ReadReport(keras.callbacks.Callback):
  """Logs how many training examples this worker read in each epoch (and
  in the part of one a run stopped in), on every worker."""

  def __init__(self, *, take_read_count: Callable[[], int],
               worker_index: int):
    super().__init__()
    self._take_read_count = take_read_count
    self._worker_index = worker_index

  def on_epoch_end(self, epoch, logs=None):
    self._report()

  def on_train_end(self, logs=None):
    count = self._take_read_count()
    if count:  # Read since the last epoch's end: the run stopped inside one.
      self._report(count)

  def _report(self, count=None):
    logging.info("worker %d read %d training examples", self._worker_index,
                 self._take_read_count() if count is None else count)


class ProfileSteps(keras.callbacks.Callback):
  """Traces the profiler's steps: starts it before the loop of its first
  step, stops it after the loop of its last (the schedule ends loops
  there), and at the end of the run."""

  def __init__(self, profiler: profiler_lib.StepProfiler):
    super().__init__()
    self._profiler = profiler

  def on_train_batch_begin(self, batch, logs=None):
    self._profiler.start_at(batch)

  def on_train_batch_end(self, batch, logs=None):
    self._profiler.stop_after(batch)

  def on_train_end(self, logs=None):
    self._profiler.close()


class ValidationSummaries(keras.callbacks.Callback):
  """Writes each evaluation's metrics as the `validation` scalars."""

  def __init__(self, *, summary_writers: summaries_lib.SummaryWriters,
               global_step_fn: GlobalStepFn):
    super().__init__()
    self._summaries = summary_writers
    self._global_step_fn = global_step_fn

  def on_test_end(self, logs=None):
    self._summaries.write_scalars("validation", logs, self._global_step_fn())


class KeepBest(keras.callbacks.Callback):
  """Keeps <model_dir>/best/: the model of the best evaluation so far (with
  `average`, a loop.ema.WeightAverage, the averaged weights it evaluated)."""

  def __init__(self, *, best: best_lib.BestModel,
               global_step_fn: GlobalStepFn, average=None):
    super().__init__()
    self._best = best
    self._global_step_fn = global_step_fn
    self._average = average

  def on_test_end(self, logs=None):
    with ema_lib.evaluation_weights(self._average):
      self._best.update(global_step=self._global_step_fn(), metrics=logs,
                        model=self.model)


class StopWhenNotImproving(keras.callbacks.Callback):
  """Early stopping: sets `model.stop_training` once the validation metric
  has not improved for `patience` evaluations. Every worker computes the
  same metrics, so every worker asks at the same step."""

  def __init__(self, early_stopping: early_stopping_lib.EarlyStopping):
    super().__init__()
    self.early_stopping = early_stopping
    self.stop_reason: Optional[str] = None

  def on_train_begin(self, logs=None):
    self.stop_reason = None

  def on_test_end(self, logs=None):
    if self.early_stopping.update(logs):
      self.stop_reason = self.early_stopping.reason()
      self.model.stop_training = True
