"""Every --optimizer trains the reference model, and each makes its own update."""

import json

import numpy as np
import pytest

from tests.helpers import processes

# One process, one strategy (2 logical CPU replicas): the same run (same
# initial weights, batches and learning rate) with each optimizer. 256
# examples in batches of 32: 8 steps an epoch, 3 epochs.
_SCRIPT = r"""
import json, sys
import numpy as np
from dist_train import config as config_lib
from dist_train import train

root = sys.argv[1]
def config(optimizer):
  return config_lib.Config(
      model_dir=f"{root}/{optimizer}", optimizer=optimizer,
      dataset="synthetic", num_train_examples=256, num_validation_examples=0,
      mode="train", global_batch_size=32, epochs=3, learning_rate=0.03,
      weight_decay=0.05, hidden_units=16, log_every_steps=8, cpu_replicas=2,
      seed=2)
strategy = train.create_strategy(config("sgd"))
out = {}
for optimizer in ("sgd", "momentum", "adam", "adamw"):
  result = train.train_and_evaluate(config(optimizer), strategy=strategy)
  np.savez(f"{root}/{optimizer}.npz",
           *[v.numpy() for v in result.model.trainable_variables])
  out[optimizer] = [entry["train"]["loss"] for entry in result.history]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("optimizers")
  result = processes.run_python(["-c", _SCRIPT, str(root)], check=True, prewarmed=True)
  losses = json.loads(result.stdout.strip().splitlines()[-1])
  weights = {}
  for optimizer in losses:
    with np.load(root / f"{optimizer}.npz") as f:
      weights[optimizer] = [f[f"arr_{i}"] for i in range(len(f.files))]
  return losses, weights


def _max_difference(a, b):
  assert [x.shape for x in a] == [y.shape for y in b]
  return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam", "adamw"])
def test_optimizer_trains(runs, optimizer):
  losses, weights = runs
  first, *_, last = losses[optimizer]  # Mean training loss of epochs 1, 3.
  assert last < 0.9 * first, losses[optimizer]
  assert all(np.all(np.isfinite(w)) for w in weights[optimizer])


@pytest.mark.parametrize("optimizer, other", [
    ("momentum", "sgd"),  # Momentum is applied.
    ("adamw", "sgd"),
    ("adamw", "adam"),  # The decoupled weight decay is applied.
])
def test_optimizer_makes_its_own_update(runs, optimizer, other):
  _, weights = runs
  assert _max_difference(weights[optimizer], weights[other]) > 1e-3
