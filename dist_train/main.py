"""Command line: flags -> Config -> train_and_evaluate.

    python -m dist_train.main --flagfile=launch/flags/quickstart.cfg
    python -m dist_train.main --flagfile=launch/flags/mnist.cfg --data_dir=DIR

Flags after --flagfile override it. The configuration is validated before
TensorFlow is imported, so a bad flag costs well under a second.
"""

import sys

from absl import app
from absl import flags

from dist_train import config as config_lib
from dist_train import flags as flags_lib


def parse_flags(argv):
  """Parses flags; a bad flag or flagfile exits 1 with one line on stderr."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"dist_train: error: {e}")


def main(argv):
  if len(argv) > 1:
    sys.exit(f"dist_train: error: unexpected arguments {argv[1:]}")
  try:
    config = flags_lib.config_from_flags()
  except config_lib.ConfigError as e:
    sys.exit(f"dist_train: error: {e}")

  # Imported here so that flag errors are reported before TensorFlow loads.
  from dist_train import data  # pylint: disable=import-outside-toplevel
  from dist_train import plugins  # pylint: disable=import-outside-toplevel
  from dist_train import train  # pylint: disable=import-outside-toplevel
  try:
    train.run(config)
  except (data.DataError, plugins.PluginError, train.NoCheckpointError) as e:
    sys.exit(f"dist_train: error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
