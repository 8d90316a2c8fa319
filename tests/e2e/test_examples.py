"""The example tasks (examples/char_lm.py, mnist_two_heads.py) train
on 2 CPU replicas, report their own metrics in the RunResult, TensorBoard and
eval_results.json, and compute what they claim to."""

import json
import os

import pytest

from dist_train.outputs import summaries
from examples import char_lm
from examples import mnist_two_heads
from tests.helpers import processes

# Trains through the Python API in its own process (one device layout per
# process) and prints the RunResult's position and metrics as JSON.
_TRAIN_SCRIPT = """
import json, sys
from dist_train import config, train
result = train.train_and_evaluate(config.Config(**json.loads(sys.argv[1])))
print(json.dumps({"global_step": result.global_step,
                  "train": result.train_metrics,
                  "validation": result.validation_metrics}))
"""

CHAR_LM = dict(task="examples.char_lm:task", num_train_examples=640,
               num_validation_examples=128, global_batch_size=32, epochs=1,
               optimizer="adam", learning_rate=0.003, log_every_steps=5,
               cpu_replicas=2)
TWO_HEADS = dict(task="examples.mnist_two_heads:task",
                 num_train_examples=512, num_validation_examples=200,
                 global_batch_size=64, epochs=1, optimizer="adam",
                 learning_rate=0.001, log_every_steps=4, cpu_replicas=2)


def _train(options, model_dir) -> dict:
  result = processes.run_python(
      ["-c", _TRAIN_SCRIPT, json.dumps({**options, "model_dir": model_dir})],
      check=True, prewarmed=True)
  return json.loads(result.stdout.strip().splitlines()[-1])


def _evaluate(options, model_dir) -> dict:
  flags = [f"--{name}={value}" for name, value in options.items()]
  processes.run_cli(*flags, f"--model_dir={model_dir}", "--mode=evaluate",
                   check=True)
  with open(os.path.join(model_dir, "eval_results.json")) as f:
    return json.load(f)


def _last_values(model_dir, split) -> dict:
  return {tag: values[-1][1] for tag, values in
          summaries.read_scalars(os.path.join(model_dir, split)).items()}


@pytest.fixture(scope="module")
def char_lm_run(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("char_lm") / "run")
  return model_dir, _train(CHAR_LM, model_dir)


@pytest.fixture(scope="module")
def two_heads_run(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("two_heads") / "run")
  return model_dir, _train(TWO_HEADS, model_dir)


def test_char_lm_reports_its_metrics_by_name(char_lm_run):
  model_dir, result = char_lm_run
  assert result["global_step"] == 20  # 640 lines in batches of 32.
  names = {"loss", "token_accuracy", "perplexity"}
  assert set(result["train"]) == names
  assert set(result["validation"]) == names
  train = _last_values(model_dir, "train")
  validation = _last_values(model_dir, "validation")
  assert {"train/token_accuracy", "train/perplexity"} <= {
      f"train/{tag}" for tag in train}
  for name in names:
    assert validation[name] == pytest.approx(result["validation"][name],
                                             rel=1e-6)
  assert 0 < validation["token_accuracy"] < 1


def test_char_lm_beats_the_unigram_baseline_after_20_steps(char_lm_run):
  _, result = char_lm_run
  task = char_lm.CharLMTask(
      max_train_lines=CHAR_LM["num_train_examples"],
      max_validation_lines=CHAR_LM["num_validation_examples"])
  _, unigram_perplexity = task.baseline()
  assert result["validation"]["perplexity"] < 0.8 * unigram_perplexity


def test_char_lm_evaluate_writes_its_metrics(char_lm_run):
  model_dir, result = char_lm_run
  written = _evaluate(CHAR_LM, model_dir)
  assert written["global_step"] == 20
  for name in ("loss", "token_accuracy", "perplexity"):
    assert written[name] == pytest.approx(result["validation"][name],
                                          rel=1e-5)


def test_two_heads_report_each_output_by_name(two_heads_run):
  model_dir, result = two_heads_run
  assert result["global_step"] == 8  # 512 digits in batches of 64.
  names = {"loss", "digit_loss", "ink_loss", "digit_accuracy", "ink_mae"}
  assert set(result["train"]) == names
  assert set(result["validation"]) == names
  validation = result["validation"]
  weights = mnist_two_heads.MnistTwoHeadsTask.loss_weights
  assert validation["loss"] == pytest.approx(
      weights["digit"] * validation["digit_loss"] +
      weights["ink"] * validation["ink_loss"], rel=1e-5)
  assert {"digit_accuracy", "ink_mae"} <= set(_last_values(model_dir,
                                                           "train"))
  written = _last_values(model_dir, "validation")
  for name in names:
    assert written[name] == pytest.approx(validation[name], rel=1e-6)


def test_two_heads_evaluate_writes_both_outputs_metrics(two_heads_run):
  model_dir, result = two_heads_run
  written = _evaluate(TWO_HEADS, model_dir)
  assert written["global_step"] == 8
  for name in ("digit_accuracy", "ink_mae", "digit_loss", "ink_loss"):
    assert written[name] == pytest.approx(result["validation"][name],
                                          rel=1e-5)


_GRU_SCRIPT = """
import json, sys
import keras
from dist_train import config, train
from examples import char_lm

class GruCharLM(char_lm.CharLMTask):
  def build_model(self):
    tokens = keras.Input(shape=(None,), dtype="int32")
    x = keras.layers.Dense(16, use_bias=False)(
        keras.ops.one_hot(tokens, char_lm.VOCAB_SIZE))
    x = keras.layers.GRU(32, return_sequences=True)(x)
    return keras.Model(tokens, keras.layers.Dense(char_lm.VOCAB_SIZE)(x))

result = train.train_and_evaluate(
    config.Config(**json.loads(sys.argv[1])),
    task=GruCharLM(max_train_lines=64, max_validation_lines=32))
print(json.dumps(result.validation_metrics))
"""


def test_char_lm_with_a_recurrent_model_trains_on_two_replicas(tmp_path):
  """The example ships convolutions; a GRU under MirroredStrategy on logical
  CPU devices is checked here."""
  options = dict(model_dir=str(tmp_path / "run"), global_batch_size=32,
                 epochs=1, optimizer="adam", cpu_replicas=2)
  result = processes.run_python(["-c", _GRU_SCRIPT, json.dumps(options)], prewarmed=True)
  # The epoch-end save checks weights for NaN: integer variables (the GRU's
  # seed-generator state) must be passed over, not fed to is_finite.
  assert result.returncode == 0, result.stderr[-2000:]
  assert "perplexity" in json.loads(result.stdout.strip().splitlines()[-1])
