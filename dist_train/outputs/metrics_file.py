"""<model_dir>/metrics.jsonl: the chief's scalars as JSON lines, for tools
that read no TensorBoard events.

One object per write of scalars (a log interval of `train`, an evaluation
of `validation`): {"step", "epoch", "split", "wall_time", <scalar>: value,
...}, with the values TensorBoard got (rounded to float32 as there). A
resumed run drops the lines of steps after the checkpoint it resumed from
(their events are written again), so every (split, step) appears once.

Written through tf.io.gfile: appended to on local disks; elsewhere (gs://,
ram://, where files cannot be appended to) rewritten whole, at once.
"""

import json
import time

import numpy as np
import tensorflow as tf

from dist_train import errors
from dist_train.outputs import model_dir as model_dir_lib

DISABLED = "none"


class MetricsFileWriteError(errors.DistTrainError):
  """metrics.jsonl could not be written (a full disk, a lost mount)."""


def resolve_path(flag_value, model_dir: str):
  """The file --metrics_file names: default <model_dir>/metrics.jsonl;
  None for `none`."""
  if flag_value is None:
    return model_dir_lib.metrics_file(model_dir)
  return None if flag_value == DISABLED else flag_value


def read(path: str) -> list:
  """The file's records, in order; a line cut short (a crash while it was
  written) is left out."""
  if not tf.io.gfile.exists(path):
    return []
  records = []
  with tf.io.gfile.GFile(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except ValueError:
        continue
  return records


class MetricsFile:
  """Appends a record per write of scalars; a listener of
  `summaries.SummaryWriters` (`add_scalar_listener`)."""

  def __init__(self, path: str, *, steps_per_epoch: int):
    self._path = path
    self._steps_per_epoch = steps_per_epoch
    self._local = model_dir_lib.is_local(path)
    self._lines = []  # Kept to rewrite the file where it cannot be appended.

  def start(self, global_step: int) -> None:
    """Drops the records of steps after `global_step` (where training
    resumes), rewriting the file at once when any are."""
    records = read(self._path)
    kept = [r for r in records if r.get("step", 0) <= global_step]
    self._lines = [json.dumps(r) + "\n" for r in kept]
    exists = tf.io.gfile.exists(self._path)
    if exists and len(kept) != self._count_lines():
      model_dir_lib.write_file(self._path, "".join(self._lines))

  def _count_lines(self) -> int:
    with tf.io.gfile.GFile(self._path) as f:
      return sum(1 for _ in f)

  def __call__(self, split: str, scalars: dict, step: int) -> None:
    record = {"step": int(step),
              "epoch": (int(step) - 1) // self._steps_per_epoch + 1
                       if step > 0 else 0,
              "split": split, "wall_time": time.time()}
    record.update({name: float(np.float32(value))
                   for name, value in scalars.items()})
    line = json.dumps(record) + "\n"
    self._lines.append(line)
    try:
      if self._local:
        tf.io.gfile.makedirs(_parent(self._path))
        with tf.io.gfile.GFile(self._path, "a") as f:
          f.write(line)
      else:
        model_dir_lib.write_file(self._path, "".join(self._lines))
    except (OSError, tf.errors.OpError) as e:
      raise MetricsFileWriteError(
          f"cannot write the metrics file {self._path}: {errors.reason(e)}; "
          "the checkpoints are unaffected: free the space and rerun the same "
          "command to resume from the latest one") from e


def _parent(path: str) -> str:
  return path.rsplit("/", 1)[0] if "/" in path else "."
