"""The one place that configures devices and builds the tf.distribute strategy.

Call `create_strategy` once, before any other TensorFlow op: logical CPU devices
and GPU visibility can only be set before the runtime initialises, and
MultiWorkerMirroredStrategy must start its collective runtime first.
"""

import signal
import threading
from typing import Optional

from absl import logging
import tensorflow as tf

from dist_train.distribute import cluster as cluster_lib
from dist_train.distribute import join_guard

_COLLECTIVES = {
    "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
    "ring": tf.distribute.experimental.CommunicationImplementation.RING,
    "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
}


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


def create_strategy(resolved: cluster_lib.Resolved, *,
                    num_gpus: Optional[int] = None,
                    cpu_replicas: Optional[int] = None,
                    collective: str = "auto",
                    collective_timeout_s: float = 300.0,
                    slurm_port_base: int = 8888) -> tf.distribute.Strategy:
  """Builds the strategy `resolved` names, on this process's devices.

  mirrored: MirroredStrategy over the local GPUs (at most `num_gpus`), else
  over the CPU; with `cpu_replicas`, over that many logical CPU devices.
  one_device: the first GPU, else the CPU. multi_worker: see
  `_create_multi_worker_strategy`.
  """
  if resolved.strategy == "multi_worker":
    return _create_multi_worker_strategy(
        resolved, num_gpus=num_gpus, collective=collective,
        collective_timeout_s=collective_timeout_s,
        slurm_port_base=slurm_port_base)
  if cpu_replicas is not None:
    devices = configure_cpu_replicas(cpu_replicas)
  elif num_gpus == 0:
    tf.config.set_visible_devices([], "GPU")
    devices = ["/cpu:0"]
  else:
    devices = _local_gpus(num_gpus) or ["/cpu:0"]

  if resolved.strategy == "one_device":
    strategy = tf.distribute.OneDeviceStrategy(devices[0])
  elif resolved.strategy == "mirrored":
    strategy = tf.distribute.MirroredStrategy(devices=devices)
  else:
    raise ValueError(f"unknown strategy {resolved.strategy!r}")
  logging.info("Strategy %s with %d replica(s) on %s",
               type(strategy).__name__, strategy.num_replicas_in_sync,
               ", ".join(devices))
  return strategy


def create_cluster_resolver(resolved: cluster_lib.Resolved, slurm_port_base: int = 8888):
  """The cluster of multi_worker: from TF_CONFIG, the SLURM step, or none.

  With no cluster, the resolver is empty and the strategy has one worker.
  Must run before any TensorFlow op (it only reads the environment and lists
  physical devices).
  """
  if resolved.cluster == "slurm":
    return _slurm_cluster_resolver(resolved.slurm, slurm_port_base)
  return tf.distribute.cluster_resolver.TFConfigClusterResolver()


def _slurm_cluster_resolver(step, port_base):
  slurm = tf.distribute.cluster_resolver.SlurmClusterResolver(
      port_base=port_base,
      # Only the cluster spec is taken from SlurmClusterResolver. Its GPU
      # bookkeeping cannot describe CPU-only tasks (0 GPUs per task fails)
      # and would overwrite the CUDA_VISIBLE_DEVICES SLURM gave the task, so
      # it gets a layout that always resolves and leaves the GPUs alone.
      gpus_per_node=step.num_tasks, gpus_per_task=1, auto_set_gpu=False)
  cluster_spec = slurm.cluster_spec()
  return tf.distribute.cluster_resolver.SimpleClusterResolver(
      cluster_spec, task_type=slurm.task_type, task_id=slurm.task_id,
      num_accelerators={"GPU": len(tf.config.get_visible_devices("GPU"))},
      rpc_layer="grpc")


def _create_multi_worker_strategy(
    resolved, *, num_gpus, collective, collective_timeout_s, slurm_port_base
) -> tf.distribute.MultiWorkerMirroredStrategy:
  """MultiWorkerMirroredStrategy over every worker of the cluster.

  Each worker contributes its local GPUs (at most `num_gpus`), or one CPU
  replica. `collective` picks the all-reduce. The collectives get no
  timeout of their own: TensorFlow implements one with a thread per
  collective that sleeps for the timeout, so a run of fast steps piles up
  thousands of threads until the worker aborts. `collective_timeout_s` is
  kept by `watchdog.CollectiveWatchdog` instead, and a dead peer is
  detected by the coordination service's heartbeats.
  """
  if num_gpus is not None:
    gpus = tf.config.list_physical_devices("GPU")
    tf.config.set_visible_devices(gpus[:num_gpus], "GPU")
  resolver = create_cluster_resolver(resolved, slurm_port_base)
  options = tf.distribute.experimental.CommunicationOptions(
      implementation=_COLLECTIVES[collective])
  sigterm_handler = signal.getsignal(signal.SIGTERM)
  # The line a launcher or a test waits for: from here until every worker
  # has joined, this process blocks inside TensorFlow.
  logging.info("Joining the cluster as task %s:%s; waiting for every "
               "worker", resolver.task_type, resolver.task_id)
  # A stop signal here ends the worker at once (join_guard: TensorFlow holds
  # Python's lock until every worker has joined).
  with join_guard.exit_on_stop():
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=resolver, communication_options=options)
  if (sigterm_handler is not None
      and threading.current_thread() is threading.main_thread()):
    # The strategy's coordination service replaces the SIGTERM handler with
    # one that only records a notice for TensorFlow's own preemption
    # handling, which dist_train does not use: SIGTERM would no longer stop
    # the worker, and a launcher or scheduler (scancel, pod deletion) would
    # wait for its kill timeout. Restore the handler in place before.
    signal.signal(signal.SIGTERM, sigterm_handler)
  task = (f"{resolver.task_type}:{resolver.task_id}"
          if resolver.task_type is not None else "the only worker")
  logging.info(
      "Strategy MultiWorkerMirroredStrategy with %d replica(s) on %d "
      "worker(s); this is task %s%s; collective %s, timeout %gs",
      strategy.num_replicas_in_sync, num_workers(strategy), task,
      "" if is_chief(strategy) else
      " (not the chief: the chief logs the progress and writes model_dir)",
      collective, collective_timeout_s)
  return strategy


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True on the one task that writes summaries and checkpoints to model_dir.

  Single-host strategies have one task, which is the chief.
  """
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or resolver.task_type is None:
    return True
  return strategy.extended.should_checkpoint


def num_workers(strategy: tf.distribute.Strategy) -> int:
  """How many worker processes take part in `strategy` (1 on one host)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None:
    return 1
  spec = resolver.cluster_spec()
  return max(1, sum(spec.num_tasks(job) for job in spec.jobs
                    if job in cluster_lib.TASK_TYPES))
