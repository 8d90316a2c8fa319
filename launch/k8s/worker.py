"""Starts this pod's worker of a Kubernetes Indexed Job (see job.yaml).

    python -m launch.k8s.worker --job_name=dist-train --service=dist-train \
        --num_workers=2 -- --flagfile=launch/flags/multi_node.cfg --model_dir=/runs/mnist

Pod i of the Job (JOB_COMPLETION_INDEX, set by Kubernetes) becomes worker i,
reachable at <job_name>-<i>.<service>:<port>; worker 0 is the chief. Flags
after `--` go to `python -m dist_train.main`, which replaces this process.
"""

import os
import sys

from absl import app
from absl import flags

from launch import workers

_JOB_NAME = flags.DEFINE_string("job_name", None, "metadata.name of the Job.")
_SERVICE = flags.DEFINE_string(
    "service", None, "The headless Service named in the pod's subdomain.")
_NUM_WORKERS = flags.DEFINE_integer(
    "num_workers", None, "The Job's completions and parallelism.",
    lower_bound=1)
_PORT = flags.DEFINE_integer("port", 2222, "The port every worker listens on.")
flags.mark_flags_as_required(["job_name", "service", "num_workers"])


def main(argv):
  try:
    tf_config = workers.indexed_job_environment(
        os.environ, job_name=_JOB_NAME.value, service=_SERVICE.value,
        num_workers=_NUM_WORKERS.value, port=_PORT.value)
  except workers.ConfigError as e:
    sys.exit(f"launch.k8s.worker: error: {e}")
  command = workers.worker_command(argv[1:])
  os.execvpe(command[0], command, {**os.environ, **tf_config})


if __name__ == "__main__":
  app.run(main)
