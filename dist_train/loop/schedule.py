"""Where the loop is in the run, and how long its next compiled call runs."""

import dataclasses
from typing import Optional

from dist_train.data import pipelines


@dataclasses.dataclass(frozen=True)
class LoopSchedule:
  """The run's shape: epochs of global steps, and the boundaries between
  compiled loops (log steps, checkpoint steps, epoch ends).

  The one place the loop learns how many steps an epoch has:
  `pipelines.num_batches` (a partial last batch counts), or `epoch_steps`
  when the workers agreed on it (each reads its own shard of a stream).
  With `profile_steps` (first, last), loops also end before step `first`
  and after step `last`, so that a profile covers exactly those steps.

  With `train_steps` (--train_steps) the run ends at that global step: the
  last epoch may end early (`epoch_length`), and a stream of unknown length
  (`num_examples` None, `epoch_less`) is one "epoch" of `train_steps` steps.
  """

  num_examples: Optional[int]
  global_batch_size: int
  num_epochs: int
  steps_per_loop: int
  log_every_steps: int
  checkpoint_every_steps: Optional[int] = None
  eval_every_steps: Optional[int] = None
  epoch_steps: Optional[int] = None
  profile_steps: tuple = ()
  train_steps: Optional[int] = None

  def __post_init__(self):
    for name in ("global_batch_size", "num_epochs", "steps_per_loop",
                 "log_every_steps", "train_steps", "num_examples"):
      value = getattr(self, name)
      if value is not None and value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    if self.num_examples is None and (self.train_steps is None or
                                      self.epoch_steps is None):
      raise ValueError("a stream of unknown length (num_examples None) needs "
                       "train_steps and epoch_steps")

  @property
  def epoch_less(self) -> bool:
    """Whether the run reads a stream of unknown length: no epochs, only
    steps, in its logs and summaries."""
    return self.num_examples is None

  @property
  def steps_per_epoch(self) -> int:
    if self.epoch_steps is not None:
      return self.epoch_steps
    return pipelines.num_batches(self.num_examples, self.global_batch_size)

  @property
  def total_steps(self) -> int:
    if self.train_steps is not None:
      return self.train_steps
    return self.num_epochs * self.steps_per_epoch

  def epoch_length(self, epoch: int) -> int:
    """Steps of epoch `epoch` that the run trains: all of them but in the
    epoch where --train_steps ends the run."""
    return max(0, min(self.steps_per_epoch,
                      self.total_steps - epoch * self.steps_per_epoch))

  def next_loop_length(self, *, global_step: int, step_in_epoch: int) -> int:
    """Steps to run in the next compiled call.

    A loop never crosses a log, checkpoint or evaluation boundary (a
    multiple of `log_every_steps`, `checkpoint_every_steps` or
    `eval_every_steps`), the end of the epoch or a profile boundary, so
    logging, checkpoints, evaluations, epoch ends and the profiler happen
    between calls.
    """
    to_epoch_end = min(self.steps_per_epoch - step_in_epoch,
                       self.total_steps - global_step)
    def to_next(every):
      return every - global_step % every if every else to_epoch_end
    # Profile boundaries: after step first - 1 and after step last.
    to_profile = [boundary - global_step for boundary in (
        self.profile_steps[0] - 1, self.profile_steps[1])
                  if boundary > global_step] if self.profile_steps else []
    return max(1, min(self.steps_per_loop, to_next(self.log_every_steps),
                      to_epoch_end, to_next(self.checkpoint_every_steps),
                      to_next(self.eval_every_steps), *to_profile))

  def is_log_step(self, global_step: int) -> bool:
    return global_step % self.log_every_steps == 0

  def is_checkpoint_step(self, global_step: int) -> bool:
    return bool(self.checkpoint_every_steps and
                global_step % self.checkpoint_every_steps == 0)

  def is_eval_step(self, global_step: int) -> bool:
    """Whether a validation pass follows this step: every
    `eval_every_steps`, and after the last step of the run."""
    if not self.eval_every_steps:
      return False
    return (global_step % self.eval_every_steps == 0 or
            global_step == self.total_steps)

  def examples_seen(self, epoch: int, step_in_epoch: int) -> int:
    """Training examples consumed before (epoch, step_in_epoch)."""
    if self.num_examples is None:  # Every global batch is whole.
      return (epoch * self.steps_per_epoch + step_in_epoch) * (
          self.global_batch_size)
    return epoch * self.num_examples + min(
        step_in_epoch * self.global_batch_size, self.num_examples)
