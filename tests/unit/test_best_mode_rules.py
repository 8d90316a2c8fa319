"""--best_mode in both directions, the rule itself: BestModel and
EarlyStopping fed chosen sequences of values, with max, min and auto.

Every other selection test ranks by validation loss, where smaller is
better; a rule that kept the worst accuracy would pass them all.
tests/e2e/test_best_mode.py checks the same rule in real runs.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from dist_train.loop import early_stopping as early_stopping_lib
from dist_train.outputs import best as best_lib

# Scripted validation values, one per global step 1, 2, ...: the best
# accuracy (0.9) and the best loss (0.4) come at step 4, followed by worse
# values, a tie, a NaN, and in each case the worst value at another step.
ACCURACY = [0.5, 0.8, 0.7, 0.9, 0.6, 0.9, math.nan, 0.85]
LOSS = [0.9, 0.6, 0.7, 0.4, 0.8, 0.4, math.nan, 0.5]
BEST_STEP = 4


@pytest.mark.parametrize("metric,expected", [
    ("accuracy", "max"), ("digit_accuracy", "max"), ("token_accuracy", "max"),
    ("loss", "min"), ("ink_loss", "min"), ("perplexity", "min"),
    ("ink_mae", "min"), ("mse", "min"), ("top_error", "min")])
def test_auto_is_max_for_accuracies_and_min_for_losses(metric, expected):
  assert best_lib.resolve_mode(metric, "auto") == expected
  # An explicit mode is taken as given, whatever the name.
  opposite = {"max": "min", "min": "max"}[expected]
  assert best_lib.resolve_mode(metric, opposite) == opposite


def _tiny_model():
  inputs = keras.Input(shape=(1,))
  return keras.Model(inputs, keras.layers.Dense(1)(inputs))


def _stamp(model, step):
  """Weights that say which step they belong to."""
  model.set_weights([np.full((1, 1), step, np.float32),
                     np.full((1,), step, np.float32)])


def _restored_weights(path):
  """The model weights of a checkpoint (best/ckpt or a run's ckpt-N)."""
  model = _tiny_model()
  tf.train.Checkpoint(model=model).read(path).expect_partial()
  return model.get_weights()


@pytest.mark.parametrize("metric,mode,values,resolved", [
    ("accuracy", "max", ACCURACY, "max"),
    ("accuracy", "auto", ACCURACY, "max"),
    ("token_accuracy", "auto", ACCURACY, "max"),
    ("loss", "min", LOSS, "min"),
    ("loss", "auto", LOSS, "min"),
    ("perplexity", "auto", LOSS, "min")])
def test_best_model_keeps_the_best_of_a_scripted_sequence(
    tmp_path, metric, mode, values, resolved):
  best = best_lib.BestModel(str(tmp_path), metric=metric, mode=mode,
                            is_chief=True)
  assert best.mode == resolved
  model = _tiny_model()
  written = []
  for step, value in enumerate(values, start=1):
    _stamp(model, step)
    if best.update(global_step=step, metrics={metric: value, "other": 0.0},
                   model=model):
      written.append(step)
  # Written at each strict improvement only: not at the tie, the NaN or the
  # worse values after the best.
  assert written == [1, 2, 4]
  assert (best.value, best.step) == (values[BEST_STEP - 1], BEST_STEP)
  metrics = best_lib.read_metrics(str(tmp_path))
  assert metrics["metric"] == metric and metrics["mode"] == resolved
  assert metrics["value"] == values[BEST_STEP - 1]
  assert metrics["global_step"] == BEST_STEP
  # The weights of the best step, in the checkpoint and in model.keras.
  for weights in (_restored_weights(str(tmp_path / "best" / "ckpt")),
                  keras.saving.load_model(
                      str(tmp_path / "best" / "model.keras")).get_weights()):
    for array in weights:
      np.testing.assert_array_equal(array, np.full_like(array, BEST_STEP))


def test_a_resumed_best_model_in_max_mode_takes_only_a_higher_value(tmp_path):
  model = _tiny_model()
  first = best_lib.BestModel(str(tmp_path), metric="accuracy", mode="max",
                             is_chief=True)
  _stamp(model, 4)
  assert first.update(global_step=4, metrics={"accuracy": 0.9}, model=model)
  resumed = best_lib.BestModel(str(tmp_path), metric="accuracy", mode="auto",
                               is_chief=True)
  assert (resumed.value, resumed.step) == (0.9, 4)
  _stamp(model, 5)
  assert not resumed.update(global_step=5, metrics={"accuracy": 0.2},
                            model=model)
  assert best_lib.read_metrics(str(tmp_path))["global_step"] == 4
  _stamp(model, 6)
  assert resumed.update(global_step=6, metrics={"accuracy": 0.95},
                        model=model)
  assert best_lib.read_metrics(str(tmp_path))["global_step"] == 6


# Improvements at evaluations 1, 2 and 5; ties and smaller gains do not
# count. With a patience of 3 the run stops at evaluation 8 (the third
# without an improvement after evaluation 5), not at 7 and not at 9.
_PATIENCE_VALUES = [0.5, 0.6, 0.6, 0.55, 0.7, 0.65, math.nan, 0.7, 0.71]
_PATIENCE_WAITS = [0, 0, 1, 2, 0, 1, 2, 3]


@pytest.mark.parametrize("metric,mode,sign", [
    ("accuracy", "max", 1), ("accuracy", "auto", 1),
    ("loss", "min", -1), ("loss", "auto", -1)])
def test_early_stopping_stops_after_patience_evaluations_without_improvement(
    metric, mode, sign):
  """`sign` -1 mirrors the sequence for a metric where smaller is better."""
  stopping = early_stopping_lib.EarlyStopping(metric=metric, mode=mode,
                                              patience=3)
  assert stopping.mode == ("max" if sign == 1 else "min")
  stops, waits = [], []
  for value in _PATIENCE_VALUES:
    stops.append(stopping.update({metric: sign * value}))
    waits.append(int(stopping.wait.numpy()))
    if stops[-1]:
      break
  assert stops == [False] * 7 + [True]
  assert waits == _PATIENCE_WAITS
  assert float(stopping.best.numpy()) == sign * 0.7
  assert stopping.reason() == (
      f"validation {metric} has not improved by more than 0 for 3 "
      f"evaluations (best {sign * 0.7:.4f})")


def test_early_stopping_in_max_mode_needs_more_than_min_delta():
  stopping = early_stopping_lib.EarlyStopping(metric="accuracy", mode="max",
                                              patience=2, min_delta=0.05)
  # 0.54 is within 0.05 of 0.5 (a wait); 0.56 beats 0.5 by more (the new
  # best); 0.6 is within 0.05 of 0.56; 0.62 beats it; 0.66 and 0.6 do not.
  values = [0.5, 0.54, 0.56, 0.6, 0.62, 0.66, 0.6]
  stops = [stopping.update({"accuracy": value}) for value in values]
  assert stops == [False] * 6 + [True]
  assert float(stopping.best.numpy()) == 0.62
