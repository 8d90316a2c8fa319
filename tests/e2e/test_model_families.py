"""Every model family keeps the exactness contract when shares are empty.

A global batch of fewer examples than replicas x micro-batches leaves some
shares empty; layers such as Conv1D and Conv2D cannot run on 0 rows, so an
empty share must run no forward pass yet take part in every collective.
The tasks of tests/family_fixtures.py (a dense MLP, the built-in Conv2D +
pooling model, an Embedding + causal Conv1D, an Embedding + GRU with a Keras
mask, a self-attention block with a padding mask, a two-output model with a
dict of losses and loss weights, and the causal Conv1D with its own
train_step) train 15 examples in global batches of 7 (7, 7, 1) for 2
epochs and validate 8 (7, 1): shares of 3/4 and 2/2/3 rows, then a batch of
1 that leaves 1 of 2 or 2 of 3 replicas empty, and with 4 micro-batches,
empty micro-batches in every step.

Each replica count is one process (tests/helpers/task_parity_run.py) that
trains every family: 2 replicas with --grad_accum_steps 4 (the last batch
leaves a replica and 7 of 8 micro-batches empty) and 3 replicas without
accumulation (it leaves 2 of 3 replicas empty); one replica is the parity
tests' case, here the reference is the loop below. The Conv2D family also
trains on 2 workers x 4 micro-batches (launch.local). Every run is
compared with a one-device reference written here (plain GradientTape, the
objective by hand, SGD as `v -= learning_rate * g`): final weights within
1e-5, after moving more than 100 times that, and the validation loss of the
final weights within 1e-5. Then a model that fails on one share's size
stops the command line with one line naming the step, the share and the op.
"""

import concurrent.futures
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from dist_train import config as config_lib
from tests.helpers import parity
from tests.helpers import processes
from tests.helpers import family_fixtures as fixtures

SEED = 7  # task_parity_run.py's --seed.
LEARNING_RATE = 0.1
EPOCHS = 2
STEPS = 6  # 2 epochs of 3 global batches.
TOLERANCE = 1e-5
FAMILIES = ("dense_mlp", "conv2d_pooling", "causal_conv1d", "masked_gru",
            "self_attention", "two_outputs", "own_step_conv1d")
# {replicas: --grad_accum_steps}.
ACCUMULATION = {2: 4, 3: 1}
TWO_WORKER_FAMILIES = ("conv2d_pooling",)
SETTINGS = dict(global_batch_size=fixtures.GLOBAL_BATCH_SIZE, epochs=EPOCHS)
FLAGS = dict(shuffle_buffer=1, learning_rate=LEARNING_RATE,
             mode="train_and_evaluate")


def _cases(accum):
  return [{"name": f"{family}_{accum}",
           "task": f"tests.helpers.family_fixtures:{family}",
           "grad_accum_steps": accum, **SETTINGS, "flags": FLAGS}
          for family in FAMILIES]


def _train(tmp_dir, replicas):
  """{case name: saved result} of one process with `replicas` replicas."""
  return parity.train_tasks(tmp_dir, _cases(ACCUMULATION[replicas]), replicas)


