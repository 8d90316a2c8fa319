"""The run configuration: one frozen, typed object built from flags in `main`.

This module imports no TensorFlow, so a bad configuration is reported in well
under a second, before TensorFlow starts.
"""

import dataclasses
import os
from typing import Optional

DATASETS = ("mnist", "mnist_sample", "synthetic")
OPTIMIZERS = ("sgd", "adam")
STRATEGIES = ("auto", "mirrored", "one_device")
ADD_LOSS_REDUCTIONS = ("mean", "sum")


class ConfigError(ValueError):
  """A configuration value is impossible; the message names the flag and the value."""


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run needs. Field names match the command-line flags.

  Library code takes this object (or explicit arguments), never absl FLAGS.
  """

  model_dir: str
  # Data.
  dataset: str = "mnist_sample"
  data_dir: Optional[str] = None
  num_validation_examples: int = 10000
  num_train_examples: Optional[int] = None
  shuffle_buffer: int = 1024
  seed: int = 0
  # Optimisation.
  global_batch_size: int = 64
  epochs: int = 3
  learning_rate: float = 1e-3
  optimizer: str = "sgd"
  # Model and extra losses.
  hidden_units: int = 64
  activity_regularization: float = 0.0
  add_loss_reduction: str = "mean"
  kernel_l2: float = 0.0
  # Loop and logging.
  log_every_steps: int = 200
  steps_per_loop: int = 100
  keep_checkpoints: int = 5
  # Distribution.
  strategy: str = "auto"
  num_gpus: Optional[int] = None
  cpu_replicas: Optional[int] = None

  def __post_init__(self):
    validate(self)

  def replace(self, **changes) -> "Config":
    return dataclasses.replace(self, **changes)


def _check_choice(name, value, choices):
  if value not in choices:
    raise ConfigError(
        f"--{name} must be one of {'|'.join(choices)}, got {value!r}")


def _check_positive(name, value):
  if value is None or value <= 0:
    raise ConfigError(f"--{name} must be positive, got {value}")


def _check_non_negative(name, value):
  if value is None or value < 0:
    raise ConfigError(f"--{name} must be non-negative, got {value}")


def validate(config: Config) -> None:
  """Raises ConfigError naming the first impossible flag value in `config`."""
  if not config.model_dir:
    raise ConfigError("--model_dir is required")
  if os.path.exists(config.model_dir) and not os.path.isdir(config.model_dir):
    raise ConfigError(
        f"--model_dir must be a directory, got the file {config.model_dir}")
  _check_choice("dataset", config.dataset, DATASETS)
  _check_choice("optimizer", config.optimizer, OPTIMIZERS)
  _check_choice("strategy", config.strategy, STRATEGIES)
  _check_choice("add_loss_reduction", config.add_loss_reduction,
                ADD_LOSS_REDUCTIONS)
  for name in ("global_batch_size", "epochs", "log_every_steps",
               "steps_per_loop", "keep_checkpoints", "hidden_units",
               "shuffle_buffer"):
    _check_positive(name, getattr(config, name))
  if not config.learning_rate > 0:
    raise ConfigError(
        f"--learning_rate must be positive, got {config.learning_rate}")
  for name in ("num_validation_examples", "activity_regularization",
               "kernel_l2"):
    _check_non_negative(name, getattr(config, name))
  if config.num_train_examples is not None:
    _check_positive("num_train_examples", config.num_train_examples)
  if config.num_gpus is not None:
    _check_non_negative("num_gpus", config.num_gpus)
  if config.cpu_replicas is not None:
    _check_positive("cpu_replicas", config.cpu_replicas)
    if config.strategy == "one_device":
      raise ConfigError(
          "--cpu_replicas splits the CPU into replicas for a mirrored strategy "
          f"and cannot be combined with --strategy=one_device "
          f"(got --cpu_replicas={config.cpu_replicas})")
    if config.num_gpus:
      raise ConfigError(
          "--cpu_replicas hides all GPUs and cannot be combined with "
          f"--num_gpus={config.num_gpus}")
