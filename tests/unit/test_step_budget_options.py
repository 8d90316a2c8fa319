"""--train_steps and --validation_steps: their checks, their place in the run
record, and the loop schedule they make."""

import pytest

from dist_train import config as config_lib
from dist_train.loop import schedule as schedule_lib
from dist_train.outputs import run_record


def _config(**changes):
  return config_lib.Config(model_dir="/tmp/unused_model_dir", **changes)


@pytest.mark.parametrize("name", ["train_steps", "validation_steps"])
@pytest.mark.parametrize("value", [0, -3])
def test_a_step_budget_must_be_positive(name, value):
  with pytest.raises(config_lib.ConfigError) as raised:
    _config(**{name: value})
  assert str(raised.value) == f"--{name} must be positive, got {value}"


def test_train_steps_defines_the_run_and_validation_steps_does_not():
  assert "train_steps" in config_lib.RUN_DEFINING_OPTIONS
  assert "validation_steps" not in config_lib.RUN_DEFINING_OPTIONS
  refused, accepted = run_record.changes(
      _config(train_steps=100, validation_steps=5),
      _config(train_steps=200, validation_steps=7))
  assert refused == ["--train_steps: 100 -> 200"]
  assert accepted == ["--validation_steps: 5 -> 7"]


def _schedule(**kwargs):
  settings = dict(num_examples=47, global_batch_size=10, num_epochs=3,
                  steps_per_loop=4, log_every_steps=100)
  settings.update(kwargs)
  return schedule_lib.LoopSchedule(**settings)


def test_train_steps_end_the_run_inside_an_epoch():
  # 47 examples in batches of 10: 5 steps an epoch; 13 steps end in the 3rd.
  schedule = _schedule(train_steps=13)
  assert schedule.total_steps == 13
  assert schedule.steps_per_epoch == 5
  assert [schedule.epoch_length(e) for e in range(4)] == [5, 5, 3, 0]
  # The last loop stops at step 13, not at the epoch's end (15).
  assert schedule.next_loop_length(global_step=10, step_in_epoch=0) == 3
  assert schedule.next_loop_length(global_step=11, step_in_epoch=1) == 2
  assert _schedule().next_loop_length(global_step=10, step_in_epoch=0) == 4
  assert _schedule().total_steps == 15


def test_validation_follows_the_last_step_of_train_steps():
  schedule = _schedule(train_steps=13, eval_every_steps=4)
  assert [s for s in range(1, 16) if schedule.is_eval_step(s)] == [4, 8, 12,
                                                                  13]


def test_an_epoch_less_schedule_counts_steps_only():
  schedule = _schedule(num_examples=None, num_epochs=1, epoch_steps=1000,
                       train_steps=1000)
  assert schedule.epoch_less
  assert schedule.total_steps == 1000
  assert schedule.epoch_length(0) == 1000
  assert schedule.examples_seen(0, 7) == 70
  assert schedule.next_loop_length(global_step=998, step_in_epoch=998) == 2
  assert not _schedule().epoch_less


def test_a_stream_of_unknown_length_needs_train_steps():
  with pytest.raises(ValueError, match="needs train_steps"):
    _schedule(num_examples=None, epoch_steps=10)
