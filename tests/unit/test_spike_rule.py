"""The loss-spike rule (dist_train/loop/spikes.py): what a spike is, when the
run recovers or gives up, which batches a recovery skips; and the flags.

The runs that recover are in tests/e2e/test_spike_recovery.py.
"""

import math

import pytest

from dist_train import config as config_lib
from dist_train.loop import spikes
from dist_train.outputs import run_record
from tests.unit import test_flag_errors


def test_a_loss_above_the_bound_is_a_spike_and_the_bound_itself_is_not():
  policy = spikes.SpikePolicy(loss_upper_bound=100.0, max_trials=1)
  assert policy.reason({"loss": 99.5, "cross_entropy": 99.5}) is None
  assert policy.reason({"loss": 100.0}) is None
  assert policy.reason({"loss": 100.01}) == (
      "loss 100.01 above --loss_upper_bound=100")
  # Only the objective is bounded: a large term under a small total is not.
  assert policy.reason({"loss": 50.0, "cross_entropy": 150.0,
                        "regularization": -100.0}) is None


def test_every_non_finite_term_is_a_spike_and_is_named():
  policy = spikes.SpikePolicy(max_trials=1)  # No bound: only NaN and Inf.
  assert policy.reason({"loss": 1e30}) is None
  assert policy.reason({"loss": math.nan, "cross_entropy": 2.0,
                        "add_loss": math.inf}) == "loss=nan, add_loss=inf"
  bounded = spikes.SpikePolicy(loss_upper_bound=10.0)
  assert bounded.reason({"loss": 1.0, "regularization": -math.inf}) == (
      "regularization=-inf")


def test_without_recovery_a_loss_above_the_bound_exits_3():
  policy = spikes.SpikePolicy(loss_upper_bound=10.0)
  assert not policy.recovers
  policy.check({"loss": 10.0}, first_step=1, last_step=4)
  with pytest.raises(spikes.LossSpikeError) as raised:
    policy.check({"loss": 12.5}, first_step=5, last_step=8)
  assert raised.value.exit_code == 3
  assert str(raised.value) == (
      "loss spike in steps 5-8: loss 12.5 above --loss_upper_bound=10; no "
      "checkpoint of these steps was written (--recovery_max_trials "
      "recovers from it)")


def test_recoveries_stop_after_max_trials():
  policy = spikes.SpikePolicy(loss_upper_bound=10.0, max_trials=2)
  assert policy.recovers
  assert policy.decide(has_checkpoint=True) is spikes.Action.RECOVER
  assert policy.recovered() == 1
  assert policy.decide(has_checkpoint=True) is spikes.Action.RECOVER
  assert policy.recovered() == 2
  assert policy.decide(has_checkpoint=True) is spikes.Action.GIVE_UP
  error = policy.error(spikes.Action.GIVE_UP, first_step=7, last_step=8,
                       reason="loss=nan")
  assert error.exit_code == 3
  assert str(error) == (
      "loss spike in steps 7-8: loss=nan; gave up after 2 recoveries "
      "(--recovery_max_trials=2); no checkpoint of these steps was written")
  assert spikes.SpikePolicy(max_trials=0).decide(
      has_checkpoint=True) is spikes.Action.GIVE_UP


def test_a_spike_before_the_first_checkpoint_exits_3():
  policy = spikes.SpikePolicy(max_trials=3)
  assert policy.decide(has_checkpoint=False) is spikes.Action.NO_CHECKPOINT
  error = policy.error(spikes.Action.NO_CHECKPOINT, first_step=1,
                       last_step=2, reason="loss=inf")
  assert error.exit_code == 3
  assert str(error).startswith(
      "loss spike in steps 1-2: loss=inf; no checkpoint to roll back to")


@pytest.mark.parametrize("checkpoint, spike, expected", [
    # The checkpoint of step 4, the spike seen at step 8: steps 5-8 skipped.
    ((0, 4), (0, 8), (4, (1, 5), (1, 8))),
    # At an epoch end the checkpoint is (next epoch, 0).
    ((1, 0), (1, 2), (2, (2, 1), (2, 2))),
    # A checkpoint of an earlier epoch (--on_corrupt_checkpoint=previous).
    ((0, 10), (1, 2), (4, (1, 11), (2, 2))),
    # The last batch of the epoch.
    ((0, 8), (0, 12), (4, (1, 9), (1, 12))),
])
def test_the_skipped_window_is_counted_on_data_positions(checkpoint, spike,
                                                         expected):
  assert spikes.skipped_window(steps_per_epoch=12,
                               checkpoint_position=checkpoint,
                               spike_position=spike) == expected


def test_a_spike_not_after_the_checkpoint_is_refused():
  with pytest.raises(ValueError, match=r"\(0, 4\) is not after"):
    spikes.skipped_window(steps_per_epoch=12, checkpoint_position=(0, 4),
                          spike_position=(0, 4))


def test_a_recovery_is_one_log_line_and_a_json_record():
  recovery = spikes.Recovery(
      spike_step=8, rolled_back_to_step=4, batches_skipped=4,
      first_skipped=(1, 5), last_skipped=(1, 8), loss=math.nan,
      reason="loss=nan")
  assert recovery.log_line(trial=1, max_trials=2) == (
      "Loss spike at step 8 (loss=nan): rolled back to step 4 and skipped 4 "
      "global batches (epoch 1 step 5 to epoch 1 step 8); recovery 1 of 2")
  assert recovery.as_record() == {
      "spike_step": 8, "rolled_back_to_step": 4, "batches_skipped": 4,
      "first_skipped": [1, 5], "last_skipped": [1, 8], "loss": "nan",
      "reason": "loss=nan"}


@pytest.mark.parametrize("kwargs, message", [
    ({"loss_upper_bound": 0.0}, "loss_upper_bound must be a finite number"),
    ({"loss_upper_bound": math.inf}, "loss_upper_bound must be a finite"),
    ({"max_trials": -1}, "max_trials must be non-negative, got -1"),
])
def test_the_policy_refuses_impossible_values(kwargs, message):
  with pytest.raises(ValueError, match=message):
    spikes.SpikePolicy(**kwargs)


@pytest.mark.parametrize("flag, message", [
    ("--loss_upper_bound=0",
     "--loss_upper_bound must be a finite number above 0, got 0.0"),
    ("--loss_upper_bound=-3",
     "--loss_upper_bound must be a finite number above 0, got -3.0"),
    ("--loss_upper_bound=nan",
     "--loss_upper_bound must be a finite number above 0, got nan"),
    ("--loss_upper_bound=inf",
     "--loss_upper_bound must be a finite number above 0, got inf"),
    ("--recovery_max_trials=-1",
     "--recovery_max_trials must be non-negative, got -1"),
])
def test_bad_recovery_flags_give_one_line(tmp_path, capsys, monkeypatch,
                                          flag, message):
  code, lines = test_flag_errors.cli_error(
      capsys, monkeypatch, test_flag_errors.CPU_TEST_FLAGS,
      f"--model_dir={tmp_path / 'run'}", flag)
  assert code == 1
  assert lines == [f"dist_train: error: {message}"]


def test_the_recovery_flags_do_not_define_the_run():
  """They change nothing in a run without a spike: a resume may change them."""
  earlier = config_lib.Config(model_dir="/tmp/run")
  config = earlier.replace(loss_upper_bound=50.0, recovery_max_trials=3)
  config_lib.validate(config)
  refused, accepted = run_record.changes(earlier, config)
  assert refused == []
  assert accepted == ["--loss_upper_bound: unset -> 50.0",
                      "--recovery_max_trials: 0 -> 3"]
