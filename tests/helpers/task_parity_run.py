"""Trains test tasks with N logical CPU replicas and saves their weights.

Run as its own process (one process sets its device layout once). One case:

    python tests/helpers/task_parity_run.py --task=masked_sequences --cpu_replicas=3 \
        --grad_accum_steps=2 --output=F.npz

Several cases, one after another on the same strategy, each with its own
model_dir and .npz in --output_dir (a JSON list of objects with
`name`, `task` (a function of tests/helpers/task_fixtures.py, or
module:function)
and optional `grad_accum_steps`, `global_batch_size`, `epochs`
and `flags`, Config overrides):

    python tests/helpers/task_parity_run.py --cpu_replicas=3 --output_dir=D \
        --cases='[{"name": "seq_2", "task": "masked_sequences",
                   "grad_accum_steps": 2}]'

Each .npz holds the weights before (`initial_<i>`) and after (`final_<i>`)
training, in `model.weights` order, the global step (the optimizer's
iterations) and the final training metrics (`train_<name>`).
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parse_value(value):
  for kind in (int, float):
    try:
      return kind(value)
    except ValueError:
      pass
  return value


def _config(case, cpu_replicas, model_dir):
  from dist_train import config as config_lib  # pylint: disable=import-outside-toplevel
  from tests.helpers import parity_run  # pylint: disable=import-outside-toplevel
  settings = dict(learning_rate=0.05, optimizer="sgd", log_every_steps=5,
                  steps_per_loop=3, seed=7, mode="train",
                  health_scalars=parity_run.health_scalars(cpu_replicas))
  settings.update(case.get("flags", {}))
  task = case["task"]  # A function of task_fixtures, or module:function.
  return config_lib.Config(
      model_dir=model_dir, cpu_replicas=cpu_replicas,
      task=task if ":" in task else f"tests.helpers.task_fixtures:{task}",
      grad_accum_steps=case.get("grad_accum_steps", 1),
      global_batch_size=case.get("global_batch_size", 32),
      epochs=case.get("epochs", 2), **settings)


def _train(config, strategy, output):
  """Trains one case on `strategy` and saves what the tests compare."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from dist_train import train  # pylint: disable=import-outside-toplevel

  task = train.create_task(config)
  build_model = task.build_model
  initial = []

  def build_and_record():
    model = build_model()
    initial.extend(v.numpy() for v in model.weights)
    return model

  task.build_model = build_and_record
  result = train.train_and_evaluate(config, task=task, strategy=strategy)
  final = [v.numpy() for v in result.model.weights]
  np.savez(output, global_step=result.global_step,
           num_replicas=strategy.num_replicas_in_sync,
           **{f"initial_{i}": w for i, w in enumerate(initial)},
           **{f"final_{i}": w for i, w in enumerate(final)},
           **{f"train_{k}": v for k, v in result.train_metrics.items()},
           **{f"validation_{k}": v
              for k, v in result.validation_metrics.items()})


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--cpu_replicas", type=int, default=1)
  parser.add_argument("--cases", help="JSON list of cases (see above)")
  parser.add_argument("--output_dir", help="where --cases write NAME.npz")
  parser.add_argument("--task", help="the one case's task_fixtures function")
  parser.add_argument("--grad_accum_steps", type=int, default=1)
  parser.add_argument("--global_batch_size", type=int, default=32)
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--extra", action="append", default=[],
                      help="name=value Config overrides (floats/ints/str)")
  parser.add_argument("--output", help="the one case's .npz")
  args = parser.parse_args()
  if args.cases:
    cases = json.loads(args.cases)
    outputs = [os.path.join(args.output_dir, f"{case['name']}.npz")
               for case in cases]
    model_dirs = [os.path.join(args.output_dir, f"{case['name']}_model")
                  for case in cases]
  else:
    extra = dict(item.split("=", 1) for item in args.extra)
    cases = [{"task": args.task, "grad_accum_steps": args.grad_accum_steps,
              "global_batch_size": args.global_batch_size,
              "epochs": args.epochs,
              "flags": {"mode": "train_and_evaluate",
                        **{k: _parse_value(v) for k, v in extra.items()}}}]
    outputs = [args.output]
    model_dirs = [tempfile.mkdtemp(prefix="task_parity_")]

  from dist_train import train  # pylint: disable=import-outside-toplevel
  configs = [_config(case, args.cpu_replicas, model_dir)
             for case, model_dir in zip(cases, model_dirs)]
  # One strategy for every case: the device layout is set once per process.
  strategy = train.create_strategy(configs[0])
  for config, output in zip(configs, outputs):
    _train(config, strategy, output)


if __name__ == "__main__":
  main()
