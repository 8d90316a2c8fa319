"""Clusters of workers: TF_CONFIG, SLURM job steps, and how workers start.

No TensorFlow here: a bad cluster environment is reported before TensorFlow
starts, and the launchers in `launch/` use this module without loading it.
`strategy.py` turns what this module finds into a cluster resolver.
"""

import dataclasses
import json
import socket
import sys
from typing import Mapping, Optional, Sequence

from dist_train import config as config_lib

TF_CONFIG = "TF_CONFIG"
# The task types MultiWorkerMirroredStrategy trains with; each is one worker.
TASK_TYPES = ("chief", "worker")
LOOPBACK = "127.0.0.1"
# What srun sets in every task of a job step. A batch script or an salloc
# shell has no SLURM_STEP_NUM_TASKS, so it is not mistaken for a cluster.
_SLURM_STEP_VARIABLES = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS",
                         "SLURM_STEP_NODELIST", "SLURM_STEP_TASKS_PER_NODE")

ConfigError = config_lib.ConfigError


# TF_CONFIG.


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


def parse_tf_config(value: str) -> dict:
  """Returns TF_CONFIG as a dict, checked for what multi_worker can run.

  Raises:
    ConfigError: it is not JSON, names task types other than chief and
      worker, or its task is not one of its cluster's.
  """
  try:
    tf_config = json.loads(value)
  except json.JSONDecodeError as e:
    raise ConfigError(f"TF_CONFIG must be JSON ({e}), got {value!r}") from None
  if not isinstance(tf_config, dict):
    raise ConfigError(f"TF_CONFIG must be a JSON object, got {value!r}")
  cluster = tf_config.get("cluster") or {}
  if not isinstance(cluster, dict) or not all(
      isinstance(v, list) and all(isinstance(a, str) and ":" in a for a in v)
      for v in cluster.values()):
    raise ConfigError(
        "TF_CONFIG cluster must map task types to lists of host:port, got "
        f"{cluster!r}")
  other_types = sorted(set(cluster) - set(TASK_TYPES))
  if other_types:
    raise ConfigError(
        "TF_CONFIG cluster may name only chief and worker tasks for "
        f"--strategy=multi_worker, got {', '.join(other_types)}")
  if len(cluster.get("chief", [])) > 1:
    raise ConfigError(
        f"TF_CONFIG cluster may name one chief, got {cluster['chief']}")
  task = tf_config.get("task") or {}
  if cluster:
    task_type, index = task.get("type"), task.get("index")
    if (task_type not in cluster or not isinstance(index, int)
        or not 0 <= index < len(cluster[task_type])):
      sizes = ", ".join(f"{len(v)} {k}" for k, v in cluster.items())
      raise ConfigError(
          f"TF_CONFIG task must name a task of its cluster, got {task!r} for "
          f"a cluster of {sizes}")
  return tf_config


def num_tf_config_tasks(tf_config: dict) -> int:
  return sum(len(addresses) for addresses in
             (tf_config.get("cluster") or {}).values())


# SLURM.


@dataclasses.dataclass(frozen=True)
class SlurmStep:
  """The srun job step this process is one task of."""

  proc_id: int  # This task's rank in the step, 0 .. num_tasks - 1.
  num_tasks: int
  nodelist: str  # Compressed, e.g. "gpu[01-04]".
  tasks_per_node: str  # Compressed, e.g. "2(x4)".


def slurm_step(environ: Mapping[str, str]) -> Optional[SlurmStep]:
  """The SLURM job step described by `environ`, or None outside one.

  Raises:
    ConfigError: inside a job step whose variables are missing or malformed.
  """
  if "SLURM_STEP_NUM_TASKS" not in environ:
    return None
  missing = [name for name in _SLURM_STEP_VARIABLES if not environ.get(name)]
  if missing:
    raise ConfigError(
        f"the SLURM job step lacks {', '.join(missing)}; start every task "
        "with srun")
  try:
    proc_id = int(environ["SLURM_PROCID"])
    num_tasks = int(environ["SLURM_STEP_NUM_TASKS"])
  except ValueError:
    raise ConfigError(
        "SLURM_PROCID and SLURM_STEP_NUM_TASKS must be integers, got "
        f"{environ['SLURM_PROCID']!r} and "
        f"{environ['SLURM_STEP_NUM_TASKS']!r}") from None
  if not 0 <= proc_id < num_tasks:
    raise ConfigError(
        f"SLURM_PROCID must be in [0, {num_tasks}), got {proc_id}")
  return SlurmStep(proc_id=proc_id, num_tasks=num_tasks,
                   nodelist=environ["SLURM_STEP_NODELIST"],
                   tasks_per_node=environ["SLURM_STEP_TASKS_PER_NODE"])


