"""User code given on the command line as `package.module:function`.

    --model=my_project.models:build       model_fn(config) -> keras.Model
    --dataset=my_project.data:load        dataset_fn(split, config) -> tf.data.Dataset

Loading and checking happen before training, so a typo in a path or a wrong
return type stops the run with one line that names the flag.
"""

import importlib
from typing import Callable


class PluginError(ValueError):
  """A plug-in cannot be loaded or returned something unusable."""


def load_function(flag: str, path: str) -> Callable:
  """Imports `package.module:function` given by `--flag`.

  Raises:
    PluginError: the module cannot be imported, has no such attribute, or the
      attribute is not callable.
  """
  module_name, _, attribute = path.partition(":")
  if not module_name or not attribute:
    raise PluginError(
        f"--{flag}={path}: expected package.module:function")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise PluginError(
        f"--{flag}={path}: cannot import module {module_name!r} ({e})") from e
  try:
    function = getattr(module, attribute)
  except AttributeError:
    raise PluginError(
        f"--{flag}={path}: module {module_name!r} has no attribute "
        f"{attribute!r}") from None
  if not callable(function):
    raise PluginError(
        f"--{flag}={path}: {attribute!r} is a {type(function).__name__}, "
        "not a function")
  return function


def check_returns(flag: str, path: str, value, expected_type, what: str):
  """Returns `value`, or raises PluginError if it is not an `expected_type`."""
  if not isinstance(value, expected_type):
    raise PluginError(
        f"--{flag}={path} must return {what}, got {type(value).__name__}")
  return value


def check_model_fits(flag: str, name: str, model, feature_shape) -> None:
  """Raises PluginError unless `model` takes features of `feature_shape`.

  Args:
    flag, name: the flag and value that chose the model, for the message.
    model: a built keras.Model.
    feature_shape: the shape of one example's features.
  """
  model_shape = tuple(model.inputs[0].shape[1:]) if model.inputs else None
  if model_shape is not None and model_shape != tuple(feature_shape):
    raise PluginError(
        f"--{flag}={name}: the model takes inputs of shape {model_shape} per "
        f"example, but the data has features of shape {tuple(feature_shape)}")
  output_rank = len(model.outputs[0].shape) if model.outputs else 2
  if output_rank != 2:
    raise PluginError(
        f"--{flag}={name}: the model must output logits of shape "
        f"[batch, classes], got rank {output_rank}")
