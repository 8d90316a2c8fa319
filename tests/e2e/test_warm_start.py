"""Warm starts (--init_checkpoint) from a trained quickstart-like run.

The source trains the quickstart flagfile on 640 digits for 2 epochs (20
steps). The warm starts run through the Python API in one process
(tests/helpers/warm_start_run.py): from the source's model_dir and from its
checkpoint prefix at a learning rate of 1e-12, whose first evaluation shows
the weights they started from; the first of them again, with its own
checkpoint; and a model with a new head of 12 classes
(tests/helpers/plugin_fixtures.py). Beside them the new head without
--init_skip_mismatch, on the command line, must fail with one line.
"""

import concurrent.futures
import json
import os
import re

import keras
import numpy as np
import pytest

from dist_train.outputs import summaries
from tests.helpers import processes

SOURCE_FLAGS = [f"--flagfile={processes.FLAGS_DIR}/quickstart.cfg",
                "--num_train_examples=640", "--epochs=2", "--cpu_replicas=1"]
NEW_HEAD = "tests.helpers.plugin_fixtures:mlp_with_12_classes"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("warm_start")
  source = str(root / "source")
  processes.run_cli(*SOURCE_FLAGS, f"--model_dir={source}", check=True)
  output = root / "warm"
  output.mkdir()
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    api = pool.submit(processes.run_python, [
        "tests/helpers/warm_start_run.py", source, str(output), "--", *SOURCE_FLAGS])
    refused = pool.submit(processes.run_cli, *SOURCE_FLAGS,
                          f"--model_dir={root / 'refused'}",
                          f"--model={NEW_HEAD}", f"--init_checkpoint={source}")
    api, refused = api.result(), refused.result()
  assert api.returncode == 0, api.stderr[-6000:]
  results = json.loads(api.stdout.strip().splitlines()[-1])
  return source, output, results, api.stderr, refused


def _source_validation(source):
  """The source's last validation (step, accuracy) in TensorBoard."""
  return summaries.read_scalars(os.path.join(source, "validation"))[
      "accuracy"][-1]


def test_a_warm_start_begins_with_the_source_accuracy(runs):
  source, output, results, log, _ = runs
  step, accuracy = _source_validation(source)
  assert step == 20
  for name, init in (("from_dir", source),
                     ("from_prefix", f"{source}/checkpoints/ckpt-20")):
    first = results[name]["first_validation"]
    print(f"{name}: first validation accuracy {first['accuracy']:.6f}; the "
          f"source's last {accuracy:.6f}")
    assert abs(first["accuracy"] - accuracy) <= 1e-6, name
    assert f"Initialised the model from {init}\n" in log
    # The first evaluation is after step 1 of the warm run.
    first_step, _ = summaries.read_scalars(
        os.path.join(output, name, "validation"))["accuracy"][0]
    assert first_step == 1


def test_init_checkpoint_is_ignored_once_the_run_has_checkpoints(runs):
  source, output, results, log, _ = runs
  checkpoint = os.path.join(output, "from_dir", "checkpoints", "ckpt-10")
  assert (f"Ignoring --init_checkpoint={source}: the run resumes from its "
          f"own checkpoint {checkpoint}") in log
  assert "Resuming at step 10 " in log
  # from_dir and new_head; not from_dir_resumed.
  assert len(re.findall(rf"Initialised the model from {re.escape(source)}"
                        r"(\n|;)", log)) == 2
  assert results["from_dir_resumed"]["global_step"] == 20


def test_a_new_head_fails_in_one_line_without_skip_mismatch(runs):
  refused = runs[4]
  assert refused.returncode == 1, refused.stderr[-3000:]
  line = processes.error_line(refused)
  print(line)
  assert re.search(
      r"--init_checkpoint=\S+/export/model.keras does not fit the model: "
      r"layer predictions \(layers/dense_2\) \[\(64, 12\), \(12,\)\] \(in the "
      r"file: \[\(64, 10\), \(10,\)\]\); "
      r"pass --init_skip_mismatch to load the rest", line), line
  assert "epoch 1/2" not in refused.stderr  # Refused before training.


def test_a_new_head_with_skip_mismatch_loads_the_rest_and_trains(runs):
  source, output, results, log, _ = runs
  skipped = re.search(rf"Initialised the model from {re.escape(source)}; "
                      r"skipped (.*)", log)
  assert skipped, log[-3000:]
  print(f"skipped: {skipped.group(1)}")
  # Only the head, named as the model names it (Keras' weights file keeps
  # it under layers/dense_2, the name of another layer here).
  assert skipped.group(1) == ("layer predictions (layers/dense_2) "
                              "[(64, 12), (12,)] (in the file: "
                              "[(64, 10), (10,)])")
  source_model = keras.saving.load_model(
      os.path.join(source, "export", "model.keras"))
  with np.load(output / "new_head_initial.npz") as initial:
    for layer in ("dense_1", "dense_2"):
      for i, weight in enumerate(source_model.get_layer(layer).get_weights()):
        np.testing.assert_array_equal(initial[f"{layer}_{i}"], weight)
  trained = results["new_head"]
  print(f"new head: validation accuracy {trained['validation']['accuracy']:.4f}"
        f" after {trained['global_step']} steps")
  assert trained["global_step"] == 10
  head = keras.saving.load_model(
      os.path.join(output, "new_head", "export", "model.keras")
  ).get_layer("predictions")
  assert head.kernel.shape == (64, 12)
