"""TensorBoard scalars, written by the chief only.

Every worker computes the same aggregated metrics; one copy of the event files
is what a reader expects, so other tasks get writers that write nothing.
"""

import os

import tensorflow as tf


class SummaryWriters:
  """One event-file writer per split (`train`, `validation`) under model_dir."""

  def __init__(self, model_dir: str, *, enabled: bool):
    self._model_dir = model_dir
    self._enabled = enabled
    self._writers = {}

  def _writer(self, split):
    if split not in self._writers:
      self._writers[split] = (
          tf.summary.create_file_writer(os.path.join(self._model_dir, split))
          if self._enabled else tf.summary.create_noop_writer())
    return self._writers[split]

  def write_scalars(self, split: str, scalars: dict, step: int) -> None:
    """Writes each name -> float of `scalars` at `step` under `split`."""
    writer = self._writer(split)
    with writer.as_default(step=step):
      for name, value in scalars.items():
        tf.summary.scalar(name, value)
    writer.flush()

  def close(self):
    for writer in self._writers.values():
      writer.close()
