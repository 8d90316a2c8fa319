"""Every failure a run reports: one error class per kind, each with its exit code.

`main` ends every failure the same way: one `dist_train: error: ...` line on
stderr and `error.exit_code`. No TensorFlow here, so flag errors are reported
before TensorFlow loads.
"""

import contextlib

# Exit codes, as documented in the README ("Failure behaviour").
EXIT_BAD_INPUT = 1  # Flags, data, user code, checkpoints or model_dir unusable.
EXIT_NON_FINITE = 3  # A loss term or weight became NaN or Inf.
# EX_TEMPFAIL from sysexits.h: a temporary failure; rerunning the same command
# resumes from the checkpoint saved on the way out.
EXIT_PREEMPTED = 75


class DistTrainError(Exception):
  """A failure the user can act on; the message says what and where.

  Subclasses set `exit_code`; `main` prints the message on one line and exits
  with it.
  """

  exit_code = EXIT_BAD_INPUT


def first_line(error: BaseException) -> str:
  """The first line of an error's message, or its type when it has none.

  Library errors (TensorFlow's, numpy's) often run to many lines; dist_train
  reports each failure on one.
  """
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__


class PhaseError(DistTrainError):
  """An unexpected exception, labelled with the phase of the run it ended."""

  def __init__(self, phase: str, error: BaseException):
    super().__init__(
        f"{phase}: {type(error).__name__}: {first_line(error)} (rerun with "
        "--traceback for the full traceback)")
    self.phase = phase


@contextlib.contextmanager
def phase(name: str):
  """Labels an exception that escapes the block with the phase `name`.

  DistTrainErrors already say what and where, and pass through unchanged;
  any other exception becomes a PhaseError chained to it, so `main` can
  still print the original traceback when asked to.
  """
  try:
    yield
  except DistTrainError:
    raise
  except Exception as e:  # Anything else: say in which phase it happened.
    raise PhaseError(name, e) from e
