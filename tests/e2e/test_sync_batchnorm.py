"""Synchronized BatchNormalization (--sync_batchnorm) makes N replicas and
workers compute exactly the update one device computes, moving statistics
included.

The tasks (tests/helpers/sync_bn_fixtures.py, and the example
examples/mnist_resnet.py on 132 packaged digits) train 132 examples in
global batches of 65 for 2 epochs: 65, 65, 2, so shares are uneven (33/32,
22/22/21), the last batch is partial and on 3 replicas leaves one replica
empty. The cases are a Dense + BatchNormalization model, an Embedding with
a Keras mask into BatchNormalization (its moments skip the padding), and the
residual network (Conv2D + BatchNormalization, an Add).

One process per replica count trains every case (parity.train_tasks) and
the residual network also trains on 2 workers (launch.local). Each is
compared with a one-device reference written here: the same plain Keras
model, normal BatchNormalization on the whole global batch, a GradientTape
and `v -= learning_rate * g`. Every model variable (weights, moving mean and
variance) must be within 1e-5, after the weights and the moving statistics
moved more than 100 times that. With --sync_batchnorm=false the same run is
far from the reference, so the comparison can fail; with
--grad_accum_steps=2 the statistics are each micro-batch's (one warning
line says so); --sync_batchnorm=true on a model without BatchNormalization
trains, with one warning line.
"""

import concurrent.futures
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from dist_train import config as config_lib
from dist_train.data import mnist
from examples import mnist_resnet
from tests.helpers import parity
from tests.helpers import processes
from tests.helpers import sync_bn_fixtures as fixtures

SEED = 7
LEARNING_RATE = 0.05
EPOCHS = 2
STEPS = 6  # 2 epochs of 65, 65 and 2.
TOLERANCE = 1e-5
MIN_MOVED = 100 * TOLERANCE
RESNET_CHANNELS = 8
# A smaller step for the convolutions: at 0.05 float32 rounding alone puts
# one device ~2e-5 from the same steps in float64 (the kernels' gradients
# through BatchNormalization are small sums of large terms), as far as 2 or
# 3 replicas are from either.
RESNET_LEARNING_RATE = 0.01
RESNET_DATA = dict(num_train_examples=fixtures.NUM_TRAIN,
                   num_validation_examples=20)
FLAGS = dict(shuffle_buffer=1, learning_rate=LEARNING_RATE, seed=SEED,
             mode="train")
TASKS = {"dense_bn": "tests.helpers.sync_bn_fixtures:dense_bn",
         "masked_bn": "tests.helpers.sync_bn_fixtures:masked_bn",
         "resnet": "examples.mnist_resnet:task"}
EXACT = tuple(TASKS)
NO_BN_WARNING = ("--sync_batchnorm: the model has no BatchNormalization "
                 "layer")
GHOST_WARNING = "--sync_batchnorm with --grad_accum_steps=2"


def _case(name, task, **flags):
  extra = ({**RESNET_DATA, "hidden_units": RESNET_CHANNELS,
            "learning_rate": RESNET_LEARNING_RATE}
           if task == "resnet" else {})
  return {"name": name, "task": TASKS.get(task, task),
          "global_batch_size": fixtures.GLOBAL_BATCH_SIZE, "epochs": EPOCHS,
          "flags": {**FLAGS, **extra, **flags}}


# {replicas: cases}; the exact cases run with the default --sync_batchnorm.
CASES = {
    3: [_case(task, task) for task in EXACT] + [
        _case("unsynchronized", "dense_bn", sync_batchnorm=False)],
    2: [_case(task, task) for task in EXACT] + [
        dict(_case("accumulated", "dense_bn"), grad_accum_steps=2),
        _case("no_bn", "tests.helpers.sync_bn_fixtures:no_bn",
              sync_batchnorm=True)],
}


def _train(tmp_dir, replicas):
  """({case name: saved result}, the process's stderr)."""
  output_dir = os.path.join(tmp_dir, f"replicas_{replicas}")
  os.makedirs(output_dir)
  result = processes.run_python(
      ["tests/helpers/task_parity_run.py", f"--cpu_replicas={replicas}",
       f"--output_dir={output_dir}",
       f"--cases={json.dumps(CASES[replicas])}"], timeout=600, check=True)
  saved = {}
  for case in CASES[replicas]:
    with np.load(os.path.join(output_dir, f"{case['name']}.npz")) as f:
      saved[case["name"]] = dict(f)
  return saved, result.stderr


