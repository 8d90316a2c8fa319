"""Parity runs and their comparison: what the parity, speed-mode, input,
multi-worker and fault-tolerance tests share.

A parity run is `tests/helpers/parity_run.py` training several cases in one
process with one replica count (a process can form one device layout); it
saves each case's initial and final weights and what it ran.
"""

import concurrent.futures
import json
import os

import numpy as np
import tensorflow as tf

from tests.helpers import parity_run
from tests.helpers import processes

TOLERANCE = 1e-5
# The compared weights must move from their initial values by more than this.
MIN_MOVED = 100 * TOLERANCE

# The case the multi-worker, input and fault-tolerance runs train.
PARITY_CASE = "reference_sum"
PARITY_FLAGS = parity_run.cli_flags(PARITY_CASE)
STEPS = 22  # 11 an epoch, 2 epochs.
NUM_WEIGHTS = 6  # 3 Dense layers: kernels and biases.


def train(output_dir, cases, replicas):
  """Trains `cases` in one process with `replicas` replicas.

  Returns:
    {(case, replicas): {name: array}} of what parity_run.py saved.
  """
  processes.run_python(["tests/helpers/parity_run.py",
                        f"--cases={','.join(cases)}",
                        f"--cpu_replicas={replicas}",
                        f"--output_dir={output_dir}"], check=True,
                       timeout=900)
  return load(output_dir, cases, replicas)


def load(output_dir, cases, replicas):
  """{(case, replicas): {name: array}} of runs `train` saved in output_dir."""
  results = {}
  for case in cases:
    with np.load(os.path.join(output_dir, f"{case}_{replicas}.npz")) as f:
      results[(case, replicas)] = dict(f)
  return results


def train_all(output_dir, cases_by_replicas):
  """`train` for each replica count, two processes at a time (one per core
  of a small CI machine), the most replicas (the slowest) first.

  Args:
    output_dir: where each run saves its results.
    cases_by_replicas: {replicas: [case, ...]}.
  """
  results = {}
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    for future in [pool.submit(train, output_dir, cases_by_replicas[replicas],
                               replicas)
                   for replicas in sorted(cases_by_replicas, reverse=True)]:
      results.update(future.result())
  return results


def train_tasks(tmp_dir, cases, replicas, *, timeout=900):
  """Trains task `cases` (dicts of tests/helpers/task_parity_run.py) in one
  process with `replicas` replicas, under tmp_dir/replicas_<replicas>.

  Returns:
    {case name: {name: array}} of what task_parity_run.py saved.
  """
  output_dir = os.path.join(tmp_dir, f"replicas_{replicas}")
  os.makedirs(output_dir)
  processes.run_python(
      ["tests/helpers/task_parity_run.py", f"--cpu_replicas={replicas}",
       f"--output_dir={output_dir}", f"--cases={json.dumps(cases)}"],
      timeout=timeout, check=True)
  results = {}
  for case in cases:
    with np.load(os.path.join(output_dir, f"{case['name']}.npz")) as f:
      results[case["name"]] = dict(f)
  return results


def _numbered(result, prefix):
  names = sorted((k for k in result if k.startswith(prefix)),
                 key=lambda k: int(k[len(prefix):]))
  return [result[k] for k in names]


def weights(result):
  """Every model variable at the end of the run, in model order."""
  return _numbered(result, "weight_")


def initial_weights(result):
  """Every model variable before the first step, in model order."""
  return _numbered(result, "initial_")


def max_difference(a, b):
  """The largest absolute difference between two lists of arrays."""
  assert len(a) == len(b) > 0
  assert [x.shape for x in a] == [y.shape for y in b]
  return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def max_weight_difference(a, b):
  return max_difference(weights(a), weights(b))


def moved(result):
  """How far the run's weights moved from its own initial weights."""
  return max_difference(weights(result), initial_weights(result))


def checkpoint_values(model_dir):
  """(step, {name: array}) of the latest checkpoint in model_dir."""
  path = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
  assert path is not None, f"no checkpoint in {model_dir}"
  reader = tf.train.load_checkpoint(path)
  values = {name: reader.get_tensor(name)
            for name in reader.get_variable_to_shape_map()
            if name != "_CHECKPOINTABLE_OBJECT_GRAPH"}
  return int(path.rsplit("-", 1)[1]), values


def checkpoint_weights(values):
  """The model's trainable variables in model order, from checkpoint values
  (the checkpoint reaches them through the optimizer, which lists them)."""
  return [values[f"optimizer/_trainable_variables/{i}/.ATTRIBUTES/"
                 "VARIABLE_VALUE"] for i in range(NUM_WEIGHTS)]


def max_checkpoint_difference(a_dir, b_dir, reference):
  """The largest difference between the values of the latest checkpoints in
  a_dir and b_dir (weights, global step, epoch, step in epoch), after
  checking that both ran STEPS steps and moved far from `reference`'s
  initial weights (a parity_run.py result)."""
  (a_step, a), (b_step, b) = checkpoint_values(a_dir), checkpoint_values(b_dir)
  assert a_step == b_step == STEPS
  assert sorted(a) == sorted(b)
  initial = initial_weights(reference)
  for values in (a, b):
    distance = max_difference(checkpoint_weights(values), initial)
    print(f"moved {distance:.2e} from the initial weights")
    assert distance > MIN_MOVED
  # save_counter counts saves, which --checkpoint_every_steps changes.
  return max(float(np.max(np.abs(a[name] - b[name]))) for name in a
             if not name.startswith("save_counter/"))
