"""Tasks keep the exactness contract: N replicas x K micro-batches make the
update one device makes on the whole global batch.

The objective of a global step is, for each loss, sum(w * l) / sum(w) over
every element of the global batch (w = 1 without weights; 0 when the weights
sum to 0), times its loss weight, plus weight regularization. Each run of
dist_train (tests/helpers/task_parity_run.py, one process per replica count,
several cases per process) is compared with a single-device reference written here
from that definition alone: plain tf.GradientTape, the objective by hand,
SGD as `v -= learning_rate * g`, the run's initial weights, and the data in
dist_train's documented order. Then unusable tasks must stop the command line
with one line.

Data sizes leave uneven shares. The sequence tasks train 203 examples in
global batches of 67 (3 + 1 steps per epoch): 3 replicas get 22, 22 and 23
examples, and the last batch of 2 leaves replica 0 empty; the two-output task
trains 157 in batches of 31 (5 + 1 steps). With --grad_accum_steps=4 shares
of 1 or 2 examples leave empty micro-batches. Loops run 3 steps, and the
sequence model's embedding has sparse gradients whose size changes from step
to step.

Tolerances: float32 runs match the reference within 1e-5 after 11 or more
steps that move the weights by over 100 times that. mixed_float16 rounds
each share's partial sums in 16 bits, so the two-output task's and the
own-step task's runs on 2 replicas are compared with their 1-replica run of
the same precision, within
twice the float16-vs-float32 difference of one device and never more than
1e-2 (tests/test_speed_modes.py explains the bound); a scaling error moves
the weights by the size of a whole update, over 100 times that.
"""

import concurrent.futures
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from dist_train import config as config_lib
from tests.helpers import parity
from tests.helpers import processes
from tests.helpers import task_fixtures

SEED = 7  # tests/helpers/task_parity_run.py trains with --seed=7 ...
LEARNING_RATE = 0.05  # ... and plain SGD at this rate.
SHUFFLE_BUFFER = 1024  # The --shuffle_buffer default.
TOLERANCE = 1e-5
MIXED_ABSOLUTE_TOLERANCE = 1e-2

SEQUENCES = {"global_batch_size": 67, "epochs": 3}  # 203 examples: 12 steps.
TWO_HEADS = {"global_batch_size": 31, "epochs": 2}  # 157 examples: 12 steps.
# In order, so that the last global batch is the 8 zero-weight examples.
ZERO_WEIGHTS = {"global_batch_size": 15, "epochs": 1,
                "flags": {"shuffle_buffer": 1}}  # 158 examples: 11 steps.
TASKS = {"masked_sequences": SEQUENCES, "two_heads": TWO_HEADS,
         "own_step": SEQUENCES}
# Micro-batches per global batch, by replica count: every count of each, and
# empty micro-batches, without training every pair.
ACCUMULATION = {1: (1,), 2: (1, 4), 3: (1, 2)}
REPLICAS = tuple(ACCUMULATION)
CLIP_NORM = 0.3
# In optimizer steps: counted in micro-steps, 4 micro-batches would decay the
# rate from the second global step on.
LR_BOUNDARIES, LR_DECAY = (5, 9), 0.2
LR_STEP = {"lr_schedule": "step", "lr_boundaries": list(LR_BOUNDARIES),
           "lr_decay_factor": LR_DECAY}
# The task's own optimizer (AdamW without weight decay on the biases), on
# every replica count, at a rate Adam's normalised steps tolerate, with the
# step schedule (the schedule the flags built reaches the task's optimizer).
OWN_OPTIMIZER_RATE = 0.01
OWN_OPTIMIZER = {"learning_rate": OWN_OPTIMIZER_RATE, **LR_STEP}
# mixed_float16: the default step and a task's own step (its tape ends
# before dist_train scales the loss), on 1 replica and on 2 x 1 and 4.
MIXED_TASKS = ("two_heads", "own_step")
MIXED_ACCUMULATION = {1: (1,), 2: (1, 4)}


def _case(name, task, accum, settings, **flags):
  return {"name": name, "task": task, "grad_accum_steps": accum,
          **settings, "flags": {**settings.get("flags", {}), **flags}}