def _train_two_workers(tmp_dir):
  """Every model variable of the residual network trained on 2 workers
  (one replica each), from its exported model, and the launch's output."""
  model_dir = os.path.join(tmp_dir, "workers")
  flags = ["--task=examples.mnist_resnet:task",
           f"--hidden_units={RESNET_CHANNELS}",
           *(f"--{k}={v}" for k, v in {
               **FLAGS, **RESNET_DATA,
               "learning_rate": RESNET_LEARNING_RATE}.items()),
           f"--global_batch_size={fixtures.GLOBAL_BATCH_SIZE}",
           f"--epochs={EPOCHS}", "--optimizer=sgd", "--steps_per_loop=3",
           "--log_every_steps=5", "--collective_timeout_s=120",
           f"--model_dir={model_dir}"]
  returncode, output = processes.run_launch(2, flags)
  assert returncode == 0, output[-6000:]
  model = keras.saving.load_model(
      os.path.join(model_dir, "export", "model.keras"), compile=False)
  return [w.numpy() for w in model.weights], output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{3: (results, stderr), 2: ..., "workers": (weights, output)}, two
  processes at a time."""
  tmp_dir = str(tmp_path_factory.mktemp("sync_batchnorm"))
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    futures = {replicas: pool.submit(_train, tmp_dir, replicas)
               for replicas in (3, 2)}
    futures["workers"] = pool.submit(_train_two_workers, tmp_dir)
    return {key: future.result() for key, future in futures.items()}


# The reference: one device, whole global batches, plain Keras.


def _model_and_examples(task):
  if task == "resnet":
    splits = mnist.load_splits(dataset="mnist_sample", seed=0, **RESNET_DATA)
    return (mnist_resnet.create_model(channels=RESNET_CHANNELS),
            splits.train.examples)
  fixture = getattr(fixtures, task)(config_lib.Config(model_dir="unused",
                                                      seed=SEED))
  return fixture.build_model(), fixture.examples("train")


_REFERENCES = {}


def _reference(task, initial):
  """Every variable of `task`'s model (model.weights order: weights and
  moving statistics) after SGD on one device from `initial`."""
  key = (task, tuple(float(np.sum(w)) for w in initial))
  if key in _REFERENCES:
    return _REFERENCES[key]
  model, (features, labels) = _model_and_examples(task)
  model.set_weights(initial)
  variables = model.trainable_variables
  learning_rate = RESNET_LEARNING_RATE if task == "resnet" else LEARNING_RATE
  batch = fixtures.GLOBAL_BATCH_SIZE
  for _ in range(EPOCHS):  # --shuffle_buffer=1: in order.
    for start in range(0, len(labels), batch):
      with tf.GradientTape() as tape:
        logits = model(features[start:start + batch], training=True)
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            labels[start:start + batch], logits, from_logits=True))
      for variable, gradient in zip(variables,
                                    tape.gradient(loss, variables)):
        variable.assign_sub(learning_rate * tf.convert_to_tensor(gradient))
  _REFERENCES[key] = [w.numpy() for w in model.weights], [
      "moving" in w.path for w in model.weights]
  return _REFERENCES[key]


def _saved(result, which):
  count = len([k for k in result if k.startswith(f"{which}_")])
  return [result[f"{which}_{i}"] for i in range(count)]


def _check_exact(final, initial, task):
  reference, is_moving = _reference(task, initial)
  difference = parity.max_difference(final, reference)
  moved = [float(np.max(np.abs(f - i))) for f, i in zip(final, initial)]
  moved_weights = max(m for m, s in zip(moved, is_moving) if not s)
  moved_statistics = max(m for m, s in zip(moved, is_moving) if s)
  print(f"{task}: {difference:.2e} from one device; weights moved "
        f"{moved_weights:.2e}, moving statistics {moved_statistics:.2e}")
  assert moved_weights > MIN_MOVED and moved_statistics > MIN_MOVED
  assert difference <= TOLERANCE
  return difference


@pytest.mark.parametrize("replicas", [3, 2])
@pytest.mark.parametrize("task", EXACT)
def test_replicas_match_one_device_moving_statistics_included(
    runs, replicas, task):
  results, _ = runs[replicas]
  result = results[task]
  assert int(result["global_step"]) == STEPS
  assert int(result["num_replicas"]) == replicas
  _check_exact(_saved(result, "final"), _saved(result, "initial"), task)


def test_two_workers_match_one_device(runs):
  weights, output = runs["workers"]
  initial = _saved(runs[2][0]["resnet"], "initial")  # The same seed.
  assert "2 replica(s) on 2 worker(s)" in output
  _check_exact(weights, initial, "resnet")


def test_per_replica_statistics_are_not_one_device(runs):
  """--sync_batchnorm=false: each replica normalises with its share's
  moments, far from the reference the synchronized run matches."""
  results, _ = runs[3]
  result = results["unsynchronized"]
  reference, _ = _reference("dense_bn", _saved(result, "initial"))
  difference = parity.max_difference(_saved(result, "final"), reference)
  print(f"per-replica statistics: {difference:.2e} from one device")
  assert difference > 1000 * TOLERANCE


def test_accumulation_normalises_micro_batches_and_says_so(runs):
  results, stderr = runs[2]
  result = results["accumulated"]
  assert int(result["global_step"]) == STEPS
  final, initial = _saved(result, "final"), _saved(result, "initial")
  assert all(np.all(np.isfinite(w)) for w in final)
  assert parity.max_difference(final, initial) > MIN_MOVED
  # Micro-batches of 17 or 16 rows over 2 replicas: not the global batch.
  reference, _ = _reference("dense_bn", initial)
  assert parity.max_difference(final, reference) > 100 * TOLERANCE
  lines = [line for line in stderr.splitlines() if GHOST_WARNING in line]
  assert len(lines) == 1, stderr[-3000:]
  assert "warning" in lines[0].lower() and "ghost batch norm" in lines[0]


def test_sync_batchnorm_without_batchnorm_warns_and_trains(runs):
  results, stderr = runs[2]
  result = results["no_bn"]
  assert int(result["global_step"]) == STEPS
  assert parity.max_difference(_saved(result, "final"),
                               _saved(result, "initial")) > MIN_MOVED
  lines = [line for line in stderr.splitlines() if NO_BN_WARNING in line]
  assert len(lines) == 1, stderr[-3000:]
  assert "warning" in lines[0].lower()
