"""Loading, calling and checking user code given as `package.module:function`.

    --model=my_project.models:build       model_fn(config) -> keras.Model
    --dataset=my_project.data:load        dataset_fn(split, config) -> tf.data.Dataset

Loading and checking happen before training, so a typo in a path, a wrong
signature, an exception inside the user's function or a wrong return type
stops the run with one line that names the flag and, for an exception, the
user's own file and line.
"""

import importlib
import inspect
import traceback
from typing import Callable

from dist_train import errors


class UserCodeError(errors.DistTrainError):
  """User code cannot be loaded, raised, or returned something unusable."""


def load_function(flag: str, path: str) -> Callable:
  """Imports `package.module:function` given by `--flag`.

  Raises:
    UserCodeError: the module cannot be imported, has no such attribute, or the
      attribute is not callable.
  """
  module_name, _, attribute = path.partition(":")
  if not module_name or not attribute:
    raise UserCodeError(
        f"--{flag}={path}: expected package.module:function")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise UserCodeError(
        f"--{flag}={path}: cannot import module {module_name!r} ({e})") from e
  try:
    function = getattr(module, attribute)
  except AttributeError:
    raise UserCodeError(
        f"--{flag}={path}: module {module_name!r} has no attribute "
        f"{attribute!r}") from None
  if not callable(function):
    raise UserCodeError(
        f"--{flag}={path}: {attribute!r} is a {type(function).__name__}, "
        "not a function")
  return function


def check_returns(flag: str, path: str, value, expected_type, what: str):
  """Returns `value`, or raises UserCodeError if it is not an `expected_type`."""
  if not isinstance(value, expected_type):
    raise UserCodeError(
        f"--{flag}={path} must return {what}, got {type(value).__name__}")
  return value


def check_model_fits(flag: str, name: str, model, feature_shape) -> None:
  """Raises UserCodeError unless `model` takes features of `feature_shape`.

  Args:
    flag, name: the flag and value that chose the model, for the message.
    model: a built keras.Model.
    feature_shape: the shape of one example's features.
  """
  model_shape = tuple(model.inputs[0].shape[1:]) if model.inputs else None
  if model_shape is not None and model_shape != tuple(feature_shape):
    raise UserCodeError(
        f"--{flag}={name}: the model takes inputs of shape {model_shape} per "
        f"example, but the data has features of shape {tuple(feature_shape)}")
  output_rank = len(model.outputs[0].shape) if model.outputs else 2
  if output_rank != 2:
    raise UserCodeError(
        f"--{flag}={name}: the model must output logits of shape "
        f"[batch, classes], got rank {output_rank}")


def _user_frame(error: BaseException) -> str:
  """`file:line` where the user's code raised (or called what raised): the
  innermost frame outside dist_train, Python and installed packages."""
  location = errors.user_location(error)
  if location:
    return location
  frames = traceback.extract_tb(error.__traceback__)
  return (f"{frames[-1].filename}:{frames[-1].lineno}" if frames
          else "unknown location")


def _definition(function: Callable) -> str:
  """` (defined at file:line)` for a Python function, else ''."""
  try:
    path = inspect.getsourcefile(function)
    _, line = inspect.getsourcelines(function)
  except (OSError, TypeError):  # A builtin, a C extension, no source.
    return ""
  return f" (defined at {path}:{line})"


def call(flag: str, path: str, function: Callable, *args, **kwargs):
  """Calls the user's `function(*args, **kwargs)` given by `--flag=path`.

  Raises:
    UserCodeError: the function cannot take these arguments (naming the
      signature dist_train calls), or it raised (naming the exception, its
      message and the user's file:line where it was raised).
  """
  try:
    inspect.signature(function).bind(*args, **kwargs)
  except TypeError as e:
    raise UserCodeError(
        f"--{flag}={path}: TypeError: {getattr(function, '__name__', path)}"
        f"{inspect.signature(function)} cannot be called with "
        f"{len(args)} positional argument(s) "
        f"({', '.join(type(a).__name__ for a in args)}): {e}"
        f"{_definition(function)}") from None
  except ValueError:  # No signature (a builtin): just call it.
    pass
  try:
    return function(*args, **kwargs)
  except errors.DistTrainError:
    raise
  except Exception as e:  # Whatever the user's code raises: say where.
    raise UserCodeError(
        f"--{flag}={path} raised {errors.summary(e)} "
        f"(at {_user_frame(e)})") from e
