"""Mixed-precision policies, the float32 output layer, and float16 overflow."""

import json

import pytest

from dist_train import config as config_lib
from tests.helpers import processes

# Runs with 2 logical CPU replicas in its own process; prints one JSON line.
_SCRIPT = r"""
import json
import keras
import numpy as np
import tensorflow as tf
from dist_train import config as config_lib
from dist_train.models import mnist
from dist_train.loop import precision
from dist_train import train
from dist_train.loop import steps
from dist_train.tasks import classification
from tests.helpers import global_batches

strategy = train.create_strategy(
    config_lib.Config(model_dir="/tmp/unused", cpu_replicas=2))
config = config_lib.Config(model_dir="/tmp/unused", hidden_units=8,
                           activity_regularization=1e-3)
out = {}
for policy in precision.POLICIES:
  with strategy.scope(), precision.policy_scope(policy):
    model = mnist.create_model(config)
  out[policy] = {
      "hidden": model.get_layer("dense_1").compute_dtype,
      "output": model.get_layer("predictions").compute_dtype,
      "variables": sorted({v.dtype for v in model.trainable_variables}),
      "logits": model(tf.zeros([2, 784])).dtype.name,
  }
out["global_policy_after"] = keras.mixed_precision.global_policy().name

# A global batch of 4: replica 0 gets rows 0-1 (finite), replica 1 rows 2-3,
# whose huge pixels overflow float16 on that replica only.
with strategy.scope():
  with precision.policy_scope("mixed_float16"):
    model = mnist.create_model(config)
  optimizer = precision.wrap_optimizer(keras.optimizers.SGD(0.1),
                                       "mixed_float16")
  optimizer.build(model.trainable_variables)
out["optimizer"] = type(optimizer).__name__
trainer = steps.Trainer(strategy=strategy,
                        task=classification.ClassificationTask(config),
                        model=model, optimizer=optimizer,
                        add_loss_reduction="sum",
                        train_input=global_batches.GlobalBatches(strategy))
before = [v.numpy() for v in model.trainable_variables]
features = np.full([4, 784], 0.5, np.float32)
features[2:] = 1e6
labels = np.arange(4, dtype=np.int32)
batches = tf.data.Dataset.from_tensors((features, labels)).repeat()
trainer.train_steps(iter(batches), 1)
after = [v.numpy() for v in model.trainable_variables]
out["overflow"] = {
    "unchanged": all(np.array_equal(a, b) for a, b in zip(before, after)),
    "finite": all(bool(np.all(np.isfinite(a))) for a in after),
    "scale": float(optimizer.dynamic_scale.numpy()),
    "iterations": int(optimizer.iterations.numpy()),
}
# A finite global batch is applied, and unscaled: one SGD step of the loss.
features[2:] = 0.25
trainer.train_steps(iter(tf.data.Dataset.from_tensors((features, labels)).repeat()),
              1)
out["finite_step"] = {
    "changed": not all(np.array_equal(a, b) for a, b in
                       zip(after, [v.numpy() for v in
                                   model.trainable_variables])),
    "iterations": int(optimizer.iterations.numpy()),
    "max_update": max(float(np.max(np.abs(a - v.numpy())))
                      for a, v in zip(after, model.trainable_variables)),
}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def checks():
  result = processes.run_python(["-c", _SCRIPT], check=True, prewarmed=True)
  line = next(l for l in result.stdout.splitlines() if l.startswith("RESULT "))
  return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("policy, hidden", [("float32", "float32"),
                                            ("mixed_float16", "float16"),
                                            ("mixed_bfloat16", "bfloat16")])
def test_policy_sets_hidden_dtype_and_keeps_output_float32(checks, policy,
                                                           hidden):
  model = checks[policy]
  assert model["hidden"] == hidden
  assert model["output"] == "float32"
  assert model["logits"] == "float32"
  assert model["variables"] == ["float32"]


def test_policy_scope_restores_the_global_policy(checks):
  assert checks["global_policy_after"] == "float32"


def test_float16_overflow_on_one_replica_skips_the_step_everywhere(checks):
  """Without the cross-replica check, Keras would apply replica 1's inf."""
  assert checks["optimizer"] == "LossScaleOptimizer"
  overflow = checks["overflow"]
  assert overflow["finite"] and overflow["unchanged"]
  assert overflow["scale"] == 2.0 ** 14  # Halved from Keras' 2 ** 15.
  assert overflow["iterations"] == 0


def test_float16_finite_step_is_applied_unscaled(checks):
  step = checks["finite_step"]
  assert step["changed"] and step["iterations"] == 1
  # lr 0.1 times an unscaled gradient: far below the 2 ** 14 loss scale.
  assert 0 < step["max_update"] < 1.0


def test_unknown_policy_is_refused_with_the_flag_name(tmp_path):
  with pytest.raises(config_lib.ConfigError,
                     match="--mixed_precision must be one of .*'float8'"):
    config_lib.Config(model_dir=str(tmp_path), mixed_precision="float8")
