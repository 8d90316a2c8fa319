"""Every failure a run reports: one error class per kind, each with its exit code.

`main` ends every failure the same way: one `dist_train: error: ...` line on
stderr and `error.exit_code`. No TensorFlow here, so flag errors are reported
before TensorFlow loads.
"""

import contextlib
import re

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
  lines = [line.strip() for line in str(error).strip().splitlines()
           if line.strip()]
  if lines and lines[0] == "in user code:":
    # AutoGraph puts the traced function's stack first; the cause is last.
    return lines[-1]
  return lines[0] if lines else type(error).__name__


def op_error_summary(message: str) -> str:
  """The part of a TensorFlow op error that says what went wrong.

  Errors from inside a tf.function wrap the op's own message in the op's
  stack and, with several replicas, in "N root error(s) found. (0) ...".
  """
  root = re.search(r"\(0\) [A-Z_]+:\s*(.+)", message)
  if root:
    line = root.group(1)
  else:
    skip = ("Graph execution error", "Detected at", "File ", "[[", "<stack")
    lines = [l.strip() for l in message.splitlines()]
    line = next((l for l in lines if l and not l.startswith(skip)),
                message.strip())
  # tf.data prefixes the message of an op inside a map with where it ran.
  line = re.sub(r"^Error in user-defined function .*?Iterator::\S+: ", "",
                line)
  return re.split(r"\s+Label values:|\s*\[\[|\s*\[Op:", line)[0].strip()


def _is_op_error(error: BaseException) -> bool:
  """A tf.errors.OpError, recognised without importing TensorFlow."""
  return any(cls.__name__ == "OpError" and
             cls.__module__.startswith("tensorflow")
             for cls in type(error).__mro__)


def summary(error: BaseException) -> str:
  """`Type: what went wrong`, on one line."""
  text = (op_error_summary(error.message) if _is_op_error(error)
          else first_line(error))
  return f"{type(error).__name__}: {text}"


class PhaseError(DistTrainError):
  """An unexpected exception, labelled with the phase of the run it ended."""

  def __init__(self, phase: str, error: BaseException):
    hint = "" if _is_op_error(error) else (
        " (rerun with --traceback for the full traceback)")
    super().__init__(f"{phase}: {summary(error)}{hint}")
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
