"""Starts N dist_train workers on this host, each with its own TF_CONFIG.

    python -m launch.local --num_workers=2 -- \
        --flagfile=launch/flags/quickstart.cfg --model_dir=/tmp/dist_train/two_workers
    python -m launch.local --num_workers=2 --gpus_per_worker=4 -- \
        --flagfile=launch/flags/mnist.cfg --model_dir=/tmp/dist_train/mnist

Flags after `--` go to every worker (`python -m dist_train.main`), whose
--strategy=auto becomes multi_worker. `-- doctor [flags]` runs `dist-train
doctor` on every worker instead, to check the cluster (dist_train/doctor). Workers listen on free loopback ports;
worker 0 is the chief. Output is streamed with a `[worker i]` prefix. When a
worker fails, the others are stopped and the launcher exits with that
worker's code (1 if a signal killed it); Ctrl-C and SIGTERM are forwarded to
the workers, and when all of them saved a checkpoint and stopped on SIGTERM
the launcher exits 75, like dist_train.main.
"""

import os
import shlex
import sys

from absl import app
from absl import flags

from launch import supervisor
from launch import workers

_NUM_WORKERS = flags.DEFINE_integer(
    "num_workers", 2, "How many worker processes to start.", lower_bound=1)
_GPUS_PER_WORKER = flags.DEFINE_integer(
    "gpus_per_worker", None,
    "Give worker i the GPUs [i*K, (i+1)*K) with CUDA_VISIBLE_DEVICES (0 hides "
    "all GPUs), counted among this process's CUDA_VISIBLE_DEVICES if set. "
    "Default: every worker sees what this process sees.",
    lower_bound=0)
_PYTHON = flags.DEFINE_string(
    "python", sys.executable,
    "The command that runs each worker's Python, split as a shell would: "
    "another environment's interpreter, or a wrapper command that ends in "
    "one. Default: this launcher's interpreter.")
_STOP_GRACE_S = flags.DEFINE_float(
    "stop_grace_s", 10.0,
    "Seconds a worker has to exit after SIGTERM before it is killed.",
    lower_bound=0.0)


def main(argv):
  worker_flags = argv[1:]
  try:
    envs = workers.local_worker_envs(
        _NUM_WORKERS.value, base_env=os.environ,
        gpus_per_worker=_GPUS_PER_WORKER.value)
  except ValueError as e:
    sys.exit(f"launch.local: error: {e}")
  python = shlex.split(_PYTHON.value)
  if not python:
    sys.exit("launch.local: error: --python must name an interpreter, got ''")
  commands = [workers.worker_command(worker_flags, python)] * _NUM_WORKERS.value
  sys.exit(supervisor.run_workers(commands, envs,
                                grace_s=_STOP_GRACE_S.value))


if __name__ == "__main__":
  app.run(main)
