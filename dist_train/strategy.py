"""The one place that configures devices and builds the tf.distribute strategy.

Call `create_strategy` once, before any other TensorFlow op: logical CPU devices
and GPU visibility can only be set before the runtime initialises.
"""

from absl import logging
import tensorflow as tf

from dist_train import config as config_lib


def configure_cpu_replicas(num_replicas: int) -> list[str]:
  """Hides GPUs and splits the CPU into `num_replicas` logical devices.

  This lets the mirrored code path run with several replicas on a machine with
  no accelerator, which is how every distributed test runs.

  Returns:
    The logical CPU device names.

  Raises:
    RuntimeError: if the TensorFlow runtime was already initialised with a
      different device layout.
  """
  cpu = tf.config.list_physical_devices("CPU")[0]
  try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * num_replicas)
  except RuntimeError as e:
    existing = tf.config.list_logical_devices("CPU")
    if len(existing) != num_replicas:
      raise RuntimeError(
          f"--cpu_replicas={num_replicas} must be applied before TensorFlow "
          f"initialises, but it already runs with {len(existing)} CPU "
          "devices") from e
  return [d.name for d in tf.config.list_logical_devices("CPU")]


def _local_gpus(num_gpus):
  gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
  return gpus if num_gpus is None else gpus[:num_gpus]


def create_strategy(config: config_lib.Config) -> tf.distribute.Strategy:
  """Builds the strategy the config asks for.

  auto and mirrored: MirroredStrategy over the local GPUs (at most
  `num_gpus`), else over the CPU; with `cpu_replicas`, over that many logical
  CPU devices. one_device: the first GPU, else the CPU.
  """
  if config.cpu_replicas is not None:
    devices = configure_cpu_replicas(config.cpu_replicas)
  elif config.num_gpus == 0:
    tf.config.set_visible_devices([], "GPU")
    devices = ["/cpu:0"]
  else:
    devices = _local_gpus(config.num_gpus) or ["/cpu:0"]

  if config.strategy == "one_device":
    strategy = tf.distribute.OneDeviceStrategy(devices[0])
  elif config.strategy in ("auto", "mirrored"):
    strategy = tf.distribute.MirroredStrategy(devices=devices)
  else:
    raise ValueError(f"unknown strategy {config.strategy!r}")
  logging.info("Strategy %s with %d replica(s) on %s",
               type(strategy).__name__, strategy.num_replicas_in_sync,
               ", ".join(devices))
  return strategy


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True on the one task that writes summaries and checkpoints to model_dir.

  Single-host strategies have one task, which is the chief.
  """
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or resolver.task_type is None:
    return True
  return strategy.extended.should_checkpoint
