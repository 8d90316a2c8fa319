"""Saving the trained model for inference."""

import contextlib
import os
import shutil

from absl import logging
import keras

from dist_train import errors


class ExportError(errors.DistTrainError):
  """The trained model could not be exported (a full disk, a lost mount)."""


def export_dir(model_dir: str) -> str:
  return os.path.join(model_dir, "export")


def export_model(model: keras.Model, model_dir: str, *,
                 saved_model: bool = False) -> str:
  """Saves `model` to <model_dir>/export/model.keras (and a SavedModel).

  Each is written to a temporary name and renamed, so an interrupted or failed
  export never leaves a truncated model in place of a good one.

  Returns:
    The path of the .keras file.

  Raises:
    ExportError: a file could not be written; the previous export, if any, is
      unchanged.
  """
  directory = export_dir(model_dir)
  path = os.path.join(directory, "model.keras")
  partial = os.path.join(directory, "model.partial.keras")
  with _export_error(path, partial):
    os.makedirs(directory, exist_ok=True)
    model.save(partial)
    os.replace(partial, path)
  logging.info("Exported %s", path)
  if saved_model:
    saved_model_dir = os.path.join(directory, "saved_model")
    partial = saved_model_dir + ".partial"
    with _export_error(saved_model_dir, partial):
      shutil.rmtree(partial, ignore_errors=True)  # Left by a killed export.
      model.export(partial, format="tf_saved_model", verbose=False)
      _replace_dir(partial, saved_model_dir)
    logging.info("Exported SavedModel %s", saved_model_dir)
  return path


def _replace_dir(source: str, target: str) -> None:
  """Moves directory `source` to `target`, replacing what is there."""
  old = target + ".old"
  shutil.rmtree(old, ignore_errors=True)
  if os.path.exists(target):
    os.rename(target, old)
  os.rename(source, target)
  shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _export_error(path: str, partial: str):
  """Turns a failure to write `path` into an ExportError and removes the
  partial copy, which takes space that the next attempt needs."""
  try:
    yield
  except Exception as e:  # OS and TensorFlow errors of many types.
    with contextlib.suppress(OSError):
      if os.path.isdir(partial):
        shutil.rmtree(partial)
      elif os.path.exists(partial):
        os.remove(partial)
    previous = ("the previous one is unchanged" if os.path.exists(path)
                else "there was none before")
    raise ExportError(
        f"cannot write the export {path}: {errors.reason(e)}; {previous}; "
        "the checkpoints hold the trained model, and rerunning the same "
        "command exports it") from e
