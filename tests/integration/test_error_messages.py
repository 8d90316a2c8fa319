"""Failures that only need to raise, in this process through the Python API:
the error class, its exit code and the message the command line prints as
its one `dist_train: error:` line (`main` prints a DistTrainError as it is).

tests/e2e/test_failures.py, test_bad_input.py and test_tasks.py run some of
the same failures through the command line, for the line's format and exit
code; starting TensorFlow once here instead of once per failure is what
keeps these checks cheap.
"""

import sys

import pytest

from dist_train import config as config_lib
from dist_train import errors
from dist_train import train
from tests.helpers import task_fixtures
from tests.helpers import user_code

# 8 steps of 32 synthetic examples, no validation pass.
SMALL_RUN = dict(dataset="synthetic", num_train_examples=256,
                 num_validation_examples=64, global_batch_size=32, epochs=1,
                 mode="train")
BLOBS = dict(dataset="tests.helpers.plugin_fixtures:blobs",
             model="tests.helpers.plugin_fixtures:blob_model",
             global_batch_size=32, epochs=1)


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
  """(module path, file) of the failing user code, importable here."""
  module, file, _ = user_code.write_package(tmp_path_factory.mktemp("user"))
  path = str(file.parent.parent)
  sys.path.insert(0, path)
  yield module, file
  sys.path.remove(path)
  for name in list(sys.modules):
    if name.split(".")[0] == user_code.USER_PACKAGE:
      del sys.modules[name]


@pytest.fixture(scope="module")
def strategy(tmp_path_factory):
  """One strategy for every run of the module (the default for a config)."""
  return train.create_strategy(config_lib.Config(
      model_dir=str(tmp_path_factory.mktemp("strategy"))))


def train_error(strategy, model_dir, **options):
  """The DistTrainError that training `options` raises, after checking that
  it carries the exit code of bad input and left no checkpoint."""
  config = config_lib.Config(model_dir=str(model_dir), **options)
  with pytest.raises(errors.DistTrainError) as raised:
    train.train_and_evaluate(config, strategy=strategy)
  assert raised.value.exit_code == errors.EXIT_BAD_INPUT
  assert not (model_dir / "checkpoints").exists()
  return raised.value


# User code that raises, or cannot be called as dist_train calls it: the
# message names the flag, the exception and the user's own file:line.


@pytest.mark.parametrize("flag, function, expected", [
    ("model", "two_args", "TypeError: two_args(config, extra) cannot be called "
     "with 1 positional argument(s) (Config): missing a required argument: "
     "'extra' (defined at {def two_args})"),
    ("model", "raises", "raised ValueError: bad width (at {raise ValueError})"),
    ("dataset", "data_raises", "raised RuntimeError: no train data here (at "
     "{raise RuntimeError})"),
    ("dataset", "data_one_arg", "TypeError: data_one_arg(split) cannot be "
     "called with 2 positional argument(s) (str, Config): too many positional "
     "arguments (defined at {def data_one_arg})"),
])
def test_user_code_that_raises_names_flag_exception_and_line(
    tmp_path, strategy, user_module, flag, function, expected):
  module, file = user_module
  error = train_error(strategy, tmp_path / "run",
                      **{**SMALL_RUN, flag: f"{module}:{function}"})
  where = expected[expected.index("{") + 1:expected.index("}")]
  expected = expected.replace(f"{{{where}}}", user_code.line_of(file, where))
  separator = " " if expected.startswith("raised") else ": "
  assert str(error) == f"--{flag}={module}:{function}{separator}{expected}"


# Any other exception: the message names the phase of the run it ended, and
# the user's file:line when user code raised it.


@pytest.mark.parametrize("options, phase, message, where", [
    (dict(model="{module}:raises_in_training"),
     "training steps 1-8",
     "RuntimeError: boom in training (in Boom.call())",
     'raise RuntimeError("boom in training")'),
    # The first examples are read before training, when the task's loss is
    # checked on them.
    (dict(dataset="{module}:corrupt_records"),
     "checking the task's loss on one batch",
     "InvalidArgumentError: in the input pipeline (MapDataset): ValueError: "
     "corrupt record", 'raise ValueError("corrupt record")'),
    # Of unknown size: the examples are counted while loading.
    (dict(dataset="{module}:corrupt_records_of_unknown_size"),
     "loading the train data",
     "InvalidArgumentError: in the input pipeline (MapDataset): ValueError: "
     "corrupt record", 'raise ValueError("corrupt record")'),
])
def test_other_exceptions_name_the_phase(tmp_path, strategy, user_module,
                                         options, phase, message, where):
  module, file = user_module
  error = train_error(strategy, tmp_path / "run", **{
      **SMALL_RUN, **{name: value.format(module=module)
                      for name, value in options.items()}})
  assert isinstance(error, errors.PhaseError)
  assert error.phase == phase
  assert str(error).startswith(
      f"{phase}: {message} (at {user_code.line_of(file, where)})")


# Bad user data: named before or while training, never trained on.


@pytest.mark.parametrize("dataset, message", [
    ("blobs_with_nan", "NaN or Inf in the features of "
     "--dataset=tests.helpers.plugin_fixtures:blobs_with_nan (train)"),
    ("empty_train", "(train) is empty"),
])
def test_bad_user_data_stops_the_run(tmp_path, strategy, dataset, message):
  error = train_error(strategy, tmp_path / "run", **{
      **BLOBS, "dataset": f"tests.helpers.plugin_fixtures:{dataset}"})
  assert message in str(error)


# Unusable tasks (tests/e2e/test_tasks.py runs one through the command line).


@pytest.mark.parametrize("name", list(task_fixtures.BAD_TASKS))
def test_unusable_task_raises_one_line(tmp_path, strategy, name):
  task, message = task_fixtures.BAD_TASKS[name]
  error = train_error(strategy, tmp_path / "run", task=task, epochs=1)
  assert message in str(error)
  assert "\n" not in str(error)
