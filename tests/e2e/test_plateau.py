"""--lr_schedule=plateau cuts the rate at the same step on every layout.

One run each on 1 replica, 2 replicas and 2 workers, validating every 4
steps. The watched metric is the validation loss with --best_mode=max, so
that a falling loss counts as "not improving" and the rule cuts several
times in 38 steps. The test replays the rule itself (best so far, a count
of evaluations without an improvement, a cut by the factor at the patience,
never below --lr_min) on the validation losses the 1-replica run wrote to
TensorBoard, and checks that every layout's `learning_rate` curve shows
each cut at that step, and that the checkpoint holds the rule's state.
"""

import concurrent.futures
import os

import pytest
import tensorflow as tf

from dist_train.outputs import summaries
from tests.helpers import processes

RATE, FACTOR, PATIENCE, LR_MIN = 0.05, 0.5, 2, 0.01
TOTAL_STEPS = 38
FLAGS = ["--dataset=synthetic", "--num_train_examples=600",
         "--num_validation_examples=96", "--global_batch_size=32",
         "--epochs=2", f"--learning_rate={RATE}", "--hidden_units=16",
         "--log_every_steps=2", "--steps_per_loop=2", "--eval_every_steps=4",
         "--lr_schedule=plateau", "--best_metric=loss", "--best_mode=max",
         f"--lr_plateau_patience={PATIENCE}",
         f"--lr_plateau_factor={FACTOR}", f"--lr_min={LR_MIN}",
         processes.NO_HEALTH]


def _replicas(model_dir, replicas):
  processes.run_cli(*FLAGS, f"--cpu_replicas={replicas}",
                    f"--model_dir={model_dir}", check=True, timeout=600)
  return model_dir


def _workers(model_dir):
  launch = processes.Launch(2, [*FLAGS, f"--model_dir={model_dir}"])
  assert launch.wait(timeout=600) == 0, launch.output[-6000:]
  return model_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("plateau")
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    futures = {"workers": pool.submit(_workers, str(root / "workers")),
               1: pool.submit(_replicas, str(root / "one"), 1),
               2: pool.submit(_replicas, str(root / "two"), 2)}
    return {name: future.result() for name, future in futures.items()}


def _scalars(model_dir, split):
  return summaries.read_scalars(os.path.join(model_dir, split))


def expected_rates(validation_losses):
  """{step: rate after the evaluation at that step} by the rule, replayed."""
  rate, best, wait, rates = RATE, None, 0, {}
  for step, loss in validation_losses:
    if best is None or loss > best:  # --best_mode=max.
      best, wait = loss, 0
    else:
      wait += 1
      if wait >= PATIENCE:
        wait, rate = 0, max(rate * FACTOR, LR_MIN)
    rates[step] = rate
  return rates


def _rate_at(rates, step):
  """The rate of the steps after `step`: that of the last evaluation
  before it."""
  done = [s for s in rates if s < step]
  return rates[max(done)] if done else RATE


@pytest.mark.parametrize("layout", [1, 2, "workers"])
def test_learning_rate_is_cut_at_the_same_steps(runs, layout):
  losses = _scalars(runs[1], "validation")["loss"]
  assert [s for s, _ in losses] == list(range(4, TOTAL_STEPS, 4)) + [
      TOTAL_STEPS]
  rates = expected_rates(losses)
  cuts = sorted(s for s in rates if rates[s] < _rate_at(rates, s))
  print(f"cuts after the evaluations of steps {cuts}")
  assert len(cuts) >= 3  # Several cuts, down to --lr_min.
  assert min(rates.values()) == pytest.approx(LR_MIN)
  logged = _scalars(runs[layout], "train")["learning_rate"]
  assert len(logged) == TOTAL_STEPS // 2
  for step, rate in logged:
    assert rate == pytest.approx(_rate_at(rates, step), rel=1e-6), (
        layout, step, rate)


def test_checkpoint_holds_the_rule_state(runs):
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(
      os.path.join(runs[2], "checkpoints")))
  scale = float(reader.get_tensor(
      "lr_scale/.ATTRIBUTES/VARIABLE_VALUE"))
  losses = _scalars(runs[1], "validation")["loss"]
  assert scale * RATE == pytest.approx(
      expected_rates(losses)[TOTAL_STEPS], rel=1e-6)
  assert float(reader.get_tensor(
      "lr_plateau_best/.ATTRIBUTES/VARIABLE_VALUE")) == pytest.approx(
          max(loss for _, loss in losses), rel=1e-5)
