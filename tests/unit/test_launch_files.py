"""The evaluator's launch files point at the trainers' model_dir and parse.

No TensorFlow and no cluster: the YAML manifests are read with a small
loader (PyYAML is not a dependency), the sbatch scripts with `bash -n`, and
the evaluator's command is parsed into a Config and a strategy decision.
"""

import os
import re
import shlex
import subprocess

from absl import flags
from absl.testing import flagsaver

from dist_train import flags as flags_lib
from dist_train.distribute import cluster
from tests.helpers import processes

LAUNCH_DIR = os.path.join(processes.REPO_ROOT, "launch")


def _lines(text):
  """(indent, text) of the lines that hold YAML, comments removed."""
  for raw in text.splitlines():
    line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
    if line.strip():
      yield len(line) - len(line.lstrip()), line.strip()


def _scalar(text):
  return int(text) if re.fullmatch(r"-?\d+", text) else text


def _block(lines, i, indent):
  """Parses the mapping or list at `indent` from lines[i]; returns it and
  the index of the first line after it."""
  if lines[i][1].startswith("- "):
    items = []
    while i < len(lines) and lines[i][0] == indent and (
        lines[i][1].startswith("- ")):
      item = lines[i][1][2:]
      if re.match(r"[\w.-]+:( |$)", item):  # A mapping starts on this line.
        lines[i] = (indent + 2, item)
        value, i = _block(lines, i, indent + 2)
      else:
        value, i = _scalar(item), i + 1
      items.append(value)
    return items, i
  mapping = {}
  while i < len(lines) and lines[i][0] == indent:
    key, _, value = lines[i][1].partition(":")
    i += 1
    if value.strip():
      mapping[key] = _scalar(value.strip())
    elif i < len(lines) and (lines[i][0] > indent or (
        lines[i][0] == indent and lines[i][1].startswith("- "))):
      mapping[key], i = _block(lines, i, lines[i][0])
    else:
      mapping[key] = None
  return mapping, i


def load_yaml(path):
  """The documents of a block-style YAML file of mappings, lists and plain
  scalars, as launch/k8s writes them."""
  with open(path) as f:
    documents = re.split(r"^---$", f.read(), flags=re.M)
  loaded = []
  for document in documents:
    lines = list(_lines(document))
    value, end = _block(lines, 0, lines[0][0])
    assert end == len(lines), f"{path}: cannot read {lines[end]}"
    loaded.append(value)
  return loaded


def _flag(command, name):
  [value] = [arg.split("=", 1)[1] for arg in command
             if arg.startswith(f"--{name}=")]
  return value


def _config_and_strategy(args, environ):
  """The Config and the strategy decision of `dist_train.main ARGS`."""
  args = [arg.replace("--flagfile=launch/", f"--flagfile={LAUNCH_DIR}/")
          for arg in args]
  with flagsaver.flagsaver():
    flags.FLAGS(["dist_train", *args])
    config = flags_lib.config_from_flags()
  resolved = cluster.resolve(strategy=config.strategy,
                             cluster=config.cluster,
                             cpu_replicas=config.cpu_replicas, environ=environ)
  return config, resolved


def test_k8s_evaluator_job_reads_the_workers_volume_and_model_dir():
  service, job = load_yaml(os.path.join(LAUNCH_DIR, "k8s", "job.yaml"))
  [evaluator] = load_yaml(os.path.join(LAUNCH_DIR, "k8s", "evaluator.yaml"))
  assert service["kind"] == "Service" and job["kind"] == "Job"
  assert evaluator["kind"] == "Job"
  assert evaluator["spec"]["completions"] == 1
  assert evaluator["spec"]["parallelism"] == 1
  pod, worker_pod = evaluator["spec"]["template"]["spec"], job["spec"][
      "template"]["spec"]
  [container], [worker] = pod["containers"], worker_pod["containers"]
  assert "subdomain" not in pod  # One process, not a worker of the cluster.
  assert container["image"] == worker["image"]
  assert container["volumeMounts"] == worker["volumeMounts"]
  assert pod["volumes"] == worker_pod["volumes"]

  command = container["command"]
  worker_flags = worker["command"][worker["command"].index("--") + 1:]
  assert command[:3] == ["python", "-m", "dist_train.main"]
  for name in ("flagfile", "model_dir", "data_dir"):
    assert _flag(command, name) == _flag(worker_flags, name), name
  config, resolved = _config_and_strategy(command[3:], environ={})
  assert config.mode == "continuous_eval"
  assert (resolved.strategy, resolved.num_workers) == ("mirrored", 1)


def test_slurm_evaluator_script_runs_one_evaluator_with_the_trainers_flags():
  path = os.path.join(LAUNCH_DIR, "slurm_eval.sbatch")
  subprocess.run(["bash", "-n", path], check=True)
  with open(path) as f:
    script = f.read()
  with open(os.path.join(LAUNCH_DIR, "slurm.sbatch")) as f:
    trainers = f.read()
  assert re.search(r"^#SBATCH --ntasks=1$", script, re.M)
  assert re.search(r"^#SBATCH --nodes=1$", script, re.M)
  command = shlex.split(re.search(r"^srun (.*?)\"\$@\"", script,
                                  re.M | re.S).group(1).replace("\\\n", " "))
  trainer_command = shlex.split(re.search(
      r"^srun .*?(python .*?)\"\$@\"", trainers,
      re.M | re.S).group(1).replace("\\\n", " "))
  assert command[:3] == ["python", "-m", "dist_train.main"]
  assert _flag(command, "flagfile") == _flag(trainer_command, "flagfile")
  # As the script's example submits it, in a one-task job step.
  config, resolved = _config_and_strategy(
      [*command[3:], "--model_dir=/shared/runs/mnist",
       "--data_dir=/shared/data"],
      environ={"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "1",
               "SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "node1",
               "SLURM_STEP_TASKS_PER_NODE": "1"})
  assert config.mode == "continuous_eval"
  assert config.model_dir == "/shared/runs/mnist"
  assert (resolved.strategy, resolved.num_workers) == ("mirrored", 1)