def _cases(replicas):
  """What one process with `replicas` replicas trains, in order."""
  cases = [_case(f"{task}_{accum}", task, accum, settings)
           for task, settings in TASKS.items()
           for accum in ACCUMULATION[replicas]]
  cases += [_case(f"own_optimizer_{accum}", "own_optimizer", accum, TWO_HEADS,
                  **OWN_OPTIMIZER) for accum in ACCUMULATION[replicas]]
  if replicas in MIXED_ACCUMULATION:
    cases += [_case(f"{task}_float16_{accum}", task, accum, TASKS[task],
                    mixed_precision="mixed_float16")
              for task in MIXED_TASKS
              for accum in MIXED_ACCUMULATION[replicas]]
  if replicas == 2:
    cases += [_case(f"lr_step_{accum}", "masked_sequences", accum, SEQUENCES,
                    **LR_STEP) for accum in (1, 4)]
  if replicas == 3:
    cases += [_case(f"clip_{accum}", "masked_sequences", accum, SEQUENCES,
                    clip_norm=CLIP_NORM) for accum in (2, 4)]
    cases += [_case(name, name, 2, ZERO_WEIGHTS) for name in
              ("zero_weight_batch", "zero_weight_batch_dropped")]
  return cases


def _train(tmp_dir, replicas):
  """{case name: saved result} of one process with `replicas` replicas."""
  return parity.train_tasks(tmp_dir, _cases(replicas), replicas, timeout=600)


# Each unusable task of task_fixtures.BAD_TASKS raises its error in
# tests/integration/test_error_messages.py; one of them also runs here, through
# the command line, for its one line and exit code.
CLI_BAD_TASKS = ["no_loss"]


def _run_bad_task(model_dir, task):
  return processes.run_cli(f"--task={task}", "--epochs=1",
                          f"--model_dir={model_dir}")


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
  """{replicas or bad task name: future of its process}: every process of
  the module, three at a time, the trainings (the longest) first."""
  tmp_dir = tmp_path_factory.mktemp("tasks")
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=3)
  try:
    futures = {replicas: pool.submit(_train, str(tmp_dir), replicas)
               for replicas in (2, 3, 1)}
    for name in CLI_BAD_TASKS:
      task, _ = task_fixtures.BAD_TASKS[name]
      futures[name] = pool.submit(_run_bad_task, str(tmp_dir / name), task)
    yield futures
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def _runs(jobs, replicas):
  return jobs[replicas].result()


def _weights(result, which="final"):
  count = len([k for k in result if k.startswith(f"{which}_")])
  return [result[f"{which}_{i}"] for i in range(count)]


def _difference(a, b):
  """Max |a - b| over two lists of weight arrays."""
  assert len(a) == len(b)
  return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


# The reference: one device, the whole global batch, the objective by hand.


def _cross_entropy(labels, logits):
  """-log softmax(logits)[label] of each element."""
  return tf.reduce_logsumexp(logits, -1) - tf.reduce_sum(
      tf.one_hot(labels, tf.shape(logits)[-1]) * logits, -1)


def _mean(per_element, weights):
  """sum(w * l) / sum(w) over the global batch; 0 when sum(w) is 0."""
  return tf.math.divide_no_nan(tf.reduce_sum(weights * per_element),
                               tf.reduce_sum(weights))


def _token_cross_entropy(model, batch):
  tokens, targets, weights = batch
  return _mean(_cross_entropy(targets, model(tokens, training=True)), weights)


def _own_step_objective(model, batch):
  tokens, targets, weights = batch
  logits = model(tokens, training=True)
  penalty = 0.01 * _mean(tf.reduce_mean(logits ** 2, -1), weights)
  return _mean(_cross_entropy(targets, logits), weights) + penalty


def _two_heads_objective(model, batch):
  features, labels, weights = batch
  outputs = model(features, training=True)
  squared_error = tf.reduce_mean((labels["value"] - outputs["value"]) ** 2, -1)
  return (1.0 * _mean(_cross_entropy(labels["label"], outputs["label"]),
                      weights["label"]) +
          0.5 * _mean(squared_error, weights["value"]))


