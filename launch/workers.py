"""How the launchers start workers: TF_CONFIG per worker, ports, GPU shares,
commands, and the Kubernetes Indexed Job environment.

No TensorFlow here: the launchers start workers without loading it.
"""

import json
import socket
import sys
from typing import Mapping, Optional, Sequence, Union

from dist_train.distribute import cluster

LOOPBACK = "127.0.0.1"
ConfigError = cluster.ConfigError


def make_tf_config(addresses: Sequence[str], index: int) -> dict:
  """TF_CONFIG of worker `index` of a cluster of workers at `addresses`.

  Worker 0 is the chief: MultiWorkerMirroredStrategy makes it the task that
  checkpoints and writes summaries when the cluster names no "chief".
  """
  if not 0 <= index < len(addresses):
    raise ValueError(
        f"index must be in [0, {len(addresses)}), got {index}")
  return {"cluster": {"worker": list(addresses)},
          "task": {"type": "worker", "index": index}}


def free_ports(count: int, host: str = LOOPBACK) -> list:
  """`count` distinct TCP ports that are free on `host` right now.

  All are bound (to port 0, so the kernel picks) before any is released, so
  they differ; another process may still take one before a worker binds it.
  """
  sockets = []
  try:
    for _ in range(count):
      s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      sockets.append(s)
      s.bind((host, 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def visible_gpus(index: int, gpus_per_worker: int,
                 available: Optional[Sequence[str]] = None) -> str:
  """CUDA_VISIBLE_DEVICES of local worker `index`: its own consecutive GPUs.

  Args:
    index: the worker.
    gpus_per_worker: how many GPUs each worker gets.
    available: the GPU ids to share out (the launcher's own
      CUDA_VISIBLE_DEVICES); default: 0, 1, 2, ...

  Raises:
    ValueError: `available` holds too few GPUs for this worker.
  """
  first, end = index * gpus_per_worker, (index + 1) * gpus_per_worker
  if available is None:
    return ",".join(str(gpu) for gpu in range(first, end))
  if end > len(available):
    raise ValueError(
        f"worker {index} needs GPUs {first}..{end - 1} of "
        f"CUDA_VISIBLE_DEVICES={','.join(available)}, which has "
        f"{len(available)}")
  return ",".join(available[first:end])


def local_worker_envs(num_workers: int, *, base_env: Mapping[str, str],
                      gpus_per_worker: Optional[int] = None,
                      ports: Optional[Sequence[int]] = None,
                      host: str = LOOPBACK) -> list:
  """The environments of `num_workers` workers on this host.

  Args:
    num_workers: how many workers.
    base_env: the environment they inherit.
    gpus_per_worker: when given, worker i sees only GPUs [i*K, (i+1)*K)
      (0 hides every GPU), counted in the CUDA_VISIBLE_DEVICES of `base_env`
      if it has one; by default each sees what `base_env` shows.
    ports: one port per worker; by default free ports on `host`.
    host: the address the workers listen on and reach each other at.

  Returns:
    One environment per worker, with its TF_CONFIG.
  """
  if num_workers < 1:
    raise ValueError(f"num_workers must be positive, got {num_workers}")
  ports = list(ports) if ports is not None else free_ports(num_workers, host)
  if len(ports) != num_workers:
    raise ValueError(
        f"need {num_workers} ports, got {len(ports)}: {ports}")
  addresses = [f"{host}:{port}" for port in ports]
  mask = base_env.get("CUDA_VISIBLE_DEVICES")
  available = mask.split(",") if mask else None
  envs = []
  for index in range(num_workers):
    env = dict(base_env)
    env[cluster.TF_CONFIG] = json.dumps(make_tf_config(addresses, index))
    if gpus_per_worker is not None:
      env["CUDA_VISIBLE_DEVICES"] = visible_gpus(index, gpus_per_worker,
                                                 available)
    envs.append(env)
  return envs


def worker_command(dist_train_flags: Sequence[str],
                   python: Union[str, Sequence[str]] = sys.executable) -> list:
  """The command line of one worker: `python -m dist_train.main FLAGS`.

  `python` is the interpreter, or a command that ends in one (a list).
  """
  python = [python] if isinstance(python, str) else list(python)
  return [*python, "-m", "dist_train.main", *dist_train_flags]


def indexed_job_tf_config(*, job_name: str, service: str, num_workers: int,
                          index: int, port: int) -> dict:
  """TF_CONFIG of pod `index` of a Kubernetes Indexed Job.

  The Job's pods are named `<job_name>-<index>`; with the pod template's
  `subdomain` set to a headless service, pod i is reachable at
  `<job_name>-<i>.<service>`.
  """
  addresses = [f"{job_name}-{i}.{service}:{port}" for i in range(num_workers)]
  return make_tf_config(addresses, index)


def indexed_job_environment(environ: Mapping[str, str], *, job_name: str,
                            service: str, num_workers: int,
                            port: int) -> dict:
  """{TF_CONFIG: ...} of this pod of a Kubernetes Indexed Job.

  The pod's index is JOB_COMPLETION_INDEX, which the Job controller sets.

  Raises:
    ConfigError: JOB_COMPLETION_INDEX is missing or not an index of the Job.
  """
  value = environ.get("JOB_COMPLETION_INDEX")
  try:
    index = int(value)
  except (TypeError, ValueError):
    raise ConfigError(
        "JOB_COMPLETION_INDEX must be the pod's index in an Indexed Job, got "
        f"{value!r}") from None
  if not 0 <= index < num_workers:
    raise ConfigError(
        f"JOB_COMPLETION_INDEX must be in [0, {num_workers}) for "
        f"--num_workers={num_workers}, got {index}")
  return {cluster.TF_CONFIG: json.dumps(indexed_job_tf_config(
      job_name=job_name, service=service, num_workers=num_workers,
      index=index, port=port))}
