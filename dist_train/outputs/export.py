"""Saving the trained model for inference."""

import contextlib

from absl import logging
import keras
import tensorflow as tf

from dist_train import errors
from dist_train.outputs import model_dir as model_dir_lib


class ExportError(errors.DistTrainError):
  """The trained model could not be exported (a full disk, a lost mount)."""


def export_dir(model_dir: str) -> str:
  return model_dir_lib.export_dir(model_dir)


def export_model(model: keras.Model, model_dir: str, *,
                 saved_model: bool = False) -> str:
  """Saves `model` to <model_dir>/export/model.keras (and a SavedModel).

  Each is written under a temporary name and renamed (model_dir.writing_file
  and writing_dir), so an interrupted or failed export never leaves a
  truncated model in place of a good one.

  Returns:
    The path of the .keras file.

  Raises:
    ExportError: a file could not be written; the previous export, if any, is
      unchanged.
  """
  path = model_dir_lib.export_keras_model(model_dir)
  with _export_error(path):
    with model_dir_lib.writing_file(path) as local_path:
      model.save(local_path)
  logging.info("Exported %s", path)
  if saved_model:
    saved_model_dir = model_dir_lib.saved_model_dir(model_dir)
    with _export_error(saved_model_dir):
      with model_dir_lib.writing_dir(saved_model_dir) as local_dir:
        model.export(local_dir, format="tf_saved_model", verbose=False)
    logging.info("Exported SavedModel %s", saved_model_dir)
  return path


@contextlib.contextmanager
def _export_error(path: str):
  """Turns a failure to write `path` into an ExportError (the writing helper
  has removed the partial copy, which takes space that the next attempt
  needs)."""
  try:
    yield
  except Exception as e:  # OS and TensorFlow errors of many types.
    previous = ("the previous one is unchanged" if tf.io.gfile.exists(path)
                else "there was none before")
    raise ExportError(
        f"cannot write the export {path}: {errors.reason(e)}; {previous}; "
        "the checkpoints hold the trained model, and rerunning the same "
        "command exports it") from e