def _zero_weights_objective(model, batch):
  features, targets, weights = batch
  squared_error = tf.reduce_mean((targets - model(features, training=True))
                                 ** 2, -1)
  kernel = model.get_layer("hidden").kernel
  return (_mean(squared_error, weights) +
          task_fixtures.ZeroWeightBatch.L2 * tf.reduce_sum(kernel ** 2))


OBJECTIVES = {"masked_sequences": _token_cross_entropy,
              "own_step": _own_step_objective,
              "two_heads": _two_heads_objective,
              "own_optimizer": _two_heads_objective,
              "zero_weight_batch": _zero_weights_objective}


class _AdamW:
  """AdamW as its paper and Keras define it, by hand: decoupled weight
  decay w -= rate * wd * w first (not on `skip`ped variables), then Adam
  with bias correction (beta_1 0.9, beta_2 0.999, epsilon 1e-7)."""

  def __init__(self, weight_decay, skip):
    self._weight_decay = weight_decay
    self._skip = skip
    self._moments = {}

  def __call__(self, variable, gradient, rate, step):
    m, v = self._moments.get(id(variable), (0.0, 0.0))
    if not self._skip(variable):
      variable.assign_sub(rate * self._weight_decay * variable)
    m = m + (gradient - m) * (1 - 0.9)
    v = v + (gradient ** 2 - v) * (1 - 0.999)
    self._moments[id(variable)] = (m, v)
    t = float(step + 1)
    alpha = rate * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
    variable.assign_sub(m * alpha / (tf.sqrt(v) + 1e-7))


def _sgd(variable, gradient, rate, step):
  del step
  variable.assign_sub(rate * gradient)


def _reference(task_name, initial, *, global_batch_size, epochs,
               shuffle_buffer=SHUFFLE_BUFFER, clip_norm=None,
               boundaries=(), decay=1.0, learning_rate=LEARNING_RATE,
               adamw=False, decay_biases=False):
  """(final weights, steps) of plain SGD (or, with `adamw`, the AdamW of
  task_fixtures.OwnOptimizer, biases not decayed) on one device.

  The data order is dist_train's, rebuilt with tf.data as documented: epoch
  e shuffles with seed `seed * 1_000_003 + e` (pipelines.shuffle_seed), then
  forms padded global batches. tf.data's order also depends on TensorFlow's
  global seed, which dist_train sets to --seed (keras.utils.set_random_seed)
  before it builds the model and the pipeline; so does the reference.
  """
  config = config_lib.Config(model_dir="unused", seed=SEED)
  task = getattr(task_fixtures, task_name)(config)
  keras.utils.set_random_seed(SEED)
  model = task.build_model()
  model.set_weights(initial)
  variables = model.trainable_variables
  dataset = task.build_dataset("train")
  update = (_AdamW(task_fixtures.OwnOptimizer.WEIGHT_DECAY,
                   skip=lambda v: "bias" in v.name and not decay_biases)
            if adamw else _sgd)
  step = 0
  for epoch in range(epochs):
    batches = dataset.shuffle(
        shuffle_buffer, seed=SEED * 1_000_003 + epoch,
        reshuffle_each_iteration=False).padded_batch(global_batch_size)
    for batch in batches:
      with tf.GradientTape() as tape:
        objective = OBJECTIVES[task_name](model, batch)
      gradients = [tf.convert_to_tensor(g)
                   for g in tape.gradient(objective, variables)]
      if clip_norm is not None:
        gradients, _ = tf.clip_by_global_norm(gradients, clip_norm)
      rate = learning_rate * decay ** sum(step >= b for b in boundaries)
      for variable, gradient in zip(variables, gradients):
        update(variable, gradient, rate, step)
      step += 1
  return [w.numpy() for w in model.weights], step


_REFERENCES = {}


def _reference_of(task_name, initial, **kwargs):
  """The reference of a task and settings, computed once per module."""
  key = (task_name, json.dumps(kwargs, sort_keys=True))
  if key not in _REFERENCES:
    _REFERENCES[key] = _reference(task_name, initial, **kwargs)
  return _REFERENCES[key]


def _settings(settings):
  return {"global_batch_size": settings["global_batch_size"],
          "epochs": settings["epochs"]}


