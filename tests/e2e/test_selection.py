"""Validation every N steps and the best model, through SIGTERM and a resume.

One real run, on the command line: synthetic data, 330 examples in global
batches of 32 (11 steps an epoch, the last with 10 examples), a validation
pass every 4 steps, best/ kept by validation loss. It is stopped by SIGTERM
after its second epoch and resumed with a learning rate so large that
validation gets worse: best/ must keep the model of the first part. Beside
the resume, an evaluator (--mode=continuous_eval) runs on a copy of the
preempted run, which will never write another checkpoint: it must evaluate
the latest one once and give up after --eval_timeout_s. A second evaluator
runs on another copy, to which training_done.json (a trainer's last write) is
added after it evaluated the latest checkpoint, as when a run stops early: it
must stop then, without waiting for its timeout.
"""

import concurrent.futures
import json
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

from dist_train.data import mnist
from dist_train.loop import preemption
from dist_train.outputs import summaries
from tests.helpers import processes

EVAL_EVERY = 4
STEPS_PER_EPOCH = 11  # 330 examples in global batches of 32.
DATA = dict(dataset="synthetic", num_train_examples=330,
            num_validation_examples=200, seed=0)
RUN_FLAGS = ["--dataset=synthetic", "--num_train_examples=330",
             "--num_validation_examples=200", "--global_batch_size=32",
             "--optimizer=sgd", "--learning_rate=0.05", "--steps_per_loop=3",
             "--log_every_steps=100", f"--eval_every_steps={EVAL_EVERY}",
             "--cpu_replicas=1"]
# The trainers keep best/; the evaluator does not (one writer of best/).
TRAIN_FLAGS = [*RUN_FLAGS, "--best_metric=loss"]
# The continuation: steps of global norm 3 (the gradient clipped to 1).
# A deliberate change of what the run computes: allowed explicitly.
WORSE_FLAGS = ["--learning_rate=3", "--clip_norm=1", "--allow_config_change"]
EVAL_TIMEOUT_S = 5


def _best(model_dir):
  """(metrics.json, {variable: value} of best/ckpt) of a run."""
  best_dir = os.path.join(model_dir, "best")
  with open(os.path.join(best_dir, "metrics.json")) as f:
    metrics = json.load(f)
  reader = tf.train.load_checkpoint(os.path.join(best_dir, "ckpt"))
  weights = {name: reader.get_tensor(name)
             for name in reader.get_variable_to_shape_map()
             if name != "_CHECKPOINTABLE_OBJECT_GRAPH"}
  return metrics, weights


def _validation(model_dir):
  return summaries.read_scalars(os.path.join(model_dir, "validation"))


def _expected_eval_steps(final_step):
  steps = list(range(EVAL_EVERY, final_step + 1, EVAL_EVERY))
  return steps if steps[-1] == final_step else steps + [final_step]


