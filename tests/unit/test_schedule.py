"""The loop schedule: steps per epoch and where compiled loops end."""

import pytest

from dist_train.loop import schedule as schedule_lib


def _schedule(num_examples, steps_per_loop, log_every_steps, **kwargs):
  return schedule_lib.LoopSchedule(
      num_examples=num_examples, global_batch_size=1, num_epochs=3,
      steps_per_loop=steps_per_loop, log_every_steps=log_every_steps, **kwargs)


@pytest.mark.parametrize("global_step, step_in_epoch, expected", [
    (0, 0, 10),    # steps_per_loop bounds it.
    (35, 35, 5),   # The next log step (40) bounds it.
    (190, 93, 4),  # The epoch end (step 97 of the epoch) bounds it.
    (96, 96, 1),
])
def test_loops_end_at_log_steps_and_epoch_ends(global_step, step_in_epoch,
                                               expected):
  schedule = _schedule(97, steps_per_loop=10, log_every_steps=40)
  assert schedule.next_loop_length(
      global_step=global_step, step_in_epoch=step_in_epoch) == expected


def test_loops_end_at_checkpoint_steps():
  schedule = _schedule(97, steps_per_loop=10, log_every_steps=40,
                       checkpoint_every_steps=6)
  assert schedule.next_loop_length(global_step=0, step_in_epoch=0) == 6
  assert schedule.next_loop_length(global_step=10, step_in_epoch=10) == 2
  assert schedule.is_checkpoint_step(12) and not schedule.is_checkpoint_step(13)


def test_loops_cover_an_epoch_exactly():
  schedule = _schedule(37, steps_per_loop=8, log_every_steps=10)
  step, lengths = 0, []
  while step < 37:
    n = schedule.next_loop_length(global_step=step, step_in_epoch=step)
    lengths.append(n)
    step += n
  assert step == 37
  assert lengths == [8, 2, 8, 2, 8, 2, 7]


def test_steps_and_examples_count_a_partial_last_batch():
  schedule = schedule_lib.LoopSchedule(
      num_examples=700, global_batch_size=64, num_epochs=2, steps_per_loop=5,
      log_every_steps=5)
  assert schedule.steps_per_epoch == 11  # 10 full batches and one of 60.
  assert schedule.total_steps == 22
  assert schedule.examples_seen(epoch=0, step_in_epoch=10) == 640
  assert schedule.examples_seen(epoch=0, step_in_epoch=11) == 700
  assert schedule.examples_seen(epoch=1, step_in_epoch=1) == 764


def test_impossible_schedule_is_refused():
  with pytest.raises(ValueError, match="global_batch_size must be positive"):
    schedule_lib.LoopSchedule(num_examples=10, global_batch_size=0,
                              num_epochs=1, steps_per_loop=1,
                              log_every_steps=1)
