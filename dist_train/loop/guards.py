"""Checks that stop a run on non-finite numbers before they reach a checkpoint."""

import math

import tensorflow as tf

from dist_train import errors


class NonFiniteError(errors.DistTrainError):
  """A loss term or a weight became NaN or Inf; the message says which, where."""

  exit_code = errors.EXIT_NON_FINITE


def check_losses(losses: dict, *, first_step: int, last_step: int) -> None:
  """Raises NonFiniteError if a loss term of steps first..last is not finite.

  Args:
    losses: term name -> mean over the loop's steps (a NaN or Inf in any step
      makes the mean non-finite).
    first_step, last_step: the global steps the loop ran (1-based, inclusive).
  """
  bad = [name for name, value in losses.items() if not math.isfinite(value)]
  if bad:
    terms = ", ".join(f"{name}={losses[name]}" for name in bad)
    raise NonFiniteError(
        f"non-finite loss in steps {first_step}-{last_step}: {terms}; no "
        "checkpoint of these steps was written")


def check_variables(variables) -> None:
  """Raises NonFiniteError naming the first variable with a NaN or Inf.

  Only floating-point variables can hold either; integer ones (a layer's
  random seed state, counters) are passed over.
  """
  for variable in variables:
    if not tf.as_dtype(variable.dtype).is_floating:
      continue
    if not bool(tf.reduce_all(tf.math.is_finite(variable))):
      raise NonFiniteError(
          f"variable {variable.path if hasattr(variable, 'path') else variable.name} "
          "holds NaN or Inf; refusing to write it to a checkpoint")
