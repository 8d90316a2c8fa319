"""Every failure a run reports: one error class per kind, each with its exit code.

`main` ends every failure the same way: one `dist_train: error: ...` line on
stderr and `error.exit_code`. No TensorFlow here, so flag errors are reported
before TensorFlow loads.
"""

import contextlib
import os
import re
import sysconfig
import traceback

from dist_train import compat

# Exit codes, as documented in docs/failures.md.
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


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def first_line(error: BaseException) -> str:
  """The first line of an error's message, or its type when it has none.

  Library errors (TensorFlow's, numpy's) often run to many lines; dist_train
  reports each failure on one.
  """
  lines = [line.strip() for line in
           _ANSI_ESCAPE.sub("", str(error)).strip().splitlines()
           if line.strip()]
  if lines and lines[0] == "in user code:":
    # AutoGraph puts the traced function's stack first, then "Type: message".
    frames = [i for i, line in enumerate(lines) if line.startswith("File ")]
    rest = lines[frames[-1] + 1:] if frames else lines[1:]
    prefix = f"{type(error).__name__}: "
    start = next((i for i, line in enumerate(rest) if line.startswith(prefix)),
                 len(rest) - 1)
    lines = rest[start:]
    if lines:
      lines[0] = lines[0].removeprefix(prefix)
  if (len(lines) > 1 and
      lines[0].startswith("Exception encountered when calling ")):
    # Keras wraps an error raised in a layer's call(): "Exception encountered
    # when calling Boom.call().", the message, then the call's arguments.
    where = lines[0].removeprefix("Exception encountered when calling ")
    return f"{lines[1]} (in {where.rstrip('.')})"
  return lines[0] if lines else type(error).__name__


def _is_op_error(error: BaseException) -> bool:
  """A tf.errors.OpError, recognised without importing TensorFlow."""
  return any(cls.__name__ == "OpError" and
             cls.__module__.startswith("tensorflow")
             for cls in type(error).__mro__)


def summary(error: BaseException) -> str:
  """`Type: what went wrong`, on one line."""
  text = (compat.op_error_summary(error.message) if _is_op_error(error)
          else first_line(error))
  return f"{type(error).__name__}: {text}"


def reason(error: BaseException) -> str:
  """Why a file could not be written, e.g. "No space left on device".

  TensorFlow's file errors end in the operating system's reason, after the
  file's (often temporary) name: "<path>; No space left on device".
  """
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  text = summary(error)
  if _is_op_error(error) and "; " in text:
    return text.rsplit("; ", 1)[-1]
  return text


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
_PATHS = sysconfig.get_paths()
# Where code that is not the user's lives: dist_train itself and Python's and
# the installed packages' folders.
_LIBRARY_DIRS = tuple(sorted({
    os.path.join(os.path.abspath(path), "")
    for path in (os.path.dirname(__file__), _PATHS["stdlib"],
                 _PATHS["platstdlib"], _PATHS["purelib"], _PATHS["platlib"])
}))


def _is_user_file(path: str) -> bool:
  path = os.path.abspath(path) if not path.startswith("<") else path
  return not (path.startswith(("<",) + _LIBRARY_DIRS)
              or "site-packages" in path or "dist-packages" in path
              or "__autograph_generated_file" in path)


def user_location(error: BaseException) -> str | None:
  """`file:line` of the innermost frame of user code in `error`, or None.

  Frames come from the traceback and, for errors raised inside TensorFlow
  graphs (AutoGraph, tf.py_function), from the stack the message quotes.
  """
  frames = [(frame.filename, frame.lineno)
            for frame in traceback.extract_tb(error.__traceback__)]
  message = error.message if _is_op_error(error) else str(error)
  frames += [(path, int(line)) for path, line in _FRAME.findall(message)]
  user = [frame for frame in frames if _is_user_file(frame[0])]
  return f"{user[-1][0]}:{user[-1][1]}" if user else None


class PhaseError(DistTrainError):
  """An unexpected exception, labelled with the phase of the run it ended."""

  def __init__(self, phase: str, error: BaseException):
    location = user_location(error)
    where = f" (at {location})" if location else ""
    hint = "" if _is_op_error(error) else (
        " (rerun with --traceback for the full traceback)")
    super().__init__(f"{phase}: {summary(error)}{where}{hint}")
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
