"""Optimizers and learning-rate schedules."""

import math

import keras
import pytest

from dist_train import config as config_lib
from dist_train.loop import optimizers


def _config(**changes):
  return config_lib.Config(model_dir="/tmp/unused", learning_rate=0.1,
                           **changes)


def _schedule(config, total_steps):
  return optimizers.create_learning_rate(
      kind=config.lr_schedule, base_learning_rate=config.learning_rate,
      total_steps=total_steps, warmup_steps=config.warmup_steps,
      boundaries=config.lr_boundaries, decay_factor=config.lr_decay_factor)


def _rates(config, steps, total_steps=100):
  schedule = _schedule(config, total_steps)
  return [float(schedule(step)) for step in steps]


def test_constant():
  assert _rates(_config(), [0, 50, 99]) == pytest.approx([0.1] * 3)


def test_warmup_then_constant():
  assert _rates(_config(warmup_steps=4), [0, 1, 3, 4, 50]) == pytest.approx(
      [0.025, 0.05, 0.1, 0.1, 0.1])


def test_cosine_with_warmup():
  rates = _rates(_config(lr_schedule="cosine", warmup_steps=10),
                 [0, 9, 10, 55, 100])
  assert rates == pytest.approx(
      [0.01, 0.1, 0.1, 0.1 * 0.5 * (1 + math.cos(math.pi * 0.5)), 0.0],
      abs=1e-7)


def test_step_default_boundaries_at_half_and_three_quarters():
  assert _rates(_config(lr_schedule="step"), [0, 49, 50, 74, 75, 99]) == (
      pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001]))


def test_step_given_boundaries_and_factor():
  config = _config(lr_schedule="step", lr_boundaries=["3", "6"],
                   lr_decay_factor=0.5)
  assert _rates(config, [2, 3, 6]) == pytest.approx([0.1, 0.05, 0.025])


@pytest.mark.parametrize("name, cls", [
    ("sgd", keras.optimizers.SGD), ("momentum", keras.optimizers.SGD),
    ("adam", keras.optimizers.Adam), ("adamw", keras.optimizers.AdamW)])
def test_optimizer_kinds(name, cls):
  optimizer = optimizers.create_optimizer(name, 0.1)
  assert type(optimizer) is cls  # pylint: disable=unidiomatic-typecheck
  if name == "momentum":
    assert optimizer.momentum == pytest.approx(0.9)
  if name == "adamw":
    assert optimizer.weight_decay == pytest.approx(0.004)


def test_schedule_round_trips_through_its_config():
  schedule = _schedule(_config(lr_schedule="cosine", warmup_steps=3), 20)
  again = optimizers.LearningRateSchedule.from_config(schedule.get_config())
  assert float(again(7)) == pytest.approx(float(schedule(7)))