def _train_two_workers(tmp_dir, family):
  """(global step, trainable weights) of `family` on 2 workers with 4
  micro-batches each, from its last checkpoint."""
  model_dir = os.path.join(tmp_dir, f"workers_{family}")
  flags = [f"--task=tests.helpers.family_fixtures:{family}", "--grad_accum_steps=4",
           f"--global_batch_size={fixtures.GLOBAL_BATCH_SIZE}",
           f"--epochs={EPOCHS}", "--optimizer=sgd", f"--seed={SEED}",
           "--steps_per_loop=3", "--log_every_steps=5", "--collective_timeout_s=120",
           *(f"--{k}={v}" for k, v in FLAGS.items()),
           f"--model_dir={model_dir}"]
  returncode, output = processes.run_launch(2, flags)
  assert returncode == 0, output[-6000:]
  path = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
  reader = tf.train.load_checkpoint(path)
  names = sorted((n for n in reader.get_variable_to_shape_map()
                  if n.startswith("optimizer/_trainable_variables/")),
                 key=lambda n: int(n.split("/")[2]))
  return int(path.rsplit("-", 1)[1]), [reader.get_tensor(n) for n in names]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{replicas or ("workers", family): result}, two processes at a time,
  the slowest first."""
  tmp_dir = str(tmp_path_factory.mktemp("families"))
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    futures = {replicas: pool.submit(_train, tmp_dir, replicas)
               for replicas in (3, 2)}
    futures.update({("workers", family): pool.submit(
        _train_two_workers, tmp_dir, family)
                    for family in TWO_WORKER_FAMILIES})
    return {key: future.result() for key, future in futures.items()}


# The reference: one device, whole global batches, the objective by hand.


def _cross_entropy(labels, logits):
  """-log softmax(logits)[label] of each element."""
  return tf.reduce_logsumexp(logits, -1) - tf.reduce_sum(
      tf.one_hot(labels, tf.shape(logits)[-1]) * logits, -1)


def _data_terms(family, model, batch):
  """[(per-element loss, its weights, loss weight)] of a global batch."""
  if family == "two_outputs":
    features, labels, weights = batch
    outputs = model(features, training=True)
    squared_error = tf.reduce_mean((labels["value"] - outputs["value"]) ** 2,
                                   -1)
    return [(_cross_entropy(labels["label"], outputs["label"]),
             weights["label"], 1.0),
            (squared_error, weights["value"], 0.5)]
  if len(batch) == 2:
    features, labels = batch
    per_example = _cross_entropy(labels, model(features, training=True))
    return [(per_example, tf.ones_like(per_example), 1.0)]
  tokens, targets, weights = batch
  return [(_cross_entropy(targets, model(tokens, training=True)), weights,
           1.0)]


def _objective(family, model, batch):
  """The single-device objective of one global batch."""
  objective = tf.add_n([
      loss_weight * tf.math.divide_no_nan(tf.reduce_sum(w * l),
                                          tf.reduce_sum(w))
      for l, w, loss_weight in _data_terms(family, model, batch)])
  task = getattr(fixtures, family)
  if getattr(task, "REGULARIZED", False):
    objective += fixtures.L2 * tf.add_n([
        tf.reduce_sum(v ** 2) for v in model.trainable_variables
        if v.path.endswith("kernel")])
  if family == "own_step_conv1d":
    tokens, _, weights = batch
    logits = model(tokens, training=True)
    objective += fixtures.OwnStepConv1D.PENALTY * tf.reduce_sum(
        weights * tf.reduce_mean(logits ** 2, -1)) / tf.reduce_sum(weights)
  return objective


def _validation_loss(family, model, dataset):
  """Each loss's weighted mean over every validation element, summed with
  the loss weights (as dist_train reports `loss`)."""
  sums = None
  for batch in dataset.padded_batch(fixtures.GLOBAL_BATCH_SIZE):
    terms = [(float(tf.reduce_sum(w * l)), float(tf.reduce_sum(w)), lw)
             for l, w, lw in _data_terms(family, model, batch)]
    sums = terms if sums is None else [
        (a + x, b + y, lw) for (a, b, lw), (x, y, _) in zip(sums, terms)]
  return sum(lw * a / b for a, b, lw in sums)


_REFERENCES = {}


def _reference(family, initial):
  """(final model.weights, final trainable variables, steps, validation
  loss) of plain SGD on one device, from `initial` (model.weights)."""
  if family in _REFERENCES:
    return _REFERENCES[family]
  config = config_lib.Config(model_dir="unused", seed=SEED)
  task = getattr(fixtures, family)(config)
  keras.utils.set_random_seed(SEED)
  model = task.build_model()
  model.set_weights(initial)
  variables = model.trainable_variables
  dataset = task.build_dataset("train")
  steps = 0
  for _ in range(EPOCHS):  # --shuffle_buffer=1: in order.
    for batch in dataset.padded_batch(fixtures.GLOBAL_BATCH_SIZE):
      with tf.GradientTape() as tape:
        objective = _objective(family, model, batch)
      for variable, gradient in zip(variables,
                                    tape.gradient(objective, variables)):
        variable.assign_sub(LEARNING_RATE * tf.convert_to_tensor(gradient))
      steps += 1
  _REFERENCES[family] = (
      [w.numpy() for w in model.weights], [v.numpy() for v in variables],
      steps, _validation_loss(family, model, task.build_dataset("validation")))
  return _REFERENCES[family]


def _weights(result, which="final"):
  count = len([k for k in result if k.startswith(f"{which}_")])
  return [result[f"{which}_{i}"] for i in range(count)]


def _difference(a, b):
  assert len(a) == len(b) > 0
  assert [x.shape for x in a] == [y.shape for y in b]
  return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_one_device_reference(runs, family):
  """2 replicas x 4 micro-batches and 3 replicas, against one device."""
  initial = _weights(runs[3][f"{family}_1"], "initial")
  weights, _, steps, validation_loss = _reference(family, initial)
  assert steps == STEPS
  errors = {}
  for replicas, accum in ACCUMULATION.items():
    name = f"{family}_{accum}"
    run = runs[replicas][name]
    assert int(run["num_replicas"]) == replicas
    assert _difference(_weights(run, "initial"), initial) == 0, name
    assert int(run["global_step"]) == STEPS, (name, replicas)
    moved = _difference(_weights(run), initial)
    assert moved > 100 * TOLERANCE, (name, replicas, moved)
    errors[(replicas, accum)] = _difference(_weights(run), weights)
    assert abs(float(run["validation_loss"]) - validation_loss) < (
        TOLERANCE), (name, replicas, float(run["validation_loss"]),
                     validation_loss)
    print(f"{family}: {replicas} replicas x {accum} micro-batches: "
          f"max |dist_train - reference| {errors[(replicas, accum)]:.1e}, "
          f"moved {moved:.1e}")
  assert max(errors.values()) < TOLERANCE, errors


@pytest.mark.parametrize("family", TWO_WORKER_FAMILIES)
def test_two_workers_match_one_device_reference(runs, family):
  """2 workers x 4 micro-batches: the last global batch leaves worker 0 and
  7 of 8 micro-batches empty, and validation leaves a worker empty too."""
  step, trainable = runs[("workers", family)]
  initial = _weights(runs[3][f"{family}_1"], "initial")
  _, reference, steps, _ = _reference(family, initial)
  assert step == steps == STEPS
  error = _difference(trainable, reference)
  print(f"{family}: 2 workers x 4 micro-batches: max |dist_train - "
        f"reference| {error:.1e}")
  assert error < TOLERANCE


def test_a_model_failing_on_a_share_names_the_share(tmp_path):
  """A model that cannot take a share of 3 rows (2 replicas: shares of 3
  and 4): the one error line names the step, the replica, its rows and
  the op, and the user's line."""
  result = processes.run_cli(
      "--task=tests.helpers.family_fixtures:fails_on_small_shares",
      "--cpu_replicas=2", "--global_batch_size=8", "--grad_accum_steps=2",
      "--shuffle_buffer=1", "--epochs=1", "--mode=train",
      f"--model_dir={tmp_path}")
  line = processes.error_line(result)
  assert result.returncode == 1, result.stderr[-2000:]
  # 15 examples: a batch of 8 (shares 4/4, micro-batches 2/2), then 7
  # (shares 3/4): replica 0's first micro-batch holds 1 row.
  assert line.startswith("dist_train: error: training steps 1-2: "
                         "InvalidArgumentError: Input to reshape"), line
  assert ("(step 2, replica 0 of 2: a share of 3 rows, micro-batch 1 of 2 "
          "with 1 row, in op ") in line, line
  assert "pairs" in line and "Reshape" in line, line
  assert "family_fixtures.py:" in line, line
