"""Step budgets: --train_steps trains endless streams to a global step,
--validation_steps caps validation passes, and a stream resumes exactly.

Every run is compared with a one-device reference written here from the
documented order alone (docs/data.md, "Step budgets"): an endless stream is
`dataset.repeat()` shuffled once with epoch 0's seed (seed * 1_000_003), in
padded global batches, step k reading the k-th; a stream sharded by workers
has worker w batch its own shard the same way with its part of the global
batch (5 + 5 of 10), the global batch of step k being the workers' k-th
batches together; in-memory data is shuffled per epoch (seed * 1_000_003 +
epoch), the run ending inside an epoch at --train_steps. Plain SGD at 0.05
and --lr_schedule=step with its default boundaries at 50% and 75% of
--train_steps (decay 0.5), which a schedule counting epochs would misplace.

Runs (each one process per replica count, or one launch.local cluster):
  * 1, 2 and 3 replicas (tests/helpers/task_parity_run.py): an endless
    stream of 47 sequences (12 steps of 10: shares of 3, 3 and 4, batches
    across the stream's passes, validation 2 batches of an endless stream)
    and 47 in-memory examples (13 steps: 5 + 5 + 3 over 3 epochs);
  * the stream on 2 replicas from the command line, SIGKILLed after a
    checkpoint and resumed; an evaluator beside it, --mode=continuous_eval;
  * 2 workers reading a shard each: uninterrupted; stopped at step 5 (a
    --train_steps of 5) and resumed to step 12; and preempted mid-stream
    (SIGTERM to worker 1, both stop at one step) and resumed to step 12.
"""

import os
import re
import shutil
import signal
import subprocess
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from dist_train import config as config_lib
from dist_train.loop import preemption
from tests.helpers import parity
from tests.helpers import processes
from tests.helpers import stream_fixtures
from tests.helpers import task_fixtures

SEED = 7  # task_parity_run.py's --seed ...
LEARNING_RATE = 0.05  # ... and plain SGD at this rate.
SHUFFLE_BUFFER = 1024
GLOBAL_BATCH_SIZE = 10
STREAM_STEPS = 12
BLOB_STEPS = 13  # 47 examples: 5 steps an epoch, the run ends in the 3rd.
VALIDATION_STEPS = 2
DECAY = 0.5
TOLERANCE = 1e-5
RESUME_TOLERANCE = 1e-6
# Per training example of the stopped runs: 0.3 s a step on 2 replicas, 0.5 s
# on 2 workers (5 examples each), so that they stop mid-run.
SLEEP_S = "0.03"
WORKER_SLEEP_S = "0.1"

STREAM_FLAGS = {"train_steps": STREAM_STEPS,
                "validation_steps": VALIDATION_STEPS,
                "mode": "train_and_evaluate", "eval_every_steps": 6,
                "lr_schedule": "step", "lr_decay_factor": DECAY}
CASES = [
    {"name": "stream", "task": "tests.helpers.stream_fixtures:"
     "RepeatedSequences", "global_batch_size": GLOBAL_BATCH_SIZE,
     "flags": STREAM_FLAGS},
    {"name": "blobs", "task": "tests.helpers.stream_fixtures:InMemoryBlobs",
     "global_batch_size": GLOBAL_BATCH_SIZE,
     "flags": {"train_steps": BLOB_STEPS, "lr_schedule": "step",
               "lr_decay_factor": DECAY}},
]
# The command line of the stream case, as task_parity_run.py configures it.
CLI_FLAGS = [
    f"--global_batch_size={GLOBAL_BATCH_SIZE}", "--epochs=2",
    f"--learning_rate={LEARNING_RATE}", "--optimizer=sgd",
    "--log_every_steps=5", "--steps_per_loop=3", f"--seed={SEED}",
    *(f"--{name}={value}" for name, value in STREAM_FLAGS.items())]
