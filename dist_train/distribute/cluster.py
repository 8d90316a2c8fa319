"""Which cluster this process belongs to (TF_CONFIG, a SLURM job step), and so
which strategy it runs.

No TensorFlow here: a bad cluster environment is reported before TensorFlow
starts. `resolve` reads the environment once; `strategy.py` builds the
strategy from its result. How workers are started lives in `launch/`.
"""

import dataclasses
import json
from typing import Mapping, Optional

from dist_train import config as config_lib

TF_CONFIG = "TF_CONFIG"
# The task types MultiWorkerMirroredStrategy trains with; each is one worker.
TASK_TYPES = ("chief", "worker")
# What srun sets in every task of a job step. A batch script or an salloc
# shell has no SLURM_STEP_NUM_TASKS, so it is not mistaken for a cluster.
_SLURM_STEP_VARIABLES = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS",
                         "SLURM_STEP_NODELIST", "SLURM_STEP_TASKS_PER_NODE")

ConfigError = config_lib.ConfigError


# TF_CONFIG.


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


@dataclasses.dataclass(frozen=True)
class Resolved:
  """The cluster this process is part of, and the strategy it must build.

  Built once, by `resolve`, before TensorFlow starts.
  """

  strategy: str  # mirrored, one_device or multi_worker: never auto.
  cluster: Optional[str]  # tf_config, slurm, or None (no cluster).
  num_workers: int
  slurm: Optional[SlurmStep] = None


def _find_cluster(cluster: str, environ: Mapping[str, str]):
  """(kind, number of tasks, SLURM step) of the cluster `environ` describes.

  Raises:
    ConfigError: `cluster` names a description the environment lacks, or
      the description is unusable.
  """
  if cluster in ("auto", "tf_config") and environ.get(TF_CONFIG):
    tf_config = parse_tf_config(environ[TF_CONFIG])
    return "tf_config", num_tf_config_tasks(tf_config), None
  if cluster == "tf_config":
    raise ConfigError(
        "--cluster=tf_config needs the TF_CONFIG environment variable, which "
        "is not set")
  step = slurm_step(environ)
  if cluster == "slurm":
    if step is None:
      raise ConfigError(
          "--cluster=slurm needs a SLURM job step (start every task with "
          "srun), but SLURM_STEP_NUM_TASKS is not set")
    return "slurm", step.num_tasks, step
  if step is not None and step.num_tasks > 1:
    return "slurm", step.num_tasks, step
  return None, 1, None


def resolve(*, strategy: str, cluster: str, cpu_replicas: Optional[int],
            environ: Mapping[str, str]) -> Resolved:
  """Reads the cluster from `environ` and decides the strategy.

  Args:
    strategy: --strategy; `auto` is multi_worker when the cluster has several
      tasks, else mirrored.
    cluster: --cluster: auto, tf_config or slurm.
    cpu_replicas: --cpu_replicas, which a cluster of several tasks refuses.
    environ: the process environment.

  Raises:
    ConfigError: the environment and the flags contradict each other.
  """
  kind, tasks, step = _find_cluster(cluster, environ)
  if strategy in ("mirrored", "one_device") and tasks > 1:
    # Every task would train a model of its own into the same model_dir.
    raise ConfigError(
        f"--strategy={strategy} trains on one host, but this process "
        f"is one of {tasks} tasks of a cluster ({_describe(kind)}); use "
        "--strategy=multi_worker or auto")
  if strategy == "auto":
    if tasks > 1 and cpu_replicas is not None:
      raise ConfigError(
          f"--cpu_replicas cannot be combined with a cluster of {tasks} tasks "
          f"({_describe(kind)}), on which --strategy=auto means multi_worker: "
          f"on CPU each worker is one replica (got --cpu_replicas="
          f"{cpu_replicas})")
    strategy = "multi_worker" if tasks > 1 else "mirrored"
  return Resolved(strategy=strategy, cluster=kind, num_workers=tasks,
                  slurm=step)


def _describe(cluster):
  return {"tf_config": "from TF_CONFIG", "slurm": "from the SLURM job step"}[
      cluster]
