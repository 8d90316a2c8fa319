"""Command line: flags -> Config -> train.run, ending every failure the same way.

    python -m dist_train.main --flagfile=launch/flags/quickstart.cfg
    python -m dist_train.main --flagfile=launch/flags/mnist.cfg --data_dir=DIR

Flags after --flagfile override it. The configuration and the cluster in the
environment are checked before TensorFlow is imported, so a bad flag costs
well under a second. Every failure ends with one `dist_train: error: ...` line
and the exit code of its error class (docs/failures.md);
--traceback also prints the Python traceback.
"""

import logging
import os
import re
import sys
import traceback

from absl import app
from absl import flags

from dist_train import compat
from dist_train import config as config_lib
from dist_train import errors
from dist_train import flags as flags_lib
from dist_train import logs
from dist_train.distribute import cluster
from dist_train.loop import stop
from dist_train.loop import time_limits
from dist_train.outputs import ownership
from dist_train.outputs import run_record


def _drop_coordinator_errors(record: logging.LogRecord) -> bool:
  """MirroredStrategy's coordinator logs an exception raised in a replica,
  traceback and all, then raises it to the caller, which reports it once."""
  return not str(record.msg).startswith("Error reported to Coordinator")


def _fail(message, exit_code=errors.EXIT_BAD_INPUT):
  print(f"dist_train: error: {message}", file=sys.stderr)
  sys.exit(exit_code)


# The flag an error is about: "flag --epochs=x: ...", "Unknown command line
# flag 'x'", "--epochs must be ...".
_FLAG_IN_ERROR = re.compile(r"^(?:flag --|Unknown command line flag '|--)(\w+)")
_argv = []  # The command line parse_flags read.


def _where_set(message: str) -> str:
  """`message`, naming the flagfile line that set the flag it is about when
  a --flagfile of the command line set it last (a hand-edited run.cfg)."""
  match = _FLAG_IN_ERROR.match(message)
  if not match:
    return message
  name, where = match.group(1), None
  for arg in _argv[1:]:
    if arg.startswith("--flagfile="):
      path = arg.split("=", 1)[1]
      try:
        with open(path, encoding="utf-8") as f:
          lines = f.read().splitlines()
      except (OSError, UnicodeDecodeError):
        continue
      for number, line in enumerate(lines, 1):
        if re.match(rf"--(no)?{name}(=|$)", line.strip()):
          where = f"{path}, line {number}"
    elif re.match(rf"--(no)?{name}(=|$)", arg):
      where = None  # Set on the command line, after any flagfile.
  return f"{message} (set in {where})" if where else message


def parse_flags(argv):
  """Parses flags; a bad flag or flagfile exits 1 with one line on stderr."""
  _argv[:] = argv
  try:
    return flags.FLAGS(argv)
  except flags.CantOpenFlagFileError as e:
    cause = e.__context__
    if isinstance(cause, OSError) and cause.filename:
      _fail(f"cannot read --flagfile={cause.filename}: {cause.strerror}")
    _fail(errors.first_line(e))
  except flags.Error as e:
    _fail(_where_set(errors.first_line(e)))
  except UnicodeDecodeError as e:
    name = compat.flagfile_being_read(e)
    _fail(f"cannot read {f'--flagfile={name}' if name else 'a --flagfile'}: "
          f"it is not UTF-8 text (byte 0x{e.object[e.start]:02x}: {e.reason}); "
          "a flagfile holds one --flag=value per line")
  except OSError as e:
    _fail(f"cannot read {e.filename or 'a --flagfile'}: {e.strerror}")


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}")
  show_traceback = flags_lib.TRACEBACK.value
  try:
    try:
      config = flags_lib.config_from_flags()
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(_where_set(str(e))) from None
    if flags_lib.PRINT_CONFIG.value:
      print(run_record.flagfile_text(config), end="")
      return
    resolved = cluster.resolve(strategy=config.strategy,
                               cluster=config.cluster,
                               cpu_replicas=config.cpu_replicas,
                               environ=os.environ)
    if config.mode != "evaluate":
      ownership.check_writable(config.model_dir)
    logging.getLogger("tensorflow").addFilter(_drop_coordinator_errors)
    # Imported here so that flag errors are reported before TensorFlow loads.
    logs.quiet_tensorflow_startup()
    with logs.startup_info_hidden():
      # pylint: disable-next=import-outside-toplevel
      from dist_train import train
    logs.configure_logging(verbose=show_traceback)
    train.run(config, resolved=resolved)
  except errors.DistTrainError as e:
    if show_traceback:
      traceback.print_exc()
    _fail(e, e.exit_code)
  except Exception as e:  # pylint: disable=broad-except
    # A bug, or a failure outside every labelled phase: still one line.
    if show_traceback:
      traceback.print_exc()
    _fail(f"{errors.summary(e)} (rerun with --traceback for the full "
          "traceback)")


def run_cli():
  """The `dist-train` console script (and `python -m dist_train.main`)."""
  if sys.argv[1:2] == ["doctor"]:
    # `dist-train doctor [flags]`: the environment check, with flags of its
    # own (dist_train/doctor); launch.local runs it on every worker too.
    # pylint: disable-next=import-outside-toplevel
    from dist_train.doctor import cli as doctor_cli
    doctor_cli.run_cli(sys.argv[:1] + sys.argv[2:])
    return
  # First, before TensorFlow loads: Ctrl-C or SIGTERM while TensorFlow starts,
  # waits for the cluster or builds the input exits at once (loop/stop.py).
  # Here rather than in `main`, which tests call in their own process: the
  # signals stay blocked for the rest of a process, and in its children.
  stop.install(block=True)
  time_limits.mark_process_start()  # --max_runtime_s counts from here.
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run_cli()
