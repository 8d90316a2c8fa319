"""N replicas make exactly the update one device makes on the same global batch.

Each replica count runs in its own process (a process can form one device
layout), which trains every case of `tests/helpers/parity_run.py` in turn, and
the other modules' cases with it (tests/conftest.py: parity_runs). Global
batches of 65 split unevenly, 32/33 over 2 replicas and 21/22/22 over 3, and
each epoch ends with a batch of 2 examples, split 1/1 and 0/1/1, so a
replica gets none.

A comparison that passes by accident is ruled out three ways: every run says
what it ran (replicas in sync, compiled loops), every compared run's weights
moved from its own initial weights by far more than the tolerance, and a
hand-written single-device GradientTape loop (no dist_train code) is the
independent reference.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from dist_train import config as config_lib
from dist_train.models import mnist
from tests.helpers import parity
from tests.helpers import parity_run
from tests.helpers import processes

PARITY_CASES = ["reference_sum", "keras_mean", "reference_l2",
                "reference_clip", "user_plugins", "sample_sum_clip",
                "sample_mean"]
CASES = PARITY_CASES + ["reference_declared_mean"]
REPLICAS = (1, 2, 3)
# Trained once for the session (tests/conftest.py: parity_runs), in one
# process per replica count, beside the other modules' cases.
PARITY_RUNS = {replicas: CASES for replicas in REPLICAS}
# (global steps, compiled loop calls) of 2 epochs, 3 steps per loop, loops
# ending at every 4th step and at epoch ends: steps 3,4,7,8,11 | 12,15,16,19,
# 20,22 for 11 steps an epoch; 3,4,7,8,10 | 12,15,16,19,20 for 10.
STEPS_AND_LOOPS = {"user_plugins": (20, 10)}
DEFAULT_STEPS_AND_LOOPS = (22, 11)
SAMPLE_PATH = os.path.join(processes.REPO_ROOT, "dist_train", "data",
                           "mnist_sample.npz")
TOLERANCE = parity.TOLERANCE
MIN_MOVED = parity.MIN_MOVED
initial_weights = parity.initial_weights
weights = parity.weights
max_difference = parity.max_difference
max_weight_difference = parity.max_weight_difference
moved = parity.moved


@pytest.fixture(scope="module")
def runs(parity_runs):
  """{(case, replicas): saved result} of this module's cases."""
  _, results = parity_runs
  return {(case, replicas): results[(case, replicas)]
          for replicas, cases in PARITY_RUNS.items() for case in cases}


def test_each_run_says_it_ran_as_asked(runs):
  for (case, replicas), result in runs.items():
    steps, loop_calls = STEPS_AND_LOOPS.get(case, DEFAULT_STEPS_AND_LOOPS)
    ran = {name: int(result[name]) for name in (
        "num_replicas", "num_workers", "global_step", "loop_calls",
        "xla_modules")}
    assert ran == {"num_replicas": replicas, "num_workers": 1,
                   "global_step": steps, "loop_calls": loop_calls,
                   "xla_modules": 0}, (case, replicas)


@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize("case", PARITY_CASES)
def test_replicas_match_one_device(runs, case, replicas):
  one, many = runs[(case, 1)], runs[(case, replicas)]
  # The same start: any difference at the end comes from training.
  assert max_difference(initial_weights(one), initial_weights(many)) == 0
  difference = max_weight_difference(one, many)
  print(f"{case}: 1 vs {replicas} replicas: max weight difference "
        f"{difference:.2e}; moved {moved(one):.2e} (1 replica), "
        f"{moved(many):.2e} ({replicas} replicas)")
  assert difference < TOLERANCE, (
      f"{case}: {replicas} replicas differ from 1 device by {difference:.2e}")
  assert min(moved(one), moved(many)) > MIN_MOVED


@pytest.mark.parametrize("case", ["reference_sum", "reference_clip"])
def test_initial_weights_are_the_seeded_model(runs, case):
  """A run starts from the model built after `keras.utils.set_random_seed`:
  the same for every replica count, whichever case ran before it in the
  process, and reproducible outside a run (tests/e2e/test_modes.py relies on
  it)."""
  settings = parity_run.settings(case)
  keras.utils.set_random_seed(settings["seed"])
  model = mnist.create_model(config_lib.Config(model_dir="/tmp/unused",
                                               **settings))
  assert max_difference([v.numpy() for v in model.variables],
                        initial_weights(runs[(case, 1)])) == 0


def test_clipping_is_active_in_the_clip_case(runs):
  """Otherwise the clip parity test would only repeat reference_sum."""
  clipped, unclipped = runs[("reference_clip", 1)], runs[("reference_sum", 1)]
  assert max_weight_difference(clipped, unclipped) > MIN_MOVED


@pytest.mark.parametrize("replicas", [2, 3])
def test_wrongly_scaled_add_loss_breaks_parity(runs, replicas):
  """The reference sum layer declared `mean` is weighted by each replica's
  share of the examples.

  This guards the parity test itself: a scaling error must show up as a
  difference far above the tolerance.
  """
  one = runs[("reference_declared_mean", 1)]
  many = runs[("reference_declared_mean", replicas)]
  assert max_weight_difference(one, many) > 100 * TOLERANCE


