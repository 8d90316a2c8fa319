"""--best_mode in both directions: the best model and early stopping.

Every other selection test ranks by validation loss, where smaller is
better; a rule that kept the worst accuracy would pass them all. Here the
rule itself is scripted (BestModel and EarlyStopping fed chosen sequences of
values, with max, min and auto), and one real run per mode, through the
Python API, trains a task whose validation accuracy peaks mid-run and then
falls (tests/helpers/task_fixtures.py: DriftingBoundary): best/ must hold the model
of the peak, value, step and weights, and early stopping on accuracy must
stop exactly `patience` evaluations after it.
"""

import json
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from dist_train.loop import early_stopping as early_stopping_lib
from dist_train.outputs import best as best_lib
from dist_train.outputs import summaries
from tests.helpers import processes
from tests.helpers import task_fixtures

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


# The real runs: one process, one strategy (1 CPU replica), four runs of
# DriftingBoundary: 200 training examples in global batches of 40 (5 steps
# an epoch), 6 epochs, a validation pass and a checkpoint every 2 steps.
_RUNS = {
    "accuracy_max": dict(best_metric="accuracy", best_mode="max",
                         early_stopping_patience=3),
    "accuracy_auto": dict(best_metric="accuracy", best_mode="auto"),
    "loss_min": dict(best_metric="loss", best_mode="min",
                     early_stopping_patience=3),
    "loss_auto": dict(best_metric="loss", best_mode="auto"),
}
_EVAL_EVERY = 2
_FINAL_STEP = 30
_SCRIPT = r"""
import json, sys
from dist_train import config as config_lib
from dist_train import train
from tests.helpers import task_fixtures

root, runs = sys.argv[1], json.loads(sys.argv[2])
common = dict(optimizer="sgd", learning_rate=0.05, epochs=6,
              global_batch_size=40, eval_every_steps=2,
              checkpoint_every_steps=2, keep_checkpoints=100,
              log_every_steps=1000, cpu_replicas=1, seed=0)
strategy, out = None, {}
for name, options in runs.items():
  config = config_lib.Config(model_dir=f"{root}/{name}", **common, **options)
  strategy = strategy or train.create_strategy(config)
  result = train.train_and_evaluate(
      config, task=task_fixtures.DriftingBoundary(), strategy=strategy)
  out[name] = {"global_step": result.global_step,
               "stopped_early": result.stopped_early}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("best_mode")
  result = processes.run_python(["-c", _SCRIPT, str(root), json.dumps(_RUNS)],
                               check=True)
  return root, json.loads(result.stdout.strip().splitlines()[-1])


def _validation(model_dir, metric):
  return summaries.read_scalars(os.path.join(model_dir, "validation"))[metric]


def _best_of(evaluations, mode):
  """The first evaluation with the best value: a later tie is no better."""
  better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
  best = evaluations[0]
  for evaluation in evaluations[1:]:
    if better(evaluation[1], best[1]):
      best = evaluation
  return best


def _model_weights(path):
  model = task_fixtures.DriftingBoundary().build_model()
  tf.train.Checkpoint(model=model).read(path).expect_partial()
  return model.get_weights()


@pytest.mark.parametrize("name", sorted(_RUNS))
def test_best_holds_the_model_of_the_best_evaluation(runs, name):
  root, _ = runs
  model_dir = str(root / name)
  metric = _RUNS[name]["best_metric"]
  mode = "max" if metric == "accuracy" else "min"
  evaluations = _validation(model_dir, metric)
  best_step, best_value = _best_of(evaluations, mode)
  worst = _best_of(evaluations, {"max": "min", "min": "max"}[mode])
  print(f"{name}: validation {metric} {[round(v, 4) for _, v in evaluations]}"
        f"; best {best_value:.4f} at step {best_step}")
  # The run is as designed: the best is neither the first nor the last
  # evaluation, the metric gets worse after it, and the worst value is at
  # another step (a reversed rule would keep that one).
  later = [value for step, value in evaluations if step > best_step]
  assert evaluations[0][0] < best_step < evaluations[-1][0], evaluations
  assert later and all(value != best_value for value in later)
  assert (max(later) < best_value if mode == "max"
          else min(later) > best_value), evaluations
  assert worst[0] != best_step

  with open(os.path.join(model_dir, "best", "metrics.json")) as f:
    written = json.load(f)
  assert written["metric"] == metric and written["mode"] == mode
  assert written["global_step"] == best_step
  # TensorBoard holds float32; the metric is a float32 result too.
  assert written["value"] == pytest.approx(best_value, rel=1e-7, abs=0)

  # best/ holds the weights of the checkpoint of that step, not later ones.
  best_weights = _model_weights(os.path.join(model_dir, "best", "ckpt"))
  checkpoints = os.path.join(model_dir, "checkpoints")
  at_best = _model_weights(os.path.join(checkpoints, f"ckpt-{best_step}"))
  last_step = evaluations[-1][0]
  at_last = _model_weights(os.path.join(checkpoints, f"ckpt-{last_step}"))
  exported = keras.saving.load_model(
      os.path.join(model_dir, "best", "model.keras")).get_weights()
  for best_array, at_best_array, exported_array, at_last_array in zip(
      best_weights, at_best, exported, at_last):
    np.testing.assert_array_equal(best_array, at_best_array)
    np.testing.assert_array_equal(exported_array, at_best_array)
    assert np.abs(best_array - at_last_array).max() > 1e-3


def test_auto_picks_the_same_best_as_the_explicit_mode(runs):
  root, _ = runs
  for explicit, auto in (("accuracy_max", "accuracy_auto"),
                         ("loss_min", "loss_auto")):
    with open(root / explicit / "best" / "metrics.json") as f:
      explicit_best = json.load(f)
    with open(root / auto / "best" / "metrics.json") as f:
      auto_best = json.load(f)
    assert auto_best == explicit_best, (explicit, auto)


@pytest.mark.parametrize("name", ["accuracy_max", "loss_min"])
def test_early_stopping_stops_patience_evaluations_after_the_best(runs, name):
  root, out = runs
  metric, patience = (_RUNS[name]["best_metric"],
                      _RUNS[name]["early_stopping_patience"])
  mode = "max" if metric == "accuracy" else "min"
  # The full trajectory (the auto run of the same metric trains to the end
  # with the same batches and weights); the stop is `patience` evaluations
  # after the best so far.
  full = _validation(str(root / f"{metric}_auto"), metric)
  assert full[-1][0] == _FINAL_STEP
  best_step, _ = _best_of(full, mode)
  stop_step = best_step + patience * _EVAL_EVERY
  print(f"{name}: best at step {best_step}, stopped at "
        f"{out[name]['global_step']} (patience {patience})")
  assert stop_step < _FINAL_STEP
  assert out[name]["global_step"] == stop_step
  assert out[name]["stopped_early"].startswith(
      f"validation {metric} has not improved by more than 0 for {patience} "
      "evaluations")
  stopped = _validation(str(root / name), metric)
  assert stopped == [item for item in full if item[0] <= stop_step]
