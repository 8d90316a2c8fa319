"""After each validation pass: summaries, the best model, early stopping and
the callbacks that watch evaluations."""

from typing import Callable, Optional

from dist_train.loop import early_stopping as early_stopping_lib
from dist_train.outputs import best as best_lib
from dist_train.outputs import summaries as summaries_lib


class Selection:
  """Decides what an evaluation means for the run.

  Args:
    summary_writers: writes the `validation` scalars.
    best: keeps <model_dir>/best/ (None: no --best_metric).
    early_stopping: stops a run that stopped improving (None: no patience).
    callbacks: a keras.callbacks.CallbackList (`on_test_end`).
    log: `logging.info`-like; a no-op off the chief.
  """

  def __init__(self, *, summary_writers: summaries_lib.SummaryWriters,
               best: Optional[best_lib.BestModel] = None,
               early_stopping: Optional[
                   early_stopping_lib.EarlyStopping] = None,
               callbacks=None, log: Callable[..., None] = lambda *a: None):
    self._summaries = summary_writers
    self._best = best
    self.early_stopping = early_stopping
    self._callbacks = callbacks
    self._log = log

  def after_validation(self, *, global_step: int, metrics: dict,
                       model) -> Optional[str]:
    """Records one evaluation; returns why training should stop, or None."""
    if not metrics:
      return None
    self._summaries.write_scalars("validation", metrics, global_step)
    if self._best is not None:
      self._best.update(global_step=global_step, metrics=metrics, model=model)
    if self._callbacks is not None:
      self._callbacks.on_test_end(dict(metrics))
    if self.early_stopping is not None and self.early_stopping.update(metrics):
      return self.early_stopping.reason()
    return None
