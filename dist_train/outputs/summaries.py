"""TensorBoard scalars, written by the chief only.

Every worker computes the same aggregated metrics; one copy of the event files
is what a reader expects, so other tasks get writers that write nothing.
"""

import os

import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import api as hparams_api


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

  def write_run_description(self, hparams: dict, model_summary: str,
                            num_parameters: int) -> None:
    """Logs the run's configuration (HParams plugin) and its model as text."""
    writer = self._writer("train")
    with writer.as_default(step=0):
      hparams_api.hparams({k: _hparam_value(v) for k, v in hparams.items()})
      tf.summary.text("model_summary",
                      f"{num_parameters:,} parameters\n\n"
                      f"```\n{model_summary}\n```")
    writer.flush()

  def close(self):
    for writer in self._writers.values():
      writer.close()


def _hparam_value(value):
  """The HParams plugin takes bool, int, float and str; others become str."""
  return value if isinstance(value, (bool, int, float, str)) else str(value)


def read_scalars(directory: str) -> dict:
  """{tag: [(step, value), ...]} of the scalar summaries in `directory`."""
  accumulator = event_accumulator.EventAccumulator(
      directory, size_guidance={event_accumulator.TENSORS: 0})
  accumulator.Reload()
  scalars = {}
  for tag in accumulator.Tags()["tensors"]:
    events = accumulator.Tensors(tag)
    proto = events[0].tensor_proto if events else None
    if (proto is not None and proto.dtype == tf.float32.as_datatype_enum
        and not proto.tensor_shape.dim):
      scalars[tag] = [(e.step, float(tf.make_ndarray(e.tensor_proto)))
                      for e in events]
  return scalars
