"""The command-line flags, derived from the Config's fields, and back to a Config.

Only `main` (and launch entry points) import this module; the library takes a
`Config` or the values it uses. An option is added by adding a field to
`config.Config`: its flag, its --help text and its row in docs/flags.md's flag
table follow from the field.
"""

import dataclasses
import typing

from absl import flags

from dist_train import config as config_lib

_DEFINE_BY_TYPE = {
    str: flags.DEFINE_string,
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    bool: flags.DEFINE_bool,
    tuple: flags.DEFINE_list,
}


def _value_type(annotation):
  """int for `int` and `Optional[int]`."""
  args = [a for a in typing.get_args(annotation) if a is not type(None)]
  return args[0] if args else annotation


def _define(field: dataclasses.Field) -> None:
  meta = field.metadata
  default = field.default
  if meta["choices"] and not meta["import_path"]:
    flags.DEFINE_enum(field.name, default, meta["choices"], meta["help"])
    return
  define = _DEFINE_BY_TYPE[_value_type(field.type)]
  if define is flags.DEFINE_list:
    default = list(default)
  define(field.name, default, meta["help"])


for _field in dataclasses.fields(config_lib.Config):
  _define(_field)
del _field

flags.mark_flag_as_required("model_dir")

# Not a run setting: how a failure is shown.
TRACEBACK = flags.DEFINE_bool(
    "traceback", False,
    "On failure, print the Python traceback before the one-line error.")
PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False,
    "Print every resolved option as a flagfile (what <model_dir>/run.cfg "
    "holds) and exit, before TensorFlow starts.")


def config_from_flags() -> config_lib.Config:
  """Returns the typed Config for the parsed flags; raises ConfigError.

  Every Config field has a flag of the same name, so the mapping is by name.
  """
  values = {field.name: flags.FLAGS[field.name].value
            for field in dataclasses.fields(config_lib.Config)}
  return config_lib.Config(**values)


def _shown_default(field: dataclasses.Field) -> str:
  meta = field.metadata
  if meta["shown"] is not None:
    return meta["shown"]
  value = field.default
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, str):
    return f"`{value}`"
  return "" if value is None else f"{value:g}" if isinstance(
      value, float) else str(value)


def flag_table() -> str:
  """The table of every flag in docs/flags.md, in Markdown."""
  rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
  for field in dataclasses.fields(config_lib.Config):
    help_text = field.metadata["help"].replace("|", "\\|")
    rows.append(f"| `--{field.name}` | {_shown_default(field)} | "
                f"{help_text} |")
  for holder in (TRACEBACK, PRINT_CONFIG):
    rows.append(f"| `--{holder.name}` | false | "
                f"{flags.FLAGS[holder.name].help} |")
  return "\n".join(rows) + "\n"
