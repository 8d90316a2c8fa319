"""The run configuration: one frozen, typed object built from flags in `main`.

This module imports no TensorFlow, so a bad configuration is reported in well
under a second, before TensorFlow starts.
"""

import dataclasses
import os
from typing import Optional

DATASETS = ("mnist", "mnist_sample", "synthetic")
MODELS = ("mlp", "cnn")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "step")
MODES = ("train", "evaluate", "train_and_evaluate")
STRATEGIES = ("auto", "mirrored", "one_device", "multi_worker")
CLUSTERS = ("auto", "tf_config", "slurm")
COLLECTIVES = ("auto", "ring", "nccl")
ADD_LOSS_REDUCTIONS = ("mean", "sum")
ON_CORRUPT_CHECKPOINT = ("fail", "previous")
MIXED_PRECISION_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


class ConfigError(ValueError):
  """A configuration value is impossible; the message names the flag and the value."""


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run needs. Field names match the command-line flags.

  Library code takes this object (or explicit arguments), never absl FLAGS.
  """

  model_dir: str
  mode: str = "train_and_evaluate"
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
  momentum: float = 0.9
  weight_decay: float = 0.004
  lr_schedule: str = "constant"
  warmup_steps: int = 0
  lr_boundaries: tuple = ()
  lr_decay_factor: float = 0.1
  clip_norm: Optional[float] = None
  # Model and extra losses.
  model: str = "mlp"
  hidden_units: int = 64
  activity_regularization: float = 0.0
  add_loss_reduction: str = "mean"
  kernel_l2: float = 0.0
  # Loop and logging.
  log_every_steps: int = 200
  steps_per_loop: int = 100
  keep_checkpoints: int = 5
  checkpoint_every_steps: Optional[int] = None
  on_corrupt_checkpoint: str = "fail"
  export_saved_model: bool = False
  # Speed (see precision.py and trainer.py).
  mixed_precision: str = "float32"
  jit_compile: bool = False
  # Distribution.
  strategy: str = "auto"
  num_gpus: Optional[int] = None
  cpu_replicas: Optional[int] = None
  # Multi-worker (see cluster.py).
  cluster: str = "auto"
  collective: str = "auto"
  collective_timeout_s: float = 300.0
  slurm_port_base: int = 8888

  def __post_init__(self):
    # Flags give lists of strings; keep an immutable tuple of ints.
    object.__setattr__(self, "lr_boundaries", _int_tuple(
        "lr_boundaries", self.lr_boundaries))
    validate(self)

  def replace(self, **changes) -> "Config":
    return dataclasses.replace(self, **changes)


def _int_tuple(name, values):
  try:
    return tuple(int(v) for v in (values or ()))
  except (TypeError, ValueError):
    raise ConfigError(
        f"--{name} must be a comma-separated list of integers, got {values!r}"
    ) from None


def is_import_path(value: str) -> bool:
  """True for a user plug-in given as `package.module:function`."""
  module, _, attribute = value.partition(":")
  return bool(module) and bool(attribute)


def _check_choice_or_import_path(name, value, choices):
  if value in choices or is_import_path(value):
    return
  raise ConfigError(
      f"--{name} must be one of {'|'.join(choices)} or package.module:function, "
      f"got {value!r}")


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
  _check_choice("mode", config.mode, MODES)
  _check_choice_or_import_path("dataset", config.dataset, DATASETS)
  _check_choice_or_import_path("model", config.model, MODELS)
  _check_choice("optimizer", config.optimizer, OPTIMIZERS)
  _check_choice("lr_schedule", config.lr_schedule, LR_SCHEDULES)
  _check_choice("on_corrupt_checkpoint", config.on_corrupt_checkpoint,
                ON_CORRUPT_CHECKPOINT)
  if config.checkpoint_every_steps is not None:
    _check_positive("checkpoint_every_steps", config.checkpoint_every_steps)
  _check_choice("strategy", config.strategy, STRATEGIES)
  _check_choice("add_loss_reduction", config.add_loss_reduction,
                ADD_LOSS_REDUCTIONS)
  _check_choice("mixed_precision", config.mixed_precision,
                MIXED_PRECISION_POLICIES)
  for name in ("global_batch_size", "epochs", "log_every_steps",
               "steps_per_loop", "keep_checkpoints", "hidden_units",
               "shuffle_buffer"):
    _check_positive(name, getattr(config, name))
  if not config.learning_rate > 0:
    raise ConfigError(
        f"--learning_rate must be positive, got {config.learning_rate}")
  for name in ("num_validation_examples", "activity_regularization",
               "kernel_l2", "momentum", "weight_decay", "warmup_steps",
               "lr_decay_factor"):
    _check_non_negative(name, getattr(config, name))
  if config.clip_norm is not None and not config.clip_norm > 0:
    raise ConfigError(f"--clip_norm must be positive, got {config.clip_norm}")
  if any(b <= 0 for b in config.lr_boundaries) or list(
      config.lr_boundaries) != sorted(set(config.lr_boundaries)):
    raise ConfigError("--lr_boundaries must be increasing positive steps, got "
                      f"{','.join(map(str, config.lr_boundaries))}")
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
  _validate_multi_worker(config)


def _validate_multi_worker(config: Config) -> None:
  """The multi-worker flags; the environment is checked by `cluster`."""
  _check_choice("cluster", config.cluster, CLUSTERS)
  _check_choice("collective", config.collective, COLLECTIVES)
  if not config.collective_timeout_s > 0:
    raise ConfigError("--collective_timeout_s must be positive, got "
                      f"{config.collective_timeout_s}")
  if not 0 < config.slurm_port_base < 65536:
    raise ConfigError("--slurm_port_base must be a port number, got "
                      f"{config.slurm_port_base}")
  if config.strategy == "multi_worker" and config.cpu_replicas is not None:
    # On CPU, MultiWorkerMirroredStrategy places one replica on each worker
    # and ignores logical CPU devices.
    raise ConfigError(
        "--cpu_replicas cannot be combined with --strategy=multi_worker: on "
        "CPU each worker is one replica, so start more workers instead "
        f"(got --cpu_replicas={config.cpu_replicas})")
  if config.collective != "auto" and config.strategy in ("mirrored",
                                                          "one_device"):
    raise ConfigError(
        f"--collective={config.collective} applies to --strategy=multi_worker "
        f"(or auto on a cluster), not --strategy={config.strategy}")
