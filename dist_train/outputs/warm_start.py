"""Warm start: initialise a new run's model from an earlier one.

`--init_checkpoint` may name a `.keras` file, a checkpoint prefix, or a
dist_train model_dir (its best/model.keras, else export/model.keras, else its
latest checkpoint). Only the model is initialised: the optimizer and the step
start fresh, and it happens only while the run has no checkpoint of its own.

Variables are matched as Keras matches them when it loads weights (by layer
in model order); a layer whose weights differ in shape (e.g. a new
classification head) fails the run with one line naming it, unless
`--init_skip_mismatch`, which loads the rest and lists what it skipped.
"""

import io
import os
import tempfile
import zipfile

import h5py
import keras
import tensorflow as tf

from dist_train import compat
from dist_train import errors
from dist_train.outputs import checkpoints
from dist_train.outputs import model_dir as model_dir_lib


class WarmStartError(errors.DistTrainError):
  """--init_checkpoint cannot initialise the model."""


def resolve(path: str) -> tuple:
  """("keras", file) or ("checkpoint", prefix) for --init_checkpoint=path.

  Raises:
    WarmStartError: nothing to initialise from at `path`.
  """
  gfile = tf.io.gfile
  if path.endswith(".keras"):
    if not gfile.exists(path) or gfile.isdir(path):
      raise WarmStartError(f"--init_checkpoint={path}: no such file")
    return "keras", path
  if gfile.isdir(path):
    for candidate in model_dir_lib.keras_models(path):
      if gfile.exists(candidate) and not gfile.isdir(candidate):
        return "keras", candidate
    prefix = (tf.train.latest_checkpoint(model_dir_lib.checkpoints_dir(path))
              or tf.train.latest_checkpoint(path))
    if prefix:
      return "checkpoint", prefix
    raise WarmStartError(
        f"--init_checkpoint={path} holds no model.keras (best/ or export/) "
        "and no checkpoint")
  if tf.io.gfile.exists(path + ".index"):
    return "checkpoint", path
  raise WarmStartError(
      f"--init_checkpoint={path} is not a .keras file, a checkpoint prefix "
      "(no .index file) or a model_dir")


def _weight_shapes(h5_file) -> dict:
  """{layer path: [shapes of its variables]} of a Keras weights file."""
  layers = {}
  def visit(name, item):
    if isinstance(item, h5py.Dataset) and "/vars/" in name:
      layers.setdefault(name.rsplit("/vars/", 1)[0], []).append(
          (int(name.rsplit("/", 1)[1]), tuple(item.shape)))
  h5_file.visititems(visit)
  return {layer: [shape for _, shape in sorted(shapes)]
          for layer, shapes in layers.items()}


def _mismatched_layers(model: keras.Model, keras_file: str) -> list:
  """Layers of `model` whose weights the file lacks or has in other shapes:
  `layer <name> (<path in the file>) <shapes> (in the file: <shapes>)`."""
  weights = compat.read_keras_weights(keras_file)
  with h5py.File(io.BytesIO(weights), "r") as f:
    source = _weight_shapes(f)
  with tempfile.TemporaryDirectory() as directory:
    path = os.path.join(directory, "target.weights.h5")
    model.save_weights(path)
    with h5py.File(path, "r") as f:
      target = _weight_shapes(f)
  names = compat.keras_layer_paths(model)
  def describe(path):
    name = names.get("/".join(path.split("/")[:2]))
    return f"layer {name} ({path})" if name else path
  return [f"{describe(path)} {shapes} (in the file: "
          f"{source.get(path, 'none')})"
          for path, shapes in sorted(target.items())
          if source.get(path) != shapes]


def initialize(model: keras.Model, path: str, *,
               skip_mismatch: bool) -> list:
  """Loads the weights at `path` into `model`; returns what was skipped.

  Raises:
    WarmStartError: a layer does not match and `skip_mismatch` is off, or
      the source cannot be read.
  """
  kind, source = resolve(path)
  if kind == "keras":
    # Keras and zipfile read local files only: one on gs:// is copied first.
    with model_dir_lib.reading_file(source) as local_file:
      try:
        mismatched = _mismatched_layers(model, local_file)
      except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise WarmStartError(f"cannot read {source}: {errors.first_line(e)}")
      if mismatched and not skip_mismatch:
        raise WarmStartError(
            f"--init_checkpoint={source} does not fit the model: "
            f"{'; '.join(mismatched)}; pass --init_skip_mismatch to load the "
            "rest")
      model.load_weights(local_file, skip_mismatch=skip_mismatch)
    return mismatched
  try:
    status = tf.train.Checkpoint(model=model).restore(source)
    status.expect_partial()
    status.assert_existing_objects_matched()
  except Exception as e:  # Shape errors and readers' errors of many types.
    hint = ("; --init_skip_mismatch needs a .keras file (or a model_dir "
            "with export/model.keras or best/model.keras)"
            if skip_mismatch else "")
    match = checkpoints.SHAPE_MISMATCH.search(str(e))
    what = (f"variable {match['name']} has shape {match['checkpoint']} there "
            f"and {match['model']} in the model" if match
            else errors.first_line(e))
    raise WarmStartError(
        f"--init_checkpoint={source} does not fit the model: {what}{hint}"
    ) from e
  return []
