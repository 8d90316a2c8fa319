"""The record of how a run was started: run.cfg, run.json, and the resume check.

At every start of training the chief writes into model_dir
  - run.cfg: every resolved option as a flagfile, so that
    `python -m dist_train.main --flagfile=<model_dir>/run.cfg` replays the
    run (an earlier run.cfg is kept as run.<its start>.cfg);
  - run.json: what ran it: the versions of Python, TensorFlow, Keras and
    dist_train, the git commit of a checkout, replicas, workers, devices,
    the start time, and the loss-spike recoveries of this start
    (`recoveries`, appended as they happen).
A resumed run is compared with the run.cfg it finds: a change of an option
in `config.RUN_DEFINING_OPTIONS` would silently make a different run out of
the checkpoint, so it is refused (unless --allow_config_change); any other
change is logged and accepted.

TensorFlow is imported on first use: `--print_config` writes a flagfile
before TensorFlow loads.
"""

import dataclasses
import datetime
import os
import platform
import re
import subprocess
import sys
import typing
from typing import Optional

from dist_train import config as config_lib
from dist_train import errors
from dist_train.outputs import model_dir as model_dir_lib

_STARTED = re.compile(r"^# dist_train \S+ run started (\S+)$", re.MULTILINE)
_STAMP_FORMAT = "%Y%m%dT%H%M%SZ"


class RunRecordError(config_lib.ConfigError):
  """run.cfg cannot be read back as options; the message names the file."""


def _value_type(annotation):
  """int for `int` and `Optional[int]`."""
  args = [a for a in typing.get_args(annotation) if a is not type(None)]
  return args[0] if args else annotation


def _format(value) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return repr(value)  # Exact: the replay computes with the same number.
  if isinstance(value, tuple):
    return ",".join(str(v) for v in value)
  return str(value)


def flagfile_text(config: config_lib.Config, *,
                  started: Optional[str] = None) -> str:
  """Every option of `config`, one `--name=value` per line; an option that
  is unset (None) is a comment, so that it keeps its default.

  Args:
    config: the options.
    started: the start time to note in the first line (run.cfg), if any.
  """
  from dist_train import __version__  # pylint: disable=import-outside-toplevel
  lines = [f"# dist_train {__version__} run started {started}" if started
           else f"# dist_train {__version__} options"]
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if value is None:
      lines.append(f"# --{field.name} unset")
    else:
      lines.append(f"--{field.name}={_format(value)}")
  return "\n".join(lines) + "\n"


def _parse_value(field, text):
  kind = _value_type(field.type)
  if kind is bool:
    if text.lower() in ("true", "1"):
      return True
    if text.lower() in ("false", "0"):
      return False
    raise ValueError(f"--{field.name} must be true or false, got {text!r}")
  if kind is tuple:
    return tuple(v for v in text.split(",") if v)
  try:
    return kind(text)
  except ValueError:
    raise ValueError(f"--{field.name} must be {'an integer' if kind is int else 'a number'}"
                     f", got {text!r}") from None


def parse_flagfile(text: str, *, path: str) -> config_lib.Config:
  """The Config a flagfile written by `flagfile_text` holds.

  Raises:
    RunRecordError: a line is not `--name=value` of an option, or a value is
      impossible; the message names `path` and the line.
  """
  fields = {field.name: field for field in dataclasses.fields(
      config_lib.Config)}
  values = {}
  number = 0
  try:
    for number, line in enumerate(text.splitlines(), 1):
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      name, equals, value = line.removeprefix("--").partition("=")
      if not line.startswith("--") or name not in fields:
        raise ValueError(f"{line!r} is not --option=value of a dist_train "
                         "option")
      field = fields[name]
      if not equals:
        if _value_type(field.type) is not bool:
          raise ValueError(f"--{name} needs a value")
        value = "true"
      values[name] = _parse_value(field, value)
    number = 0
    return config_lib.Config(**values)
  except (ValueError, TypeError) as e:
    where = f"line {number}: " if number else ""
    raise RunRecordError(
        f"the run record {path} is not a flagfile of dist_train options: "
        f"{where}{e} (fix it, or remove the file to start a new record)"
    ) from None


def changes(earlier: config_lib.Config, config: config_lib.Config
            ) -> tuple[list, list]:
  """(refused, accepted): "--name: old -> new" for each option that differs,
  refused when it is in `config.RUN_DEFINING_OPTIONS`."""
  refused, accepted = [], []
  for field in dataclasses.fields(config):
    old, new = getattr(earlier, field.name), getattr(config, field.name)
    if old != new:
      change = f"--{field.name}: {_shown(old)} -> {_shown(new)}"
      (refused if field.name in config_lib.RUN_DEFINING_OPTIONS
       else accepted).append(change)
  return refused, accepted


