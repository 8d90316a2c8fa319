"""A whole run on a model_dir that is not POSIX: ram://, TensorFlow's in-memory
filesystem, stands in for gs:// (no link(2), no local path for Keras).

Through the Python API in this process: train with --best_metric and
--export_saved_model, resume with more epochs, evaluate, and warm-start
another run from it; every file is read back through tf.io.gfile.
"""

import json
import os
import uuid

import keras
import numpy as np
import tensorflow as tf

from dist_train import config as config_lib
from dist_train import train
from dist_train.outputs import model_dir as model_dir_lib

gfile = tf.io.gfile
# The shipped MNIST digits, 8 steps an epoch, a validation pass each epoch.
RUN = dict(dataset="mnist_sample", num_train_examples=256,
           num_validation_examples=64, global_batch_size=32, hidden_units=16,
           steps_per_loop=4, log_every_steps=4, best_metric="accuracy",
           export_saved_model=True)


class _Steps(keras.callbacks.Callback):
  """The global steps a run reports after each compiled loop, and the
  weights it starts from."""

  def __init__(self):
    super().__init__()
    self.steps = []
    self.initial_weights = None

  def on_train_begin(self, logs=None):
    self.initial_weights = self.model.get_weights()

  def on_train_batch_end(self, batch, logs=None):
    self.steps.append(batch)


def _read_json(path):
  with gfile.GFile(path) as f:
    return json.load(f)


def _load_keras(path, local_dir):
  """The .keras file at `path`, copied here through tf.io.gfile and loaded."""
  local = os.path.join(local_dir, f"{uuid.uuid4().hex}.keras")
  gfile.copy(path, local)
  return keras.saving.load_model(local)


def _assert_same_weights(model, other):
  for mine, theirs in zip(model.get_weights(), other.get_weights(),
                          strict=True):
    np.testing.assert_array_equal(mine, theirs)


def test_a_run_on_ram_trains_exports_keeps_best_resumes_and_evaluates(
    tmp_path, monkeypatch):
  cwd, copies = tmp_path / "cwd", tmp_path / "copies"
  cwd.mkdir()
  copies.mkdir()
  monkeypatch.chdir(cwd)  # Where a path taken as local would appear.
  model_dir = f"ram://dist_train_{uuid.uuid4().hex}"
  warm_dir = f"ram://dist_train_{uuid.uuid4().hex}"
  strategy = train.create_strategy(config_lib.Config(model_dir=model_dir))
  try:
    # 1. Train one epoch: checkpoint, best/, export/, training_done.json.
    first = train.train_and_evaluate(
        config_lib.Config(model_dir=model_dir, epochs=1, **RUN),
        strategy=strategy)
    assert first.global_step == 8
    assert sorted(gfile.listdir(model_dir)) == [
        "best", "checkpoints", "export", "metrics.jsonl", "run.cfg",
        "run.json", "train",
        "training_done.json",
        "validation"]  # No OWNER.lock: no lock is taken off POSIX.
    checkpoints_dir = model_dir_lib.checkpoints_dir(model_dir)
    assert tf.train.latest_checkpoint(checkpoints_dir) == (
        f"{checkpoints_dir}/ckpt-8")
    assert _read_json(model_dir_lib.training_done_file(model_dir)) == {
        "global_step": 8, "stopped_early": None}
    export_dir = model_dir_lib.export_dir(model_dir)
    assert sorted(gfile.listdir(export_dir)) == ["model.keras", "saved_model"]
    assert gfile.exists(os.path.join(export_dir, "saved_model",
                                     "saved_model.pb"))
    _assert_same_weights(
        _load_keras(model_dir_lib.export_keras_model(model_dir), copies),
        first.model)
    best_dir = model_dir_lib.best_dir(model_dir)
    assert sorted(gfile.listdir(best_dir)) == [
        "ckpt.data-00000-of-00001", "ckpt.index", "metrics.json",
        "model.keras"]
    best = _read_json(model_dir_lib.best_metrics_file(model_dir))
    assert best["metric"] == "accuracy" and best["global_step"] == 8
    assert best["value"] == best["metrics"]["accuracy"] > 0.1
    _assert_same_weights(_load_keras(os.path.join(best_dir, "model.keras"),
                                     copies), first.model)
    events = gfile.glob(os.path.join(model_dir, "validation", "events.*"))
    assert len(events) == 1 and gfile.stat(events[0]).length > 0

    # 2. Resume in this process with a second epoch: from step 8 to 16.
    steps = _Steps()
    second = train.train_and_evaluate(
        config_lib.Config(model_dir=model_dir, epochs=2, **RUN),
        strategy=strategy, callbacks=[steps])
    assert second.global_step == 16
    assert steps.steps == [12, 16]  # Not from step 0: it resumed.
    assert tf.train.latest_checkpoint(checkpoints_dir) == (
        f"{checkpoints_dir}/ckpt-16")
    assert _read_json(model_dir_lib.training_done_file(model_dir))[
        "global_step"] == 16
    _assert_same_weights(
        _load_keras(model_dir_lib.export_keras_model(model_dir), copies),
        second.model)
    best = _read_json(model_dir_lib.best_metrics_file(model_dir))
    assert best["global_step"] in (8, 16)
    names = sorted(gfile.listdir(model_dir))
    # The first start's run.cfg is kept as run.<its start>.cfg.
    [earlier] = [name for name in names
                 if name.startswith("run.") and name != "run.cfg" and
                 name.endswith(".cfg")]
    names.remove(earlier)
    assert names == [
        "best", "checkpoints", "export", "metrics.jsonl", "run.cfg",
        "run.json", "train",
        "training_done.json",
        "validation"]  # Nothing left by the replaced best/ and export/.

    # 3. Evaluate the latest checkpoint: eval_results.json.
    results = train.evaluate(
        config_lib.Config(model_dir=model_dir, mode="evaluate", **RUN),
        strategy=strategy)
    assert results["global_step"] == 16
    assert results["checkpoint"] == f"{checkpoints_dir}/ckpt-16"
    assert _read_json(model_dir_lib.eval_results_file(model_dir)) == results
    assert 0.0 <= results["accuracy"] <= 1.0

    # 4. Warm-start another run from this model_dir: its best/model.keras.
    best_model = _load_keras(os.path.join(best_dir, "model.keras"), copies)
    started = _Steps()
    train.train_and_evaluate(
        config_lib.Config(model_dir=warm_dir, epochs=1,
                          init_checkpoint=model_dir, **RUN),
        strategy=strategy, callbacks=[started])
    for mine, theirs in zip(started.initial_weights,
                            best_model.get_weights(), strict=True):
      np.testing.assert_array_equal(mine, theirs)
  finally:
    for directory in (model_dir, warm_dir):
      if gfile.exists(directory):
        gfile.rmtree(directory)
  assert os.listdir(cwd) == []  # No local "ram:" directory.