@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize("case", ["reference_sum", "keras_mean"])
@pytest.mark.parametrize("metric", ["train_loss", "train_accuracy",
                                    "validation_loss", "validation_accuracy"])
def test_metrics_aggregate_across_replicas(runs, case, metric, replicas):
  """Metrics read in cross-replica context equal the single-device values."""
  one = float(runs[(case, 1)][metric])
  many = float(runs[(case, replicas)][metric])
  assert one == pytest.approx(many, abs=1e-5)
  assert 0.0 < one < (1.0 if "accuracy" in metric else 10.0)


# The independent reference: the single-device update written out by hand.


def hand_written_training(case, initial, clipped_steps):
  """Trains `case` of parity_run.py on one device with plain TensorFlow.

  Nothing of dist_train runs here: the data are read from the packaged file,
  each epoch's order is the documented tf.data shuffle of example indices
  (seeded by the global seed, as `keras.utils.set_random_seed` seeds it, and
  by `seed * 1_000_003 + epoch`), and the objective is written out: the mean
  cross-entropy over the global batch, plus L2 of every kernel, plus the
  add_loss term of the first hidden layer's outputs (for the reference
  model, C times their sum; for the Keras activity model, L2 of them divided
  by the batch size).

  Args:
    case: a parity_run.py case on --dataset=mnist_sample.
    initial: the run's initial weights: kernel, bias of each Dense layer.
    clipped_steps: a list; gets one bool per step, whether it was clipped.

  Returns:
    The final weights, in the order of `initial`.
  """
  settings = parity_run.settings(case)
  assert settings["dataset"] == "mnist_sample"
  num_examples, batch = settings["num_train_examples"], settings[
      "global_batch_size"]
  with np.load(SAMPLE_PATH) as f:
    # The training split is the head; validation is held out from the tail.
    assert len(f["y"]) - settings["num_validation_examples"] >= num_examples
    images, labels = f["x"][:num_examples], f["y"][:num_examples]
  features = images.reshape(num_examples, -1).astype(np.float32) / np.float32(
      255)
  labels = labels.astype(np.int32)
  layers = [(tf.Variable(initial[i]), tf.Variable(initial[i + 1]))
            for i in range(0, len(initial), 2)]
  variables = [v for layer in layers for v in layer]
  sum_add_loss = parity_run.CASES[case]["model"] == "reference"

  def objective(x, y):
    h, add_loss = x, 0.0
    for i, (kernel, bias) in enumerate(layers):
      h = tf.matmul(h, kernel) + bias
      if i < len(layers) - 1:
        h = tf.nn.relu(h)
      if i == 0:
        add_loss = (settings["activity_regularization"] * tf.reduce_sum(h)
                    if sum_add_loss else parity_run.KERAS_ACTIVITY_L2 *
                    tf.reduce_sum(tf.square(h)) / x.shape[0])
    cross_entropy = tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=h))
    l2 = settings["kernel_l2"] * tf.add_n(
        [tf.reduce_sum(tf.square(kernel)) for kernel, _ in layers])
    return cross_entropy + l2 + add_loss

  tf.random.set_seed(settings["seed"])
  clip_norm = settings.get("clip_norm")
  for epoch in range(settings["epochs"]):
    order = tf.data.Dataset.range(num_examples).shuffle(
        settings["shuffle_buffer"], seed=settings["seed"] * 1_000_003 + epoch,
        reshuffle_each_iteration=False).batch(batch)
    for indices in order.as_numpy_iterator():
      with tf.GradientTape() as tape:
        loss = objective(tf.constant(features[indices]),
                         tf.constant(labels[indices]))
      gradients = tape.gradient(loss, variables)
      if clip_norm is not None:
        norm = float(tf.sqrt(tf.add_n(
            [tf.reduce_sum(tf.square(g)) for g in gradients])))
        clipped_steps.append(norm > clip_norm)
        gradients = [g * (clip_norm / max(norm, clip_norm))
                     for g in gradients]
      for variable, gradient in zip(variables, gradients):
        variable.assign_sub(settings["learning_rate"] * gradient)
  return [v.numpy() for v in variables]


@pytest.mark.parametrize("case", ["sample_sum_clip", "sample_mean"])
def test_replicas_match_a_hand_written_single_device_loop(runs, case):
  clipped_steps = []
  expected = hand_written_training(
      case, initial_weights(runs[(case, 1)]), clipped_steps)
  reference_moved = max_difference(expected, initial_weights(runs[(case, 1)]))
  if case == "sample_sum_clip":  # Clipping decides some steps, not all.
    assert 0 < sum(clipped_steps) < len(clipped_steps), clipped_steps
  for replicas in REPLICAS:
    difference = max_difference(weights(runs[(case, replicas)]), expected)
    print(f"{case}: hand-written loop vs {replicas} replica(s): max weight "
          f"difference {difference:.2e}; the loop moved {reference_moved:.2e}")
    assert difference < TOLERANCE, (case, replicas, difference)
  assert reference_moved > MIN_MOVED
