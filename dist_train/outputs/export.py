"""Saving the trained model for inference."""

import os

from absl import logging
import keras


def export_dir(model_dir: str) -> str:
  return os.path.join(model_dir, "export")


def export_model(model: keras.Model, model_dir: str, *,
                 saved_model: bool = False) -> str:
  """Saves `model` to <model_dir>/export/model.keras (and a SavedModel).

  The .keras file is written to a temporary name and renamed, so an
  interrupted export never leaves a truncated model in place of a good one.

  Returns:
    The path of the .keras file.
  """
  directory = export_dir(model_dir)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "model.keras")
  partial = os.path.join(directory, "model.partial.keras")
  model.save(partial)
  os.replace(partial, path)
  logging.info("Exported %s", path)
  if saved_model:
    saved_model_dir = os.path.join(directory, "saved_model")
    model.export(saved_model_dir, format="tf_saved_model", verbose=False)
    logging.info("Exported SavedModel %s", saved_model_dir)
  return path
