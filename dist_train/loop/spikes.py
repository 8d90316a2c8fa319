"""Loss spikes: what counts as one, and whether the run recovers from it.

A spike is a training loss above `--loss_upper_bound` or a NaN or Inf loss
term, seen at a loop boundary (the loss of a boundary is the mean over the
compiled loop's steps, so a spike is placed at the loop's last step). As the
PaLM paper reports doing, a run with `--recovery_max_trials=K` rolls back to
its latest checkpoint, skips the global batches from that checkpoint's
position in the data to the spike's (they are not replayed: the data
position moves past them while the global step goes back), and goes on; the
(K+1)-th spike, or a spike before the first checkpoint, ends the run with
EXIT_NON_FINITE as a run without recovery does. The decision is agreed by
every worker (loop/preemption.py). Nothing here runs TensorFlow: the
controller does the rollback.
"""

import dataclasses
import enum
import math
from typing import Optional

from dist_train import errors


class LossSpikeError(errors.DistTrainError):
  """A loss spike the run does not recover from; the message says where."""

  exit_code = errors.EXIT_NON_FINITE


class Action(enum.Enum):
  """What the outer loop does at an agreed spike."""

  RECOVER = "recover"  # Roll back to the latest checkpoint, skip, go on.
  GIVE_UP = "give_up"  # --recovery_max_trials used up: exit 3.
  NO_CHECKPOINT = "no_checkpoint"  # Nothing intact to roll back to: exit 3.


@dataclasses.dataclass(frozen=True)
class Recovery:
  """One recovery, as the log line and run.json's `recoveries` tell it.

  The global batches skipped are those of the data positions
  `first_skipped` to `last_skipped`; their number is `batches_skipped`.
  """

  spike_step: int
  rolled_back_to_step: int
  batches_skipped: int
  # (epoch, step in the epoch), both from 1 as the log lines count them.
  first_skipped: tuple
  last_skipped: tuple
  loss: float
  reason: str

  def as_record(self) -> dict:
    """For run.json: JSON has no NaN or Inf, so those are strings."""
    record = dataclasses.asdict(self)
    record["first_skipped"] = list(self.first_skipped)
    record["last_skipped"] = list(self.last_skipped)
    if not math.isfinite(self.loss):
      record["loss"] = str(self.loss)
    return record

  def log_line(self, *, trial: int, max_trials: int) -> str:
    return (f"Loss spike at step {self.spike_step} ({self.reason}): rolled "
            f"back to step {self.rolled_back_to_step} and skipped "
            f"{self.batches_skipped} global batches (epoch "
            f"{self.first_skipped[0]} step {self.first_skipped[1]} to epoch "
            f"{self.last_skipped[0]} step {self.last_skipped[1]}); recovery "
            f"{trial} of {max_trials}")


def skipped_window(*, steps_per_epoch: int, checkpoint_position: tuple,
                   spike_position: tuple) -> tuple:
  """(batches skipped, first skipped, last skipped): the global batches after
  the checkpoint's data position up to and including the spike's.

  Positions are (epoch from 0, steps done in it), as checkpoints keep them;
  the skipped ones are returned as (epoch, step in the epoch), both from 1.
  The count is taken on data positions, not global steps: after an earlier
  recovery the two differ by the batches it skipped.
  """
  begin = checkpoint_position[0] * steps_per_epoch + checkpoint_position[1]
  end = spike_position[0] * steps_per_epoch + spike_position[1]
  if end <= begin:
    raise ValueError(f"the spike's data position {spike_position} is not "
                     f"after the checkpoint's {checkpoint_position}")
  def position(index):  # index: batches consumed before this one.
    return (index // steps_per_epoch + 1, index % steps_per_epoch + 1)
  return end - begin, position(begin), position(end - 1)


class SpikePolicy:
  """The rule: what is a spike, and what to do about an agreed one."""

  def __init__(self, *, loss_upper_bound: Optional[float] = None,
               max_trials: int = 0):
    """Creates the policy.

    Args:
      loss_upper_bound: a training loss above it is a spike; None: only a
        non-finite loss is.
      max_trials: recoveries allowed in this process; 0: none (exit 3).

    Raises:
      ValueError: naming a bound that is not finite and positive, or a
        negative `max_trials`.
    """
    if loss_upper_bound is not None and not (
        math.isfinite(loss_upper_bound) and loss_upper_bound > 0):
      raise ValueError("loss_upper_bound must be a finite number above 0, "
                       f"got {loss_upper_bound}")
    if max_trials < 0:
      raise ValueError(f"max_trials must be non-negative, got {max_trials}")
    self.loss_upper_bound = loss_upper_bound
    self.max_trials = max_trials
    self.trials = 0  # Recoveries made so far.

  @property
  def recovers(self) -> bool:
    """Whether a spike is agreed and recovered from (else it exits 3 at
    once, as a NaN always did)."""
    return self.max_trials > 0

  def reason(self, losses: dict) -> Optional[str]:
    """Why the boundary's losses are a spike ("loss=nan", "loss 812.5 above
    --loss_upper_bound=100"), or None when they are not.

    Args:
      losses: term name -> mean over the loop's steps; `loss` is the
        objective.
    """
    bad = [name for name, value in losses.items() if not math.isfinite(value)]
    if bad:
      return ", ".join(f"{name}={losses[name]}" for name in bad)
    loss = losses.get("loss")
    if (self.loss_upper_bound is not None and loss is not None and
        loss > self.loss_upper_bound):
      return (f"loss {loss:.6g} above "
              f"--loss_upper_bound={self.loss_upper_bound:g}")
    return None

  def check(self, losses: dict, *, first_step: int, last_step: int) -> None:
    """Without recovery: raises LossSpikeError (exit 3) at a loss above the
    bound; the caller checks for NaN first (guards.check_losses)."""
    reason = self.reason(losses)
    if reason:
      raise LossSpikeError(
          f"loss spike in steps {first_step}-{last_step}: {reason}; no "
          "checkpoint of these steps was written (--recovery_max_trials "
          "recovers from it)")

  def decide(self, *, has_checkpoint: bool) -> Action:
    """What to do at an agreed spike: give up once `max_trials` recoveries
    were made, or when there is no checkpoint to roll back to (a spike
    before the first save: the run's initial state is not kept)."""
    if self.trials >= self.max_trials:
      return Action.GIVE_UP
    if not has_checkpoint:
      return Action.NO_CHECKPOINT
    return Action.RECOVER

  def recovered(self) -> int:
    """Counts a recovery made; returns its number, from 1."""
    self.trials += 1
    return self.trials

  def error(self, action: Action, *, first_step: int, last_step: int,
            reason: str) -> LossSpikeError:
    """The one-line error of a spike the run gives up on."""
    where = f"loss spike in steps {first_step}-{last_step}: {reason}"
    if action is Action.NO_CHECKPOINT:
      return LossSpikeError(
          f"{where}; no checkpoint to roll back to (the spike came before "
          "the first one; --checkpoint_every_steps saves sooner)")
    return LossSpikeError(
        f"{where}; gave up after {self.trials} "
        f"{'recovery' if self.trials == 1 else 'recoveries'} "
        f"(--recovery_max_trials={self.max_trials}); no checkpoint of these "
        "steps was written")