# Which cluster, and which strategy.


def find_cluster(config: config_lib.Config,
                 environ: Mapping[str, str]) -> Optional[str]:
  """Where the cluster is described: "tf_config", "slurm", or None (no cluster).

  Raises:
    ConfigError: `config.cluster` names a description the environment lacks,
      or the description is unusable.
  """
  if config.cluster in ("auto", "tf_config") and environ.get(TF_CONFIG):
    parse_tf_config(environ[TF_CONFIG])
    return "tf_config"
  if config.cluster == "tf_config":
    raise ConfigError(
        "--cluster=tf_config needs the TF_CONFIG environment variable, which "
        "is not set")
  step = slurm_step(environ)
  if config.cluster == "slurm":
    if step is None:
      raise ConfigError(
          "--cluster=slurm needs a SLURM job step (start every task with "
          "srun), but SLURM_STEP_NUM_TASKS is not set")
    return "slurm"
  return "slurm" if step is not None and step.num_tasks > 1 else None


def num_tasks(cluster: Optional[str], environ: Mapping[str, str]) -> int:
  """How many tasks (workers) the cluster found by `find_cluster` has."""
  if cluster == "tf_config":
    return num_tf_config_tasks(parse_tf_config(environ[TF_CONFIG]))
  if cluster == "slurm":
    return slurm_step(environ).num_tasks
  return 1


def resolve_strategy(config: config_lib.Config,
                     environ: Mapping[str, str]) -> str:
  """The strategy to build: `config.strategy`, with `auto` decided.

  `auto` is multi_worker when the cluster has several tasks, else mirrored.

  Raises:
    ConfigError: the environment and the flags contradict each other.
  """
  cluster = find_cluster(config, environ)
  tasks = num_tasks(cluster, environ)
  if config.strategy in ("mirrored", "one_device") and tasks > 1:
    # Every task would train a model of its own into the same model_dir.
    raise ConfigError(
        f"--strategy={config.strategy} trains on one host, but this process "
        f"is one of {tasks} tasks of a cluster ({_describe(cluster)}); use "
        "--strategy=multi_worker or auto")
  if config.strategy != "auto":
    return config.strategy
  if tasks == 1:
    return "mirrored"
  if config.cpu_replicas is not None:
    raise ConfigError(
        f"--cpu_replicas cannot be combined with a cluster of {tasks} tasks "
        f"({_describe(cluster)}), on which --strategy=auto means multi_worker: "
        "on CPU each worker is one replica "
        f"(got --cpu_replicas={config.cpu_replicas})")
  return "multi_worker"


def _describe(cluster):
  return {"tf_config": "from TF_CONFIG", "slurm": "from the SLURM job step"}[
      cluster]


# Starting workers.


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
    env[TF_CONFIG] = json.dumps(make_tf_config(addresses, index))
    if gpus_per_worker is not None:
      env["CUDA_VISIBLE_DEVICES"] = visible_gpus(index, gpus_per_worker,
                                                 available)
    envs.append(env)
  return envs


def worker_command(dist_train_flags: Sequence[str],
                   python: str = sys.executable) -> list:
  """The command line of one worker: `python -m dist_train.main FLAGS`."""
  return [python, "-m", "dist_train.main", *dist_train_flags]


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
  return {TF_CONFIG: json.dumps(indexed_job_tf_config(
      job_name=job_name, service=service, num_workers=num_workers,
      index=index, port=port))}
