"""What the doctor reports before its checks: versions, the CUDA stack
TensorFlow was built with, the devices, and the cluster this process joins.

The `format_*` functions take plain values (what `collect_*` read from
TensorFlow) and return lines, so they are tested without a GPU or a cluster.
No TensorFlow at import.
"""

import platform
from typing import Mapping, Optional, Sequence

from dist_train.doctor import rendezvous

_WIDTH = 12  # The label column.


def line(label: str, value: str) -> str:
  return f"  {label:<{_WIDTH}} {value}"


def format_versions(versions: Mapping[str, str]) -> list:
  """One line per package: python, tensorflow, keras, dist_train."""
  return [line(name, version) for name, version in versions.items()]


def format_build_info(build_info: Mapping[str, object]) -> list:
  """CUDA, cuDNN and NCCL as TensorFlow's build reports them.

  A build without CUDA says so; NCCL is named only by builds that report it
  (the pip wheels take it from the nvidia-nccl package at run time).
  """
  if not build_info.get("is_cuda_build"):
    rocm = " (a ROCm build)" if build_info.get("is_rocm_build") else ""
    return [line("CUDA", f"none: TensorFlow was built without CUDA{rocm}")]
  capabilities = build_info.get("cuda_compute_capabilities") or []
  cuda = str(build_info.get("cuda_version") or "unknown")
  if capabilities:
    cuda += f" (compute capabilities {', '.join(capabilities)})"
  return [line("CUDA", cuda),
          line("cuDNN", str(build_info.get("cudnn_version") or "unknown")),
          line("NCCL", str(build_info.get("nccl_version")
                           or "not reported by this TensorFlow build"))]


def _megabytes(size: int) -> str:
  return f"{size / 2**20:.0f} MiB"


def format_device(name: str, device_type: str, *,
                  details: Optional[Mapping[str, object]] = None,
                  memory: Optional[Mapping[str, int]] = None) -> str:
  """`name (type[, model, compute capability][, memory in use/peak])`."""
  parts = [device_type]
  details = details or {}
  if details.get("device_name"):
    parts.append(str(details["device_name"]))
  if details.get("compute_capability"):
    major, minor = details["compute_capability"]
    parts.append(f"compute capability {major}.{minor}")
  if memory is not None and device_type == "GPU":
    parts.append(f"memory in use {_megabytes(memory['current'])}, peak "
                 f"{_megabytes(memory['peak'])}")
  return f"{name} ({', '.join(parts)})"


def format_devices(devices: Sequence[str], replicas: Sequence[str]) -> list:
  """The visible devices, then the strategy's replicas."""
  lines = [line("visible" if i == 0 else "", device)
           for i, device in enumerate(devices)] or [line("visible", "none")]
  lines.append(line("replicas", f"{len(replicas)}: {', '.join(replicas)}"))
  return lines


def task_name(task_type: str, index: int) -> str:
  return f"{task_type} {index}"


def cluster_tasks(spec: Mapping[str, Sequence[str]], task_type: str,
                  task_id: int):
  """(this task, its peers) of a cluster spec {task type: [host:port]}."""
  tasks = [rendezvous.Task(task_name(kind, i), address)
           for kind in ("chief", "worker") for i, address in
           enumerate(spec.get(kind, []))]
  me = rendezvous.Task(task_name(task_type, task_id),
                       spec[task_type][task_id])
  return me, [task for task in tasks if task != me]


_KINDS = {"tf_config": "from TF_CONFIG", "slurm": "from the SLURM job step"}


def format_cluster(kind: Optional[str], me: Optional[rendezvous.Task],
                   peers: Sequence[rendezvous.Task]) -> list:
  """The cluster this process would join: where it is described, this
  task, and its peers' addresses."""
  if kind is None or me is None:
    return [line("cluster", "none: this process trains alone "
                 "(no TF_CONFIG, no SLURM job step of several tasks)")]
  workers = f"{len(peers) + 1} worker{'s' if peers else ''}"
  lines = [line("cluster", f"{_KINDS[kind]}, {workers}; this is {me}")]
  lines += [line("peer", str(peer)) for peer in peers]
  return lines


# Reading them from TensorFlow.


def collect_versions() -> dict:
  # pylint: disable=import-outside-toplevel
  import keras
  import tensorflow as tf
  from dist_train import __version__
  return {"python": platform.python_version(), "tensorflow": tf.__version__,
          "keras": keras.__version__, "dist_train": __version__}


def collect_devices(task: Optional[rendezvous.Task] = None) -> list:
  """A line per logical device of this process (of `task` in a cluster,
  where TensorFlow also lists the peers'), with what TensorFlow says of it."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  own = (None if task is None else
         "/job:{}/replica:0/task:{}/".format(*task.name.split()))
  physical = {device.name.replace("physical_device:", "device:"): device
              for device in tf.config.list_physical_devices()}
  lines = []
  for device in tf.config.list_logical_devices():
    if own is not None and own not in device.name:
      continue
    short = device.name.split("/device:", 1)[-1]
    details, memory = None, None
    if device.device_type == "GPU":
      match = [p for name, p in physical.items() if name.endswith(short)]
      if match:
        details = tf.config.experimental.get_device_details(match[0])
      try:
        memory = tf.config.experimental.get_memory_info(short)
      except (ValueError, RuntimeError):
        memory = None
    lines.append(format_device(device.name, device.device_type,
                               details=details, memory=memory))
  return lines
