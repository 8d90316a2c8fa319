"""The doctor's smoke test: an all-reduce over every replica of every worker,
and a checkpoint written and read back in the model_dir.

Each check returns the line it prints when it passes and raises
`CheckFailed` with the line that names what failed otherwise.
"""

import os
import re
from typing import Optional, Sequence

from dist_train.doctor import deadline
from dist_train.doctor import rendezvous
from dist_train.outputs import model_dir as model_dir_lib


class CheckFailed(Exception):
  """A check of the doctor failed; the message names what, on one line."""


def expected_sum(num_replicas: int) -> float:
  """The all-reduce's right answer: replica i contributes i + 1."""
  return num_replicas * (num_replicas + 1) / 2


def all_reduce(strategy) -> list:
  """Sums (global replica index + 1) over every replica in sync, with the
  strategy's own all-reduce (the one training uses); returns the sum each
  local replica received."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  def replica_fn():
    context = tf.distribute.get_replica_context()
    # replica_id_in_sync_group counts across workers: on worker w of a
    # cluster it is w * (replicas per worker) + the local index.
    value = tf.cast(context.replica_id_in_sync_group, tf.float32) + 1.0
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)

  @tf.function
  def step():
    return strategy.run(replica_fn)

  return [float(value) for value in
          strategy.experimental_local_results(step())]


def check_all_reduce(results: Sequence[float], *, num_replicas: int,
                     num_workers: int) -> str:
  """Raises CheckFailed unless every local replica got the right sum."""
  expected = expected_sum(num_replicas)
  where = f"{num_replicas} replica(s)" + (
      f" on {num_workers} workers" if num_workers > 1 else "")
  wrong = [(i, value) for i, value in enumerate(results)
           if abs(value - expected) > 1e-6]
  if not results or wrong:
    got = ", ".join(f"{value:g} on local replica {i}" for i, value in wrong)
    raise CheckFailed(
        f"the all-reduce over {where} summed (replica index + 1) to "
        f"{got or 'nothing'}, expected {expected:g}")
  return (f"all-reduce over {where}: sum of (replica index + 1) = "
          f"{expected:g} on every local replica")


_TASK_IN_ERROR = re.compile(
    r"/job:(chief|worker)(?:/replica:\d+)?/task:(\d+)")


def failed_peer(message: str, me: rendezvous.Task,
                peers: Sequence[rendezvous.Task]
                ) -> Optional[rendezvous.Task]:
  """The peer a TensorFlow error names (e.g. the coordination service's
  "/job:worker/replica:0/task:1 ... heartbeat timeout"), or None."""
  by_name = {peer.name: peer for peer in peers}
  for task_type, index in _TASK_IN_ERROR.findall(message):
    name = f"{task_type} {index}"
    if name != me.name and name in by_name:
      return by_name[name]
  return None


def late_all_reduce_message(*, timeout_s: float, num_workers: int,
                            peers: Sequence[rendezvous.Task]) -> str:
  """What to say when the all-reduce did not end in time."""
  dead = [peer for peer in peers if peer.address in
          deadline.unreachable([p.address for p in peers])]
  if dead:
    return (f"{dead[0]} did not join the all-reduce within {timeout_s:g} s "
            "(nothing listens at its address any more: did its process "
            "die?)")
  workers = f" across {num_workers} workers" if num_workers > 1 else ""
  return (f"the all-reduce{workers} did not finish within {timeout_s:g} s"
          + (" (every peer's address still answers)" if peers else ""))


def check_checkpoint(model_dir: str, task: str) -> str:
  """Writes a checkpoint of a small variable into a scratch folder of
  `model_dir`, reads it into another variable, compares, and removes it.

  Through tf.io.gfile and tf.train.Checkpoint, as the training run writes
  its checkpoints, so gs:// and ram:// model_dirs are checked the same way.
  """
  # pylint: disable=import-outside-toplevel
  import numpy as np
  import tensorflow as tf
  scratch = model_dir_lib.doctor_scratch_dir(
      model_dir, task.replace(" ", "-"), os.getpid())
  values = np.arange(1, 7, dtype=np.float32).reshape(2, 3) * (os.getpid() %
                                                              97 + 1)
  step = "writing"
  try:
    written = tf.train.Checkpoint(v=tf.Variable(values)).write(
        os.path.join(scratch, "ckpt"))
    step = "reading"
    restored = tf.Variable(tf.zeros_like(values))
    tf.train.Checkpoint(v=restored).read(written).assert_consumed()
    step = "removing"
    read_back = restored.numpy()
    tf.io.gfile.rmtree(scratch)
  except (tf.errors.OpError, OSError, AssertionError, ValueError) as e:
    reason = getattr(e, "message", None) or str(e)
    raise CheckFailed(
        f"{step} a test checkpoint in --model_dir={model_dir} failed: "
        f"{reason.strip().splitlines()[0] if reason.strip() else e!r}"
    ) from e
  if not np.array_equal(read_back, values):
    raise CheckFailed(
        f"the test checkpoint read back from --model_dir={model_dir} "
        f"differs from what was written: {read_back.tolist()} instead of "
        f"{values.tolist()}")
  return f"checkpoint written, read back and removed in {model_dir}"
