"""The outer loop's schedule of compiled loops."""

import pytest

from dist_train import controller


@pytest.mark.parametrize("global_step, step_in_epoch, expected", [
    (0, 0, 10),    # steps_per_loop bounds it.
    (35, 35, 5),   # The next log step (40) bounds it.
    (190, 93, 4),  # The epoch end (step 97 of the epoch) bounds it.
    (96, 96, 1),
])
def test_loops_end_at_log_steps_and_epoch_ends(global_step, step_in_epoch,
                                               expected):
  assert controller.next_loop_length(
      global_step=global_step, step_in_epoch=step_in_epoch,
      steps_per_epoch=97, steps_per_loop=10, log_every_steps=40) == expected


def test_loops_cover_an_epoch_exactly():
  step, lengths = 0, []
  while step < 37:
    n = controller.next_loop_length(global_step=step, step_in_epoch=step,
                                    steps_per_epoch=37, steps_per_loop=8,
                                    log_every_steps=10)
    lengths.append(n)
    step += n
  assert step == 37
  assert lengths == [8, 2, 8, 2, 8, 2, 7]
