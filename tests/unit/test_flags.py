"""The flags are derived from the Config: one definition per option."""

import dataclasses
import os

from absl import flags
from absl.testing import flagsaver

from dist_train import config as config_lib
from dist_train import flags as flags_lib
from tests.helpers import processes


def test_every_config_field_is_a_flag_with_its_default_and_help():
  for field in dataclasses.fields(config_lib.Config):
    flag = flags.FLAGS[field.name]
    default = field.default
    if isinstance(default, tuple):
      default = list(default)
    assert flag.default == default, field.name
    assert flag.help.endswith(field.metadata["help"]), field.name
    if field.metadata["choices"] and not field.metadata["import_path"]:
      assert tuple(flag.parser.enum_values) == field.metadata["choices"], (
          field.name)


def test_flags_give_the_config_of_the_same_values():
  with flagsaver.flagsaver():
    flags.FLAGS(["dist_train", "--model_dir=/tmp/dist_train_test_flags",
                 "--optimizer=adamw", "--lr_boundaries=3,6",
                 "--clip_norm=0.5", "--jit_compile"])
    config = flags_lib.config_from_flags()
  assert config == config_lib.Config(
      model_dir="/tmp/dist_train_test_flags", optimizer="adamw",
      lr_boundaries=(3, 6), clip_norm=0.5, jit_compile=True)


def test_docs_flag_table_is_generated_from_the_config():
  with open(os.path.join(processes.REPO_ROOT, "docs", "flags.md")) as f:
    page = f.read()
  assert flags_lib.flag_table() in page, (
      "the flag table of docs/flags.md is out of date; run "
      "python scripts/update_flag_table.py")