def _check_against(reference, runs, names):
  """{name: max weight difference to the reference}; asserts each run took
  the reference's steps and moved its weights far more than the tolerance."""
  weights, steps = reference
  differences = {}
  for name in names:
    run = runs[name]
    assert int(run["global_step"]) == steps, (name, int(run["global_step"]))
    moved = _difference(_weights(run), _weights(run, "initial"))
    assert moved > 100 * TOLERANCE, (name, moved)
    differences[name] = _difference(_weights(run), weights)
    print(f"{name}: max |dist_train - reference| {differences[name]:.2e}, "
          f"moved {moved:.2e}")
  return differences


@pytest.mark.parametrize("replicas", REPLICAS)
@pytest.mark.parametrize("task", list(TASKS))
def test_task_matches_one_device_reference(jobs, task, replicas):
  """Each task on 1, 2 and 3 replicas, with the micro-batches of
  ACCUMULATION."""
  runs = _runs(jobs, replicas)
  names = [f"{task}_{accum}" for accum in ACCUMULATION[replicas]]
  initial = _weights(runs[names[0]], "initial")
  for name in names:  # One seed, one starting point, whatever the layout.
    assert _difference(_weights(runs[name], "initial"), initial) == 0, name
  reference = _reference_of(task, initial, **_settings(TASKS[task]))
  differences = _check_against(reference, runs, names)
  assert max(differences.values()) < TOLERANCE, differences


def test_reference_builds_the_model_dist_train_starts_from(jobs):
  """The seed alone gives dist_train's initial weights (the reference loads
  them from the run, so this only confirms it starts where one device
  would)."""
  config = config_lib.Config(model_dir="unused", seed=SEED)
  for task in TASKS:
    keras.utils.set_random_seed(SEED)
    model = getattr(task_fixtures, task)(config).build_model()
    initial = _weights(_runs(jobs, 1)[f"{task}_1"], "initial")
    assert _difference([w.numpy() for w in model.weights], initial) == 0


def test_gradient_accumulation_with_clipping(jobs):
  """The gradient summed over replicas and micro-batches is clipped once,
  by global norm, as one device clips its gradient."""
  runs = _runs(jobs, 3)
  initial = _weights(runs["clip_2"], "initial")
  settings = _settings(SEQUENCES)
  clipped = _reference_of("masked_sequences", initial, clip_norm=CLIP_NORM,
                          **settings)
  unclipped = _reference_of("masked_sequences", initial, **settings)
  effect = _difference(clipped[0], unclipped[0])
  print(f"clipping changes the reference by {effect:.2e}")
  assert effect > 1e-3, effect
  differences = _check_against(clipped, runs, ["clip_2", "clip_4"])
  assert max(differences.values()) < TOLERANCE, differences


@pytest.mark.parametrize("task", MIXED_TASKS)
def test_gradient_accumulation_with_mixed_float16(jobs, task):
  """A task in mixed_float16: 2 replicas x 1 and 4 micro-batches against 1
  replica (see the module docstring)."""
  one_device, two = _runs(jobs, 1), _runs(jobs, 2)
  float16, float32 = one_device[f"{task}_float16_1"], one_device[f"{task}_1"]
  precision_error = _difference(_weights(float16), _weights(float32))
  float32_error = max(
      _difference(_weights(two[f"{task}_{accum}"]), _weights(float32))
      for accum in ACCUMULATION[2])
  moved = _difference(_weights(float32), _weights(float32, "initial"))
  print(f"float16 vs float32 on 1 replica: {precision_error:.2e} (float32, "
        f"2 vs 1 replica: {float32_error:.2e}; moved {moved:.2e})")
  # Really 16-bit: far beyond float32's rounding. (The sequence model's
  # float16 run stays within 1e-5 of float32 here, so the bound is never
  # under the float32 tolerance.)
  assert precision_error > 100 * float32_error
  bound = min(max(2 * precision_error, TOLERANCE), MIXED_ABSOLUTE_TOLERANCE)
  assert bound < moved / 100  # A scaling error would show.
  for accum in MIXED_ACCUMULATION[2]:
    run = two[f"{task}_float16_{accum}"]
    # No step skipped for an overflow, here or on one replica.
    assert int(run["global_step"]) == int(float16["global_step"]) == 12
    error = _difference(_weights(run), _weights(float16))
    print(f"float16, 2 replicas x {accum} vs 1 replica: {error:.2e}")
    assert error < bound, (accum, error, precision_error)


