"""User models by import path, and a clear error for each malformed one."""

import numpy as np
import pytest

from dist_train import train
from dist_train import config as config_lib
from dist_train.data import datasets
from dist_train.data import mnist as mnist_data
from dist_train.models import mnist
from dist_train import user_code
from dist_train.outputs import summaries
from tests.helpers import processes
from tests.helpers import plugin_fixtures

CPU_TEST_FLAGS = f"--flagfile={processes.FLAGS_DIR}/cpu_test.cfg"


def test_user_model_trains_with_two_replicas(tmp_path):
  result = processes.run_cli(
      CPU_TEST_FLAGS, f"--model_dir={tmp_path / 'run'}",
      "--model=tests.helpers.plugin_fixtures:small_model", "--hidden_units=16",
      "--activity_regularization=0", check=True)
  assert "with 2 replica(s)" in result.stderr
  assert "epoch 2/2 done at step 38" in result.stderr
  assert (tmp_path / "run" / "export" / "model.keras").exists()


MALFORMED = [
    ("no_such_package.models:build",
     "cannot import module 'no_such_package.models'"),
    ("tests.helpers.plugin_fixtures:missing",
     "module 'tests.helpers.plugin_fixtures' has no attribute 'missing'"),
    ("tests.helpers.plugin_fixtures:NOT_CALLABLE", "'NOT_CALLABLE' is a int"),
    ("tests.helpers.plugin_fixtures:returns_none",
     "must return a keras.Model, got NoneType"),
    ("tests.helpers.plugin_fixtures:wrong_input_shape",
     "the model takes inputs of shape (100,) per example, but the data has "
     "features of shape (784,)"),
]


@pytest.mark.parametrize("model, message", MALFORMED)
def test_malformed_model_plugins_fail_clearly(tmp_path, model, message):
  config = config_lib.Config(model_dir=str(tmp_path), model=model)
  with pytest.raises(user_code.UserCodeError) as error:
    user_code.check_model_fits("model", model, mnist.create_model(config),
                             (mnist_data.NUM_FEATURES,))
  assert f"--model={model}" in str(error.value)
  assert message in str(error.value)


def test_malformed_plugin_exits_with_one_line_before_training(tmp_path):
  model, message = MALFORMED[-1]
  result = processes.run_cli(CPU_TEST_FLAGS, f"--model_dir={tmp_path / 'run'}",
                            f"--model={model}")
  assert result.returncode == 1
  [line] = [l for l in result.stderr.splitlines()
            if l.startswith("dist_train: error:")]
  assert f"--model={model}" in line and message in line, line
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_model_flag_without_function_is_refused_at_once(tmp_path):
  with pytest.raises(config_lib.ConfigError,
                     match="--model must be one of mlp|cnn or package"):
    config_lib.Config(model_dir=str(tmp_path),
                      model="tests.helpers.plugin_fixtures")


def test_user_model_and_dataset_train_with_two_replicas(tmp_path):
  result = processes.run_cli(
      f"--model_dir={tmp_path / 'run'}", "--cpu_replicas=2",
      "--dataset=tests.helpers.plugin_fixtures:blobs",
      "--model=tests.helpers.plugin_fixtures:blob_model", "--global_batch_size=32",
      "--epochs=3", "--learning_rate=0.1", "--log_every_steps=5",
      check=True)
  assert "Training 300 examples, validating 90" in result.stderr
  assert "with 2 replica(s)" in result.stderr
  assert "epoch 3/3 done at step 30" in result.stderr
  validation = summaries.read_scalars(str(tmp_path / "run" / "validation"))
  assert validation["accuracy"][-1][1] > 0.9  # Separable blobs are learnt.


@pytest.mark.parametrize("dataset, message", [
    ("tests.helpers.plugin_fixtures:returns_list",
     "must return a tf.data.Dataset, got list"),
    ("tests.helpers.plugin_fixtures:batched_blobs",
     "must yield unbatched examples with a scalar integer label, got labels "
     "of shape (None,)"),
    ("tests.helpers.plugin_fixtures:features_only",
     "must yield (features, labels) pairs"),
    ("tests.helpers.plugin_fixtures:infinite_blobs", "(train) is infinite"),
    ("tests.helpers.plugin_fixtures:nothing_here",
     "module 'tests.helpers.plugin_fixtures' has no attribute 'nothing_here'"),
])
def test_malformed_dataset_plugins_fail_clearly(tmp_path, dataset, message):
  config = config_lib.Config(model_dir=str(tmp_path), dataset=dataset)
  with pytest.raises(user_code.UserCodeError) as error:
    train.load_splits(config)
  assert f"--dataset={dataset}" in str(error.value)
  assert message in str(error.value)


def test_user_dataset_is_checked_against_the_model(tmp_path):
  config = config_lib.Config(model_dir=str(tmp_path),
                             dataset="tests.helpers.plugin_fixtures:blobs")
  splits = train.load_splits(config)
  assert (len(splits.train), len(splits.validation)) == (300, 90)
  with pytest.raises(user_code.UserCodeError,
                     match=r"inputs of shape \(784,\) per example, but the "
                           r"data has features of shape \(12,\)"):
    user_code.check_model_fits("model", "mlp", mnist.create_model(config),
                             splits.train.feature_shape)


def test_user_dataset_is_checked_by_the_rule_of_a_tasks_data(tmp_path):
  """A --dataset function's splits pass the same check as a task's
  build_dataset: (features, label, sample_weight) triples are taken too."""
  config = config_lib.Config(
      model_dir=str(tmp_path),
      dataset="tests.helpers.plugin_fixtures:weighted_blobs")
  splits = train.load_splits(config)
  assert (len(splits.train), len(splits.validation)) == (300, 90)
  assert len(splits.train.dataset.element_spec) == 3
  same = datasets.task_split(
      plugin_fixtures.weighted_blobs("train", config), where="a task",
      required=True)
  assert len(same) == len(splits.train)


def test_num_train_examples_takes_the_first_user_examples(tmp_path):
  config = config_lib.Config(model_dir=str(tmp_path), num_train_examples=100,
                             dataset="tests.helpers.plugin_fixtures:blobs")
  splits = train.load_splits(config)
  # --num_validation_examples does not apply to a user dataset.
  assert (len(splits.train), len(splits.validation)) == (100, 90)
  taken = list(splits.train.dataset.as_numpy_iterator())
  full = list(plugin_fixtures.blobs("train", config).as_numpy_iterator())
  assert len(taken) == 100 and len(full) == 300
  for (features, label), (full_features, full_label) in zip(taken, full):
    np.testing.assert_array_equal(features, full_features)
    assert label == full_label


def test_num_train_examples_of_a_user_dataset_from_the_command_line(tmp_path):
  result = processes.run_cli(
      f"--model_dir={tmp_path / 'run'}", "--num_train_examples=100",
      "--dataset=tests.helpers.plugin_fixtures:blobs",
      "--model=tests.helpers.plugin_fixtures:blob_model", "--hidden_units=8",
      "--global_batch_size=32", "--epochs=1", check=True)
  assert ("Training 100 examples, validating 90, in global batches of 32 "
          "(4 steps per epoch)") in result.stderr
  assert "epoch 1/1 done at step 4 " in result.stderr
