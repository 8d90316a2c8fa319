"""Trains a test task with N logical CPU replicas and saves its weights.

Run as its own process (one process sets its device layout once):

    python tests/task_parity_run.py --task=masked_sequences --cpu_replicas=3 \
        --grad_accum_steps=2 --output=F.npz
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--task", required=True)
  parser.add_argument("--cpu_replicas", type=int, default=1)
  parser.add_argument("--grad_accum_steps", type=int, default=1)
  parser.add_argument("--global_batch_size", type=int, default=32)
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--extra", action="append", default=[],
                      help="name=value Config overrides (floats/ints/str)")
  parser.add_argument("--output", required=True)
  args = parser.parse_args()

  import numpy as np  # pylint: disable=import-outside-toplevel
  from dist_train import config as config_lib  # pylint: disable=import-outside-toplevel
  from dist_train import train  # pylint: disable=import-outside-toplevel

  extra = {}
  for item in args.extra:
    name, value = item.split("=", 1)
    for kind in (int, float):
      try:
        value = kind(value)
        break
      except ValueError:
        pass
    extra[name] = value
  config = config_lib.Config(
      model_dir=tempfile.mkdtemp(prefix="task_parity_"),
      task=f"tests.task_fixtures:{args.task}",
      cpu_replicas=args.cpu_replicas,
      grad_accum_steps=args.grad_accum_steps,
      global_batch_size=args.global_batch_size, epochs=args.epochs,
      learning_rate=0.05, optimizer="sgd", log_every_steps=5,
      steps_per_loop=3, seed=7, **extra)
  result = train.train_and_evaluate(config)
  np.savez(args.output,
           weights=np.array([v.numpy() for v in result.model.weights],
                            dtype=object),
           global_step=result.global_step,
           num_replicas=result.num_replicas if hasattr(
               result, "num_replicas") else args.cpu_replicas,
           **{f"train_{k}": v for k, v in result.train_metrics.items()},
           **{f"validation_{k}": v
              for k, v in result.validation_metrics.items()})


if __name__ == "__main__":
  main()