STREAM_CLI = ["--task=tests.helpers.stream_fixtures:RepeatedSequences",
              *CLI_FLAGS]
# At a constant rate: the resumed run changes --train_steps.
SHARDED_CLI = ["--task=tests.helpers.stream_fixtures:ShardedSequences",
               *CLI_FLAGS, "--lr_schedule=constant", processes.NO_HEALTH,
               f"--collective_timeout_s={processes.COLLECTIVE_TIMEOUT_S}"]
STOP_STEP = 5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{replicas: {case: what task_parity_run.py saved}}."""
  tmp_dir = str(tmp_path_factory.mktemp("step_budgets"))
  return {replicas: parity.train_tasks(tmp_dir, CASES, replicas)
          for replicas in (1, 2, 3)}


# The reference: one device, plain SGD, the objective by hand.


def _cross_entropy(labels, logits):
  return tf.reduce_logsumexp(logits, -1) - tf.reduce_sum(
      tf.one_hot(labels, tf.shape(logits)[-1]) * logits, -1)


def _token_sums(model, batch):
  """(sum of w * loss, sum of w) over one batch of sequences."""
  tokens, targets, weights = batch
  losses = _cross_entropy(targets, model(tokens, training=True))
  return tf.reduce_sum(weights * losses), tf.reduce_sum(weights)


def _sequences_objective(model, parts):
  """The token cross-entropy of a global batch given in parts (one per
  worker): sum(w * l) / sum(w) over all of them."""
  sums = [_token_sums(model, part) for part in parts]
  return tf.add_n([s for s, _ in sums]) / tf.add_n([w for _, w in sums])


def _blobs_objective(model, parts):
  [(features, labels)] = parts
  return tf.reduce_mean(_cross_entropy(labels, model(features,
                                                     training=True)))


def _train_reference(task, initial, global_batches, objective_fn, steps,
                     decay=DECAY):
  keras.utils.set_random_seed(SEED)
  model = task.build_model()
  model.set_weights(initial)
  boundaries = (steps // 2, 3 * steps // 4)
  taken = 0
  for step, parts in enumerate(global_batches):
    with tf.GradientTape() as tape:
      objective = objective_fn(model, parts)
    gradients = tape.gradient(objective, model.trainable_variables)
    rate = LEARNING_RATE * decay ** sum(step >= b for b in boundaries)
    for variable, gradient in zip(model.trainable_variables, gradients):
      variable.assign_sub(rate * tf.convert_to_tensor(gradient))
    taken += 1
  assert taken == steps
  return model


def _stream(dataset, batch_size):
  """The documented order of an endless stream."""
  return dataset.repeat().shuffle(
      SHUFFLE_BUFFER, seed=SEED * 1_000_003,
      reshuffle_each_iteration=False).padded_batch(batch_size)


def _task(cls):
  return cls(config_lib.Config(model_dir="unused", seed=SEED))


def _stream_reference(initial, decay=DECAY):
  keras.utils.set_random_seed(SEED)
  task = _task(stream_fixtures.RepeatedSequences)
  batches = _stream(task.build_dataset("train"), GLOBAL_BATCH_SIZE).take(
      STREAM_STEPS)
  return _train_reference(task, initial, ([b] for b in batches),
                          _sequences_objective, STREAM_STEPS, decay=decay)


def _sharded_reference(initial, num_workers=2):
  keras.utils.set_random_seed(SEED)
  task = _task(stream_fixtures.ShardedSequences)
  one_pass = task_fixtures.MaskedSequences.build_dataset(task, "train")
  shards = [_stream(one_pass.shard(num_workers, w),
                    GLOBAL_BATCH_SIZE // num_workers).take(STREAM_STEPS)
            for w in range(num_workers)]
  return _train_reference(task, initial, zip(*shards), _sequences_objective,
                          STREAM_STEPS, decay=1.0)


def _blobs_reference(initial):
  keras.utils.set_random_seed(SEED)
  task = _task(stream_fixtures.InMemoryBlobs)
  examples = tf.data.Dataset.from_tensor_slices(
      task.build_dataset("train").examples)
  epochs = [examples.shuffle(SHUFFLE_BUFFER, seed=SEED * 1_000_003 + epoch,
                             reshuffle_each_iteration=False).batch(
                                 GLOBAL_BATCH_SIZE) for epoch in range(3)]
  batches = epochs[0].concatenate(epochs[1]).concatenate(epochs[2]).take(
      BLOB_STEPS)
  return _train_reference(task, initial, ([b] for b in batches),
                          _blobs_objective, BLOB_STEPS)


def _validation_loss(model):
  """The first VALIDATION_STEPS global batches of the endless validation
  stream, in order: sum(w * l) / sum(w) over all of them."""
  batches = _task(stream_fixtures.RepeatedSequences).build_dataset(
      "validation").padded_batch(GLOBAL_BATCH_SIZE).take(VALIDATION_STEPS)
  sums = [_token_sums(model, batch) for batch in batches]
  return float(tf.add_n([s for s, _ in sums]) / tf.add_n([w for _, w in sums]))


def _numbered(result, prefix):
  names = sorted((k for k in result if k.startswith(prefix)),
                 key=lambda k: int(k[len(prefix):]))
  return [result[k] for k in names]


def _final(result):
  return _numbered(result, "final_")


def _initial(result):
  return _numbered(result, "initial_")


def _difference(a, b):
  assert len(a) == len(b)
  return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def _checked_against(reference, result, what):
  """Asserts the run took the reference's steps and moved its weights far
  more than the tolerance; returns the largest weight difference."""
  final, initial = _final(result), _initial(result)
  expected = [w.numpy() for w in reference.weights]
  moved = _difference(expected, initial)
  difference = _difference(final, expected)
  print(f"{what}: max |dist_train - reference| {difference:.2e}, weights "
        f"moved {moved:.2e}")
  assert moved > 100 * TOLERANCE
  return difference


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_endless_stream_trains_to_train_steps_as_one_device(runs, replicas):
  result = runs[replicas]["stream"]
  assert int(result["global_step"]) == STREAM_STEPS
  reference = _stream_reference(_initial(runs[1]["stream"]))
  assert _checked_against(reference, result,
                          f"stream, {replicas} replica(s)") <= TOLERANCE


def test_validation_steps_cap_an_endless_validation_stream(runs):
  """The last validation pass read the first 2 global batches of the
  endless validation stream with the final weights."""
  reference = _stream_reference(_initial(runs[1]["stream"]))
  expected = _validation_loss(reference)
  for replicas, cases in runs.items():
    loss = float(cases["stream"]["validation_loss"])
    print(f"{replicas} replica(s): validation loss {loss:.6f}, reference "
          f"{expected:.6f}")
    assert abs(loss - expected) <= TOLERANCE


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_in_memory_data_with_train_steps_is_one_devices(runs, replicas):
  result = runs[replicas]["blobs"]
  assert int(result["global_step"]) == BLOB_STEPS
  reference = _blobs_reference(_initial(runs[1]["blobs"]))
  assert _checked_against(reference, result,
                          f"in memory, {replicas} replica(s)") <= TOLERANCE


# Stopped and resumed.


def _checkpoint_weights(model_dir, num_weights):
  step, values = parity.checkpoint_values(str(model_dir))
  return step, [values[f"optimizer/_trainable_variables/{i}/.ATTRIBUTES/"
                       "VARIABLE_VALUE"] for i in range(num_weights)]


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
  """The stream on 2 replicas from the command line, SIGKILLed after its
  checkpoint of step 6 and resumed: (model_dir, the resume's stderr)."""
  model_dir = tmp_path_factory.mktemp("killed") / "run"
  flags = [*STREAM_CLI, "--cpu_replicas=2", "--checkpoint_every_steps=2",
           f"--model_dir={model_dir}"]
  process = subprocess.Popen(
      [*processes.python_command(), "-m", "dist_train.main", *flags],
      cwd=processes.REPO_ROOT,
      env=processes.subprocess_env({"STREAM_FIXTURE_SLEEP_S": SLEEP_S}),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  # The state file names a checkpoint only once it is complete: a kill right
  # after ckpt-6 was written may resume from ckpt-4.
  processes.wait_for_checkpoint(process, model_dir, 6)
  process.send_signal(signal.SIGKILL)
  process.communicate(timeout=60)
  assert process.returncode == -signal.SIGKILL
  result = processes.run_cli(*flags, check=True)
  return model_dir, result.stderr


def test_killed_stream_resumes_with_the_next_batch(runs, killed_and_resumed):
  model_dir, log = killed_and_resumed
  resumed_step = int(log.split("Resuming at step ")[1].split()[0])
  assert 4 <= resumed_step < STREAM_STEPS, log[-3000:]
  assert f"Resuming at step {resumed_step} of {STREAM_STEPS}" in log
  # An epoch-less run logs and summarises by step.
  assert "training done at step 12 | train " in log
  assert not re.search(r"epoch \d+/\d+", log), log[-3000:]
  uninterrupted = runs[2]["stream"]
  step, weights = _checkpoint_weights(model_dir,
                                      len(_final(uninterrupted)))
  assert step == STREAM_STEPS
  difference = _difference(weights, _final(uninterrupted))
  print(f"2 replicas, killed and resumed at step {resumed_step}: max "
        f"difference from the uninterrupted run {difference:.2e}")
  assert difference <= RESUME_TOLERANCE


def test_continuous_eval_stops_after_the_checkpoint_of_train_steps(
    killed_and_resumed, tmp_path):
  """Without training_done.json, only --train_steps tells the evaluator the
  run's last step; it does not wait for --eval_timeout_s."""
  model_dir = tmp_path / "run"
  shutil.copytree(killed_and_resumed[0], model_dir)
  os.remove(model_dir / "training_done.json")
  start = time.monotonic()
  result = processes.run_cli(*STREAM_CLI, f"--model_dir={model_dir}",
                             "--mode=continuous_eval", "--eval_timeout_s=120",
                             check=True)
  assert (f"Evaluated the final checkpoint (step {STREAM_STEPS}); done" in
          result.stderr), result.stderr[-3000:]
  assert time.monotonic() - start < 100


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
  """The sharded stream on 2 workers: {"uninterrupted": model_dir,
  "resumed": model_dir}, the second stopped at step STOP_STEP by a
  --train_steps of STOP_STEP and resumed to STREAM_STEPS (allowed: at a
  constant rate the change does not change the updates)."""
  tmp_dir = tmp_path_factory.mktemp("two_workers")
  uninterrupted = tmp_dir / "uninterrupted"
  launch = processes.Launch(2, [*SHARDED_CLI, f"--model_dir={uninterrupted}"])
  assert launch.wait(timeout=300) == 0, launch.output[-6000:]

  stopped = tmp_dir / "stopped"
  launch = processes.Launch(2, [*SHARDED_CLI, f"--model_dir={stopped}",
                                f"--train_steps={STOP_STEP}"])
  assert launch.wait(timeout=300) == 0, launch.output[-6000:]
  resumed = processes.Launch(2, [*SHARDED_CLI, f"--model_dir={stopped}",
                                 "--allow_config_change"])
  assert resumed.wait(timeout=300) == 0, resumed.output[-6000:]
  assert f"Resuming at step {STOP_STEP} of {STREAM_STEPS}" in resumed.output
  assert "Resuming with a changed option --train_steps: 5 -> 12" in (
      resumed.output)
  return {"uninterrupted": uninterrupted, "resumed": stopped}


def _initial_sharded_weights():
  keras.utils.set_random_seed(SEED)
  model = _task(stream_fixtures.ShardedSequences).build_model()
  return [w.numpy() for w in model.weights]


def test_sharded_stream_on_two_workers_matches_its_reference(two_workers):
  """Each update uses the examples the documented order gives 2 workers."""
  initial = _initial_sharded_weights()
  reference = _sharded_reference(initial)
  step, weights = _checkpoint_weights(two_workers["uninterrupted"],
                                      len(initial))
  assert step == STREAM_STEPS
  expected = [w.numpy() for w in reference.weights]
  assert _difference(expected, initial) > 100 * TOLERANCE
  difference = _difference(weights, expected)
  print(f"2 workers, sharded stream: max |dist_train - reference| "
        f"{difference:.2e}")
  assert difference <= TOLERANCE
  # The order depends on the worker count: one stream read whole differs.
  whole = _stream_reference(initial, decay=1.0)
  assert _difference([w.numpy() for w in whole.weights], expected) > (
      100 * TOLERANCE)


def _assert_ends_as_the_uninterrupted_run(model_dir, two_workers, run):
  """model_dir's last checkpoint is of step STREAM_STEPS, with the weights of
  the uninterrupted 2-worker run (within RESUME_TOLERANCE)."""
  num_weights = len(_initial_sharded_weights())
  _, expected = _checkpoint_weights(two_workers["uninterrupted"], num_weights)
  final_step, weights = _checkpoint_weights(model_dir, num_weights)
  assert final_step == STREAM_STEPS
  difference = _difference(weights, expected)
  print(f"{run}: max difference from the uninterrupted run "
        f"{difference:.2e}")
  assert difference <= RESUME_TOLERANCE


def test_sharded_stream_stopped_and_resumed_on_two_workers(two_workers):
  _assert_ends_as_the_uninterrupted_run(
      two_workers["resumed"], two_workers,
      f"2 workers, stopped at step {STOP_STEP} and resumed")


def test_sharded_stream_preempted_on_one_worker_resumes_on_two_workers(
    two_workers, tmp_path):
  """SIGTERM to worker 1 while both read slowly: both save at one step and
  exit 75, and the resumed run ends with the uninterrupted run's weights
  (each worker's shard rebuilt and skipped to that step)."""
  model_dir = tmp_path / "run"
  flags = [*SHARDED_CLI, f"--model_dir={model_dir}"]
  launch = processes.Launch(
      2, flags, env_overrides={"STREAM_FIXTURE_SLEEP_S": WORKER_SLEEP_S})
  launch.wait_for_line(rf"step 5/{STREAM_STEPS} ", timeout=240)
  os.kill(launch.worker_pids()[1], signal.SIGTERM)
  assert launch.wait(timeout=120) == preemption.EXIT_PREEMPTED, (
      launch.output[-6000:])
  step = launch.stop_step("preempted by SIGTERM")
  assert 5 <= step < STREAM_STEPS, launch.output[-6000:]

  resumed = processes.Launch(2, flags)
  assert resumed.wait(timeout=300) == 0, resumed.output[-6000:]
  assert f"Resuming at step {step} of {STREAM_STEPS}" in resumed.output
  _assert_ends_as_the_uninterrupted_run(
      model_dir, two_workers,
      f"2 workers, SIGTERM to worker 1, stopped at step {step} and resumed")


def test_resume_cost_script_resumes_where_a_saved_iterator_does(tmp_path):
  """scripts/resume_cost.py, small: skipping 30 global batches of a TFRecord
  stream gives the batch a restored tf.data iterator state gives."""
  output = tmp_path / "resume_cost.md"
  processes.run_python(
      ["scripts/resume_cost.py", "--resume_step=30", "--repetitions=1",
       "--examples=400", f"--output={output}"], check=True)
  report = output.read_text()
  assert "| resume at step 30 by skipping (dist_train) |" in report
  assert "Both resume with the same batch: True." in report
