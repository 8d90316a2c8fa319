"""Command line: flags -> Config -> train_and_evaluate.

    python -m dist_train.main --flagfile=launch/flags/quickstart.cfg
    python -m dist_train.main --flagfile=launch/flags/mnist.cfg --data_dir=DIR

Flags after --flagfile override it. The configuration is validated before
TensorFlow is imported, so a bad flag costs well under a second.
"""

import os
import re
import sys

from absl import app
from absl import flags

from dist_train import cluster
from dist_train import config as config_lib
from dist_train import flags as flags_lib


# Exit codes, as documented in the README ("Failure behaviour").
EXIT_BAD_INPUT = 1  # Flags, data, plug-ins or checkpoints unusable.
EXIT_NON_FINITE = 3  # A loss term or weight became NaN or Inf.


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
    # The cluster in the environment (TF_CONFIG, SLURM) is checked too.
    cluster.resolve_strategy(config, os.environ)
  except config_lib.ConfigError as e:
    sys.exit(f"dist_train: error: {e}")

  # Imported here so that flag errors are reported before TensorFlow loads.
  # pylint: disable=import-outside-toplevel
  import tensorflow as tf
  from dist_train import checkpoints
  from dist_train import data
  from dist_train import guards
  from dist_train import plugins
  from dist_train import preemption
  from dist_train import train
  # pylint: enable=import-outside-toplevel
  try:
    train.run(config)
  except (data.DataError, plugins.PluginError, train.NoCheckpointError,
          checkpoints.CheckpointError) as e:
    _exit(EXIT_BAD_INPUT, e)
  except guards.NonFiniteError as e:
    _exit(EXIT_NON_FINITE, e)
  except preemption.Preempted as e:
    _exit(preemption.EXIT_PREEMPTED, e)
  except tf.errors.InvalidArgumentError as e:
    # Bad values found inside the compiled step (labels out of range, NaN
    # inputs): the op's own message names them.
    _exit(EXIT_BAD_INPUT, op_error_summary(e.message))


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


def _exit(code, message):
  print(f"dist_train: error: {message}", file=sys.stderr)
  sys.exit(code)


def run_cli():
  """The `dist-train` console script: `python -m dist_train.main`."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run_cli()