def test_learning_rate_schedule_counts_optimizer_steps(jobs):
  """With 4 micro-batches the step schedule decays at the same optimizer
  steps as without, and the optimizer counts one step per global batch."""
  runs = _runs(jobs, 2)
  initial = _weights(runs["lr_step_1"], "initial")
  settings = _settings(SEQUENCES)
  scheduled = _reference_of("masked_sequences", initial,
                            boundaries=LR_BOUNDARIES, decay=LR_DECAY,
                            **settings)
  constant = _reference_of("masked_sequences", initial, **settings)
  assert _difference(scheduled[0], constant[0]) > 1e-3  # The decay matters.
  differences = _check_against(scheduled, runs, ["lr_step_1", "lr_step_4"])
  assert max(differences.values()) < TOLERANCE, differences
  assert _difference(_weights(runs["lr_step_1"]),
                     _weights(runs["lr_step_4"])) < TOLERANCE
  assert int(runs["lr_step_4"]["global_step"]) == 12  # 3 epochs of 4 batches.


@pytest.mark.parametrize("replicas", REPLICAS)
def test_task_optimizer_matches_one_device_reference(jobs, replicas):
  """The task's own AdamW, biases excluded from weight decay, on 1, 2 and 3
  replicas with the micro-batches of ACCUMULATION, against AdamW by hand on one device;
  the exclusion and the decay each matter far beyond the tolerance."""
  runs = _runs(jobs, replicas)
  names = [f"own_optimizer_{accum}" for accum in ACCUMULATION[replicas]]
  initial = _weights(runs[names[0]], "initial")
  settings = dict(_settings(TWO_HEADS), learning_rate=OWN_OPTIMIZER_RATE,
                  boundaries=LR_BOUNDARIES, decay=LR_DECAY)
  reference = _reference_of("own_optimizer", initial, adamw=True, **settings)
  differences = _check_against(reference, runs, names)
  assert max(differences.values()) < TOLERANCE, differences
  # Decaying the biases too is another update.
  decayed_biases = _reference_of(
      "own_optimizer", initial, adamw=True, decay_biases=True, **settings)
  assert _difference(decayed_biases[0], reference[0]) > 10 * TOLERANCE


def test_zero_weight_batch_contributes_nothing(jobs):
  """The last global batch has weights summing to 0: its step changes the
  weights by the regularization's gradient only, adds nothing to the loss,
  and leaves no NaN (3 replicas, 2 micro-batches)."""
  runs = _runs(jobs, 3)
  full, dropped = runs["zero_weight_batch"], runs["zero_weight_batch_dropped"]
  assert int(full["global_step"]) == 11 and int(dropped["global_step"]) == 10
  assert all(np.isfinite(w).all() for w in _weights(full))
  # model.weights: hidden kernel (L2 regularized), hidden bias, value kernel
  # and bias. The last step is w -= lr * d(L2 * sum(k ** 2))/dk = 2 * L2 * k.
  expected = _weights(dropped)
  expected[0] = expected[0] * (
      1 - LEARNING_RATE * 2 * task_fixtures.ZeroWeightBatch.L2)
  difference = _difference(_weights(full), expected)
  print(f"zero-weight step vs regularization only: {difference:.2e}")
  assert difference < TOLERANCE, difference
  assert float(full["train_loss"]) == pytest.approx(
      float(dropped["train_loss"]), rel=1e-6)
  reference = _reference_of(
      "zero_weight_batch", _weights(full, "initial"), shuffle_buffer=1,
      **_settings(ZERO_WEIGHTS))
  differences = _check_against(reference, runs, ["zero_weight_batch"])
  assert max(differences.values()) < TOLERANCE, differences


@pytest.mark.parametrize("name", CLI_BAD_TASKS)
def test_unusable_task_stops_with_one_line(jobs, name):
  result = jobs[name].result()
  line = processes.error_line(result)
  assert task_fixtures.BAD_TASKS[name][1] in line, line
  assert result.returncode == 1, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
