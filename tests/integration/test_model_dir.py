"""The crash-safe writes of outputs/model_dir.py, on a local directory and on
ram:// (TensorFlow's in-memory filesystem, standing in for gs://).

A crash is reproduced by leaving on disk exactly what a write stopped at each
point leaves (a partial file, a partial directory, the old directory moved
aside), then making the next call.
"""

import json
import os
import uuid

import keras
import numpy as np
import pytest
import tensorflow as tf

from dist_train.outputs import best as best_lib
from dist_train.outputs import export
from dist_train.outputs import model_dir as model_dir_lib

gfile = tf.io.gfile


@pytest.fixture(params=["local", "ram"])
def base(request, tmp_path):
  """An empty directory: under tmp_path, or a fresh ram:// one."""
  if request.param == "local":
    yield str(tmp_path / "run")
    return
  path = f"ram://model_dir_test_{uuid.uuid4().hex}/run"
  yield path
  if gfile.exists(path):
    gfile.rmtree(path)


def read(path):
  with gfile.GFile(path) as f:
    return f.read()


def write(path, text):
  gfile.makedirs(os.path.dirname(path))
  with gfile.GFile(path, "w") as f:
    f.write(text)


def listing(directory):
  """{relative path: contents} of every file under `directory`."""
  files = {}
  for parent, _, names in gfile.walk(directory):
    for name in names:
      path = os.path.join(parent, name)
      files[os.path.relpath(path, directory)] = read(path)
  return files


def test_write_file_replaces_the_file_and_leaves_nothing_else(base):
  path = model_dir_lib.eval_results_file(base)
  model_dir_lib.write_json(path, {"step": 1})
  model_dir_lib.write_json(path, {"step": 2})
  assert json.loads(read(path)) == {"step": 2}
  assert model_dir_lib.read_json(path) == {"step": 2}
  assert gfile.listdir(base) == [model_dir_lib.EVAL_RESULTS]


def test_a_failed_file_write_keeps_the_previous_file(base):
  path = os.path.join(base, "eval_results.json")
  model_dir_lib.write_file(path, "old")
  with pytest.raises(RuntimeError, match="stopped"):
    with model_dir_lib.writing_file(path) as local_path:
      with open(local_path, "w") as f:
        f.write("half")
      raise RuntimeError("stopped")
  assert read(path) == "old"
  assert gfile.listdir(base) == ["eval_results.json"]


def test_a_partial_file_left_by_a_crash_is_cleaned_by_the_next_write(base):
  path = model_dir_lib.training_done_file(base)
  partial = model_dir_lib.partial_file(path)
  assert partial == os.path.join(base, "training_done.partial.json")
  write(partial, "{\"global_st")  # A write killed half-way.
  model_dir_lib.write_json(path, {"global_step": 8})
  assert model_dir_lib.read_json(path) == {"global_step": 8}
  assert not gfile.exists(partial)


def test_writing_dir_replaces_the_whole_directory(base):
  path = model_dir_lib.best_dir(base)
  for contents in ({"a": "1", "sub/b": "2"}, {"c": "3"}):
    with model_dir_lib.writing_dir(path) as local_dir:
      assert os.listdir(local_dir) == []
      for name, text in contents.items():
        os.makedirs(os.path.dirname(os.path.join(local_dir, name)),
                    exist_ok=True)
        with open(os.path.join(local_dir, name), "w") as f:
          f.write(text)
    assert listing(path) == contents
  assert gfile.listdir(base) == ["best"]  # No .best.partial, no .best.old.


def test_a_failed_directory_write_keeps_the_previous_directory(base):
  path = model_dir_lib.saved_model_dir(base)
  with model_dir_lib.writing_dir(path) as local_dir:
    with open(os.path.join(local_dir, "saved_model.pb"), "w") as f:
      f.write("good")
  with pytest.raises(OSError):
    with model_dir_lib.writing_dir(path) as local_dir:
      with open(os.path.join(local_dir, "saved_model.pb"), "w") as f:
        f.write("half")
      raise OSError(28, "No space left on device")
  assert listing(path) == {"saved_model.pb": "good"}
  assert gfile.listdir(model_dir_lib.export_dir(base)) == ["saved_model"]


@pytest.mark.parametrize("stopped", [
    "while filling",             # .best.partial, best/ untouched.
    "between the renames",       # .best.old (and the complete .best.partial).
    "before removing the old",   # best/ new, .best.old.
])
def test_the_next_write_recovers_from_a_replace_stopped(base, stopped):
  path = model_dir_lib.best_dir(base)
  partial, old = model_dir_lib.partial_dir(path), model_dir_lib.old_dir(path)
  assert (partial, old) == (os.path.join(base, ".best.partial"),
                            os.path.join(base, ".best.old"))
  expected = {"metrics.json": "previous"}
  if stopped == "while filling":
    write(os.path.join(path, "metrics.json"), "previous")
    write(os.path.join(partial, "metrics.json"), "half")
  elif stopped == "between the renames":
    write(os.path.join(old, "metrics.json"), "previous")
    write(os.path.join(partial, "metrics.json"), "new")
  else:
    write(os.path.join(old, "metrics.json"), "older")
    write(os.path.join(path, "metrics.json"), "previous")

  model_dir_lib.recover_dir(path)
  assert listing(path) == expected
  assert gfile.listdir(base) == ["best"]
  # And the next replacement, after such a crash, goes through.
  write(os.path.join(partial, "stale"), "x")
  with model_dir_lib.writing_dir(path) as local_dir:
    with open(os.path.join(local_dir, "metrics.json"), "w") as f:
      f.write("next")
  assert listing(path) == {"metrics.json": "next"}
  assert gfile.listdir(base) == ["best"]


def test_best_model_recovers_best_dir_when_it_starts(base):
  old = model_dir_lib.old_dir(model_dir_lib.best_dir(base))
  write(os.path.join(old, "metrics.json"), json.dumps(
      {"metric": "accuracy", "mode": "max", "value": 0.75,
       "global_step": 30, "metrics": {"accuracy": 0.75}}))
  best = best_lib.BestModel(base, metric="accuracy", mode="auto",
                            is_chief=True)
  assert (best.value, best.step) == (0.75, 30)
  assert gfile.listdir(base) == ["best"]


def _tiny_model():
  inputs = keras.Input([3])
  return keras.Model(inputs, keras.layers.Dense(2)(inputs))


def test_export_recovers_and_writes_both_models(base, tmp_path):
  export_dir = model_dir_lib.export_dir(base)
  saved_model = model_dir_lib.saved_model_dir(base)
  # What an export killed while replacing the SavedModel left.
  write(os.path.join(model_dir_lib.old_dir(saved_model), "saved_model.pb"),
        "previous")
  write(os.path.join(model_dir_lib.partial_dir(saved_model), "half"), "x")
  write(model_dir_lib.partial_file(model_dir_lib.export_keras_model(base)),
        "half")
  model = _tiny_model()
  path = export.export_model(model, base, saved_model=True)
  assert path == model_dir_lib.export_keras_model(base)
  assert sorted(gfile.listdir(export_dir)) == ["model.keras", "saved_model"]
  assert gfile.exists(os.path.join(saved_model, "saved_model.pb"))
  local = str(tmp_path / "copy.keras")
  gfile.copy(path, local)
  loaded = keras.saving.load_model(local)
  x = np.ones([1, 3], np.float32)
  np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6)