def _shown(value) -> str:
  return "unset" if value is None else _format(value)


def read_config(model_dir: str) -> Optional[config_lib.Config]:
  """The options of run.cfg in `model_dir`, or None when there is none.

  Raises:
    RunRecordError: the file is not such a flagfile (edited by hand).
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  path = model_dir_lib.run_config_file(model_dir)
  if not tf.io.gfile.exists(path):
    return None
  try:
    with tf.io.gfile.GFile(path) as f:
      text = f.read()
  except tf.errors.NotFoundError:
    # The chief moved it aside for its own start, which it
    # only does after the same check passed.
    return None
  except UnicodeDecodeError as e:
    raise RunRecordError(f"the run record {path} is not text: {e.reason} "
                         "(fix it, or remove the file to start a new "
                         "record)") from None
  return parse_flagfile(text, path=path)


def check_resume(config: config_lib.Config, earlier: config_lib.Config
                 ) -> list:
  """Returns the accepted changes from the earlier start's options.

  Raises:
    config_lib.ConfigError: an option of `RUN_DEFINING_OPTIONS` changed and
      `config.allow_config_change` is off; one line naming each change.
  """
  refused, accepted = changes(earlier, config)
  if refused and not config.allow_config_change:
    raise config_lib.ConfigError(
        f"resuming the run in {config.model_dir} with options that change "
        f"what it computes: {'; '.join(refused)} (its run.cfg has the "
        "earlier values; give --allow_config_change to resume anyway, or "
        "use a new --model_dir)")
  return refused + accepted


def _git_commit() -> Optional[str]:
  """The commit of the checkout dist_train runs from, if it is one."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  root = os.path.dirname(root)
  if not os.path.exists(os.path.join(root, ".git")):
    return None
  try:
    return subprocess.run(
        ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
        text=True, timeout=10, check=True).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def _earlier_start(model_dir: str, text: str) -> str:
  match = _STARTED.search(text)
  start = match.group(1) if match else "unknown"
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  candidate, suffix = start, 1
  while tf.io.gfile.exists(
      model_dir_lib.earlier_run_config_file(model_dir, candidate)):
    candidate, suffix = f"{start}-{suffix}", suffix + 1
  return candidate


class RunRecordWriteError(errors.DistTrainError):
  """run.cfg or run.json could not be written (a full disk, a lost mount)."""


def write(config: config_lib.Config, **run_facts) -> None:
  """Writes run.cfg and run.json for this start (the chief only), keeping
  an earlier run.cfg as run.<its start>.cfg.

  Raises:
    RunRecordWriteError: naming the file and the reason.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  try:
    _write(config, **run_facts)
  except (OSError, tf.errors.OpError) as e:
    raise RunRecordWriteError(
        f"cannot write the run record in {config.model_dir}: "
        f"{errors.reason(e)}; the checkpoints are unaffected: free the space "
        "and rerun the same command to resume") from e


def _write(config: config_lib.Config, *, num_replicas: int, num_workers: int,
           devices: list) -> None:
  import keras  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from dist_train import __version__  # pylint: disable=import-outside-toplevel
  model_dir = config.model_dir
  now = datetime.datetime.now(datetime.timezone.utc)
  started = now.strftime(_STAMP_FORMAT)
  path = model_dir_lib.run_config_file(model_dir)
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      earlier = _earlier_start(model_dir, f.read())
    tf.io.gfile.rename(
        path, model_dir_lib.earlier_run_config_file(model_dir, earlier))
  model_dir_lib.write_file(path, flagfile_text(config, started=started))
  model_dir_lib.write_json(model_dir_lib.run_info_file(model_dir), {
      "start_time": now.isoformat(timespec="seconds"),
      "command": sys.argv,
      "python": platform.python_version(),
      "tensorflow": tf.__version__,
      "keras": keras.__version__,
      "dist_train": __version__,
      "git_commit": _git_commit(),
      "num_replicas": num_replicas,
      "num_workers": num_workers,
      "devices": list(devices),
      "host": platform.node(),
      "recoveries": [],  # add_recovery appends one per loss spike.
  })


def add_recovery(model_dir: str, recovery) -> None:
  """Appends a loss-spike recovery (`loop.spikes.Recovery`) to run.json's
  `recoveries` (the chief, after run.json was written at this start).

  Raises:
    RunRecordWriteError: naming the file and the reason.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  path = model_dir_lib.run_info_file(model_dir)
  try:
    record = model_dir_lib.read_json(path) or {}
    record.setdefault("recoveries", []).append(recovery.as_record())
    model_dir_lib.write_json(path, record)
  except (OSError, ValueError, tf.errors.OpError) as e:
    raise RunRecordWriteError(
        f"cannot record the loss-spike recovery in {path}: "
        f"{errors.reason(e)}") from e
