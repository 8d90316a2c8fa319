"""--best_mode in both directions in real runs: the best model and early
stopping.

Every other selection test ranks by validation loss, where smaller is
better; a rule that kept the worst accuracy would pass them all.
tests/unit/test_best_mode_rules.py scripts the rule itself; here one real run
per mode, through the Python API, trains a task whose validation accuracy
peaks mid-run and then falls (tests/helpers/task_fixtures.py:
DriftingBoundary): best/ must hold the model of the peak, value, step and
weights, and early stopping on accuracy must stop exactly `patience`
evaluations after it.
"""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from dist_train.outputs import summaries
from tests.helpers import processes
from tests.helpers import task_fixtures

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
                               check=True, prewarmed=True)
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
