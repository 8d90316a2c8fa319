"""The Python API: RunResult's history and epoch count across a resumed run,
per-epoch training metrics, and train.evaluate."""

import json
import os

import pytest

from tests.helpers import processes

# One process, one strategy (2 logical CPU replicas), four runs: 3 epochs
# straight; 2 epochs, then resumed to 3; then train.evaluate of the latter.
# 256 examples in batches of 32: 8 steps an epoch.
_SCRIPT = r"""
import json, sys
from dist_train import config as config_lib
from dist_train import train

root = sys.argv[1]
common = dict(dataset="synthetic", num_train_examples=256,
              num_validation_examples=128, global_batch_size=32,
              learning_rate=0.05, log_every_steps=4, steps_per_loop=4,
              cpu_replicas=2, seed=1)
def config(name, epochs):
  return config_lib.Config(model_dir=f"{root}/{name}", epochs=epochs, **common)
strategy = train.create_strategy(config("straight", 3))

def run(name, epochs):
  result = train.train_and_evaluate(config(name, epochs), strategy=strategy)
  return {"global_step": result.global_step,
          "epochs_completed": result.epochs_completed,
          "train_metrics": result.train_metrics,
          "validation_metrics": result.validation_metrics,
          "history": result.history}

out = {"straight": run("straight", 3), "first": run("resumed", 2),
       "resumed": run("resumed", 3)}
out["evaluate"] = train.evaluate(config("resumed", 3), strategy=strategy)
print(json.dumps(out))
"""
_STEPS_PER_EPOCH = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("api")
  result = processes.run_python(["-c", _SCRIPT, str(root)], check=True, prewarmed=True)
  return root, json.loads(result.stdout.strip().splitlines()[-1])


def _epochs(run):
  return [entry["epoch"] for entry in run["history"]]


def test_history_covers_this_process_and_epochs_completed_counts_all(runs):
  _, out = runs
  first, resumed = out["first"], out["resumed"]
  assert _epochs(first) == [1, 2]
  assert (first["epochs_completed"], first["global_step"]) == (
      2, 2 * _STEPS_PER_EPOCH)
  assert _epochs(resumed) == [3]  # Epochs 1-2 ran in the first run.
  assert (resumed["epochs_completed"], resumed["global_step"]) == (
      3, 3 * _STEPS_PER_EPOCH)
  assert resumed["history"][-1]["train"] == resumed["train_metrics"]
  assert resumed["history"][-1]["validation"] == resumed["validation_metrics"]
  assert _epochs(out["straight"]) == [1, 2, 3]


def test_training_metrics_are_reset_every_epoch(runs):
  """The resumed run's epoch 3 starts from fresh metrics; the straight run's
  epoch 3 (same weights, same batches) must report the same values, not a
  running mean over its 3 epochs."""
  _, out = runs
  straight = [entry["train"] for entry in out["straight"]["history"]]
  resumed = out["resumed"]["history"][0]["train"]
  for name in ("loss", "accuracy"):
    assert straight[2][name] == pytest.approx(resumed[name], abs=1e-5), name
    running_mean = (straight[0][name] + straight[1][name] + resumed[name]) / 3
    # Far enough apart that a running mean would be caught.
    assert abs(running_mean - resumed[name]) > 0.01, (name, straight)


def test_evaluate_returns_and_writes_the_latest_checkpoints_metrics(runs):
  root, out = runs
  results, resumed = out["evaluate"], out["resumed"]
  assert os.path.basename(results["checkpoint"]) == (
      f"ckpt-{3 * _STEPS_PER_EPOCH}")
  assert results["global_step"] == 3 * _STEPS_PER_EPOCH
  for name in ("loss", "accuracy"):
    assert results[name] == pytest.approx(resumed["validation_metrics"][name],
                                          abs=1e-6), name
  with open(root / "resumed" / "eval_results.json") as f:
    assert json.load(f) == results


# A task that does not subclass tasks.Task: four methods and nothing else.
_DUCK_TYPED_SCRIPT = r"""
import json, sys
import keras
import numpy as np
import tensorflow as tf
from dist_train import config as config_lib
from dist_train import train

class Blobs:
  def build_model(self):
    return keras.Sequential([keras.Input([2]), keras.layers.Dense(3)])

  def build_dataset(self, split):
    rng = np.random.default_rng(0 if split == "train" else 1)
    labels = rng.integers(0, 3, 96).astype(np.int32)
    points = (rng.normal(size=[96, 2]) +
              3 * np.eye(3, 2)[labels]).astype(np.float32)
    return tf.data.Dataset.from_tensor_slices((points, labels))

  def loss(self, labels, outputs):
    return keras.losses.sparse_categorical_crossentropy(
        labels, outputs, from_logits=True)

  def metrics(self):
    return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]

task = Blobs()
config = config_lib.Config(model_dir=sys.argv[1], optimizer="adam",
                           learning_rate=0.05, epochs=10, global_batch_size=32,
                           cpu_replicas=2, seed=1)
result = train.train_and_evaluate(config, task=task)
print(json.dumps({"global_step": result.global_step,
                  "validation_metrics": result.validation_metrics,
                  "task_attributes": sorted(vars(task))}))
"""


def test_a_task_that_does_not_subclass_task_trains(tmp_path):
  """Four methods make a task: the optional hooks (validate_batch,
  train_step, loss_weights, ...) are optional in fact, and dist_train
  writes nothing into the object (no model, no name)."""
  result = processes.run_python(
      ["-c", _DUCK_TYPED_SCRIPT, str(tmp_path / "run")], check=True)
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["global_step"] == 10 * 3  # 96 examples in batches of 32.
  assert sorted(out["validation_metrics"]) == ["accuracy", "loss"]
  assert out["validation_metrics"]["accuracy"] > 0.5
  assert out["task_attributes"] == []
