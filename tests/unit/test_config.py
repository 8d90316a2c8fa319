"""Config validation: impossible values are named with their value."""

import pytest

from dist_train import config as config_lib
from tests.helpers import processes


def test_defaults_are_valid(tmp_path):
  config = config_lib.Config(model_dir=str(tmp_path))
  assert config.global_batch_size == 64
  assert config.replace(epochs=5).epochs == 5


@pytest.mark.parametrize("changes, message", [
    (dict(global_batch_size=0), "--global_batch_size must be positive, got 0"),
    (dict(global_batch_size=-4), "--global_batch_size must be positive, got -4"),
    (dict(epochs=0), "--epochs must be positive, got 0"),
    (dict(learning_rate=0.0), "--learning_rate must be positive, got 0.0"),
    (dict(dataset="imagenet"), "--dataset must be one of"),
    (dict(kernel_l2=-1.0), "--kernel_l2 must be non-negative, got -1.0"),
    (dict(strategy="one_device", cpu_replicas=2),
     "cannot be combined with --strategy=one_device"),
    (dict(cpu_replicas=0), "--cpu_replicas must be positive, got 0"),
    (dict(model_dir=""), "--model_dir is required"),
])
def test_invalid_values_are_named(tmp_path, changes, message):
  fields = dict(model_dir=str(tmp_path))
  fields.update(changes)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.Config(**fields)


def test_model_dir_that_is_a_file_is_refused(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("x")
  with pytest.raises(config_lib.ConfigError, match="must be a directory"):
    config_lib.Config(model_dir=str(path))


def test_config_module_does_not_import_tensorflow():
  """Flag errors are reported before TensorFlow loads."""
  result = processes.run_python([
      "-c", "import sys; import dist_train.flags, dist_train.main; "
            "print('tensorflow' in sys.modules)"], check=True)
  assert result.stdout.strip() == "False"