def _sigterm_after_epoch_2(model_dir, log_path):
  """Starts a run of 200 epochs, sends SIGTERM once epoch 2 is saved;
  returns (exit code, the step it saved)."""
  with open(log_path, "w") as log:
    process = subprocess.Popen(
        [*processes.python_command(), "-m", "dist_train.main", *TRAIN_FLAGS, "--epochs=200",
         f"--model_dir={model_dir}"],
        cwd=processes.REPO_ROOT, env=processes.subprocess_env(),
        stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
      processes.wait_for_checkpoint(process, model_dir, 2 * STEPS_PER_EPOCH)
      process.send_signal(signal.SIGTERM)
      process.wait(timeout=120)
    finally:
      if process.poll() is None:
        process.kill()
        process.wait()
  with open(log_path) as f:
    output = f.read()
  # A SIGTERM during a validation pass saves the trained step without it.
  saved = re.search(r"preempted by SIGTERM: saved the checkpoint to \S+ at "
                    r"step (\d+)[;,]", output)
  assert saved, output[-3000:]
  return process.returncode, int(saved.group(1)), output


def _evaluate_until_timeout(model_dir):
  """The evaluator on a preempted run; returns (result, seconds)."""
  start = time.monotonic()
  result = processes.run_cli(*RUN_FLAGS, "--epochs=200",
                            f"--model_dir={model_dir}",
                            "--mode=continuous_eval",
                            f"--eval_timeout_s={EVAL_TIMEOUT_S}")
  return result, time.monotonic() - start


def _evaluate_until_training_done(model_dir, log_path, final_step):
  """The evaluator on a run that writes training_done.json only after the
  evaluator evaluated its last checkpoint; returns (exit code, output,
  seconds from training_done.json to the evaluator's exit)."""
  def output():
    with open(log_path) as f:
      return f.read()
  with open(log_path, "w") as log:
    process = subprocess.Popen(
        [*processes.python_command(), "-m", "dist_train.main", *RUN_FLAGS, "--epochs=200",
         f"--model_dir={model_dir}", "--mode=continuous_eval",
         "--eval_timeout_s=120"],
        cwd=processes.REPO_ROOT, env=processes.subprocess_env(),
        stdout=log, stderr=subprocess.STDOUT)
    try:
      deadline = time.monotonic() + 240
      while "Evaluated " not in output():
        assert process.poll() is None, output()[-3000:]
        assert time.monotonic() < deadline, output()[-3000:]
        time.sleep(0.2)
      time.sleep(3)  # It waits for a newer checkpoint meanwhile.
      with open(os.path.join(model_dir, "training_done.json"), "w") as f:
        json.dump({"global_step": final_step, "stopped_early": "a test"}, f)
      written = time.monotonic()
      process.wait(timeout=180)
      seconds = time.monotonic() - written
    finally:
      if process.poll() is None:
        process.kill()
        process.wait()
  return process.returncode, output(), seconds


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("selection")
  model_dir = str(root / "run")
  returncode, saved_step, first_log = _sigterm_after_epoch_2(
      model_dir, str(root / "first.log"))
  assert returncode == preemption.EXIT_PREEMPTED, first_log[-3000:]
  first = {"saved_step": saved_step, "validation": _validation(model_dir),
           "best": _best(model_dir), "log": first_log}

  # A copy of the preempted run as it is: no training_done.json, and a save
  # in progress (TensorFlow writes into ckpt-<step>_temp* and renames), as if
  # a trainer were writing its next checkpoint.
  stalled_dir = str(root / "stalled")
  shutil.copytree(model_dir, stalled_dir)
  in_progress = os.path.join(stalled_dir, "checkpoints",
                             f"ckpt-{saved_step + 1}_temp_0123456789abcdef")
  os.makedirs(in_progress)
  ending_dir = str(root / "ending")
  shutil.copytree(model_dir, ending_dir)

  # Resumed for at least one more epoch, ending at a step that is not a
  # multiple of EVAL_EVERY.
  epochs = saved_step // STEPS_PER_EPOCH + 2
  if (epochs * STEPS_PER_EPOCH) % EVAL_EVERY == 0:
    epochs += 1
  with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
    stalled = pool.submit(_evaluate_until_timeout, stalled_dir)
    ending = pool.submit(_evaluate_until_training_done, ending_dir,
                         str(root / "ending.log"), saved_step)
    resumed = processes.run_cli(*TRAIN_FLAGS, *WORSE_FLAGS, f"--epochs={epochs}",
                               f"--model_dir={model_dir}")
    stalled_result, stalled_seconds = stalled.result()
    ending_returncode, ending_output, ending_seconds = ending.result()
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  return {"model_dir": model_dir, "first": first,
          "final_step": epochs * STEPS_PER_EPOCH, "resumed": resumed,
          "stalled": {"model_dir": stalled_dir, "result": stalled_result,
                      "seconds": stalled_seconds, "in_progress": in_progress},
          "ending": {"model_dir": ending_dir, "returncode": ending_returncode,
                     "output": ending_output, "seconds": ending_seconds}}


def test_validation_runs_every_n_steps_and_at_the_last_step(run):
  first = run["first"]
  # A SIGTERM that arrives during a validation pass abandons it: the step is
  # saved without it, and that --eval_every_steps validation is not redone.
  skipped = ({first["saved_step"]} if "leaving out its unfinished validation"
             in first["log"] else set())
  # Before SIGTERM: every 4 steps up to the step it saved.
  assert [step for step, _ in first["validation"]["loss"]] == [
      step for step in range(EVAL_EVERY, first["saved_step"] + 1, EVAL_EVERY)
      if step not in skipped]
  # The whole run: every 4 steps and its last step, once each, although
  # loops are 3 steps long and epochs 11: loops end at those steps.
  validation = _validation(run["model_dir"])
  expected = [step for step in _expected_eval_steps(run["final_step"])
              if step not in skipped]
  print(f"validation steps: {expected}")
  for tag in ("loss", "accuracy"):
    assert [step for step, _ in validation[tag]] == expected, tag
  logged = [int(step) for step in re.findall(
      r"validation at step (\d+) \|", first["log"] + run["resumed"].stderr)]
  assert logged == expected


def test_best_holds_the_best_value_tensorboard_shows(run):
  metrics, _ = _best(run["model_dir"])
  losses = _validation(run["model_dir"])["loss"]
  best_step, best_loss = min(losses, key=lambda item: item[1])
  print(f"best/metrics.json: loss {metrics['value']:.6f} at step "
        f"{metrics['global_step']}; TensorBoard's minimum: {best_loss:.6f} at "
        f"step {best_step}")
  assert metrics["metric"] == "loss" and metrics["mode"] == "min"
  assert metrics["global_step"] == best_step
  # TensorBoard holds float32; the metric is a float32 result too.
  assert metrics["value"] == pytest.approx(best_loss, rel=1e-7, abs=0)
  accuracy = dict(_validation(run["model_dir"])["accuracy"])[best_step]
  assert metrics["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-7)


def test_best_model_reproduces_its_metrics(run):
  metrics, _ = _best(run["model_dir"])
  model = keras.saving.load_model(
      os.path.join(run["model_dir"], "best", "model.keras"))
  features, labels = mnist.load_splits(**DATA).validation.examples
  logits = model.predict(features, batch_size=len(labels), verbose=0)
  loss = float(np.mean(keras.ops.convert_to_numpy(
      keras.losses.sparse_categorical_crossentropy(labels, logits,
                                                   from_logits=True))))
  accuracy = float(np.mean(np.argmax(logits, axis=-1) == labels))
  print(f"best/model.keras on the validation split: loss {loss:.6f} "
        f"accuracy {accuracy:.4f}; metrics.json: loss "
        f"{metrics['metrics']['loss']:.6f} accuracy "
        f"{metrics['metrics']['accuracy']:.4f}")
  assert abs(loss - metrics["metrics"]["loss"]) < 1e-5
  assert abs(accuracy - metrics["metrics"]["accuracy"]) < 1e-5


def test_a_worse_continuation_keeps_the_better_model(run):
  first, model_dir = run["first"], run["model_dir"]
  assert f"Resuming at step {first['saved_step']} " in run["resumed"].stderr
  first_metrics, first_weights = first["best"]
  assert first_metrics["global_step"] <= first["saved_step"]
  resumed_losses = [loss for step, loss in _validation(model_dir)["loss"]
                    if step > first["saved_step"]]
  print(f"best loss {first_metrics['value']:.4f} before SIGTERM; validation "
        f"loss after the resume: {min(resumed_losses):.4f} to "
        f"{max(resumed_losses):.4f}")
  assert min(resumed_losses) > first_metrics["value"]
  assert "New best" not in run["resumed"].stderr
  metrics, weights = _best(model_dir)
  assert metrics == first_metrics
  assert weights.keys() == first_weights.keys()
  for name, value in weights.items():
    np.testing.assert_array_equal(value, first_weights[name], err_msg=name)


def test_evaluator_gives_up_after_the_timeout(run):
  stalled = run["stalled"]
  result, model_dir = stalled["result"], stalled["model_dir"]
  assert result.returncode == 0, result.stderr[-3000:]
  saved_step = run["first"]["saved_step"]
  evaluated = re.findall(r"Evaluated (\S+) \|", result.stderr)
  assert evaluated == [os.path.join(model_dir, "checkpoints",
                                    f"ckpt-{saved_step}")], result.stderr
  assert f"No new checkpoint for {EVAL_TIMEOUT_S}s; done" in result.stderr
  with open(os.path.join(model_dir, "eval_results.json")) as f:
    assert json.load(f)["global_step"] == saved_step
  eval_steps = [step for step, _ in summaries.read_scalars(
      os.path.join(model_dir, "eval"))["loss"]]
  assert eval_steps == [saved_step]
  print(f"evaluator on a stalled run: 1 evaluation, done after "
        f"{stalled['seconds']:.0f}s in all (timeout {EVAL_TIMEOUT_S}s)")
  # It reads checkpoints and never touches a save in progress.
  assert os.path.isdir(stalled["in_progress"])


def test_evaluator_stops_when_the_run_ends_at_a_checkpoint_it_evaluated(run):
  ending = run["ending"]
  assert ending["returncode"] == 0, ending["output"][-3000:]
  saved_step = run["first"]["saved_step"]
  assert len(re.findall(r"Evaluated \S+ \|", ending["output"])) == 1
  assert (f"Evaluated the final checkpoint (step {saved_step}); done"
          in ending["output"]), ending["output"][-3000:]
  print(f"evaluator: done {ending['seconds']:.1f}s after training_done.json "
        "(timeout 120s)")
  assert ending["seconds"] < 30
