"""TensorBoard scalars, written by the chief only.

Every worker computes the same aggregated metrics; one copy of the event files
is what a reader expects, so other tasks get writers that write nothing.

TensorFlow's event writer ignores the error of a failed write: on a full disk
an event that does not fit its stdio buffer is dropped (or cut short) without
an error, and only a failed flush of the buffer raises. So after every flush
the whole records that reached a local events file are counted.
"""

import contextlib
import errno
import glob
import os
import struct

from absl import logging
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import api as hparams_api

from dist_train import errors
from dist_train.outputs import model_dir as model_dir_lib

_EVENTS_FILES = "events.out.tfevents.*"
_UNAFFECTED = ("the checkpoints are unaffected: free the space and rerun the "
               "same command to resume from the latest one")


class SummaryWriteError(errors.DistTrainError):
  """TensorBoard events could not be written (a full disk, a lost mount)."""


class _EventsFile:
  """A local events file being written, and the records known to be in it."""

  def __init__(self, path: str):
    self.path = path
    self._offset = 0  # Where the first record not yet counted starts.

  def check(self, num_events: int) -> None:
    """Raises SummaryWriteError unless `num_events` more whole records (or
    more) reached the file since the last check."""
    count = 0
    with open(self.path, "rb") as f:
      f.seek(self._offset)
      while True:
        # A TFRecord: length (8 bytes), its CRC (4), the data, its CRC (4).
        header = f.read(12)
        if len(header) < 12:
          break
        length = struct.unpack("<Q", header[:8])[0]
        if len(f.read(length + 4)) < length + 4:
          break
        count += 1
        self._offset += 12 + length + 4
    if count < num_events:
      stat = os.statvfs(self.path)
      why = (os.strerror(errno.ENOSPC) if stat.f_bavail == 0
             else "the file system did not keep them")
      raise SummaryWriteError(
          f"cannot write TensorBoard events to {self.path}: {why} "
          f"({num_events - count} of {num_events} events lost; TensorFlow's "
          f"summary writer reports no error); {_UNAFFECTED}")


class SummaryWriters:
  """One event-file writer per split (`train`, `validation`) under model_dir."""

  def __init__(self, model_dir: str, *, enabled: bool):
    self._model_dir = model_dir
    self._enabled = enabled
    self._writers = {}
    # Called with (split, scalars, step) after the scalars were written: the
    # metrics file (metrics_file.py) gets the same values.
    self._scalar_listeners = []
    self._events_files = {}  # Split -> _EventsFile, for local model_dirs.

  def _writer(self, split):
    if split not in self._writers:
      self._writers[split] = (self._create_writer(split) if self._enabled
                              else tf.summary.create_noop_writer())
    return self._writers[split]

  def _create_writer(self, split):
    directory = model_dir_lib.summary_dir(self._model_dir, split)
    pattern = os.path.join(directory, _EVENTS_FILES)
    local = model_dir_lib.is_local(directory)
    before = set(glob.glob(pattern)) if local else set()
    try:
      writer = tf.summary.create_file_writer(directory)
    except Exception as e:  # OS and TensorFlow errors of many types.
      raise SummaryWriteError(
          f"cannot write TensorBoard events to {directory}: "
          f"{errors.reason(e)}; {_UNAFFECTED}") from e
    new = set(glob.glob(pattern)) - before if local else set()
    if len(new) == 1:  # The file this writer writes.
      self._events_files[split] = _EventsFile(new.pop())
      self._events_files[split].check(1)  # Its header, written already.
    return writer

  @contextlib.contextmanager
  def _writing(self, split, step, num_events):
    """Runs the block, which writes `num_events` events to `split` at `step`,
    then flushes them and checks that they reached the file.

    Raises:
      SummaryWriteError: the events could not be written.
    """
    writer = self._writer(split)
    try:
      with writer.as_default(step=step):  # Flushes on exit.
        yield
    except Exception as e:  # OS and TensorFlow errors of many types.
      raise SummaryWriteError(
          f"cannot write TensorBoard events to "
          f"{model_dir_lib.summary_dir(self._model_dir, split)}: "
          f"{errors.reason(e)}; "
          f"{_UNAFFECTED}") from e
    if split in self._events_files:
      self._events_files[split].check(num_events)

  def write_scalars(self, split: str, scalars: dict, step: int) -> None:
    """Writes each name -> float of `scalars` at `step` under `split`.

    Raises:
      SummaryWriteError: the events could not be written.
    """
    with self._writing(split, step, len(scalars)):
      for name, value in scalars.items():
        tf.summary.scalar(name, value)
    if self._enabled:
      for listener in self._scalar_listeners:
        listener(split, scalars, step)

  def add_scalar_listener(self, listener) -> None:
    """Calls `listener(split, scalars, step)` after each `write_scalars` on
    the chief."""
    self._scalar_listeners.append(listener)

  def write_histograms(self, split: str, values: dict, step: int) -> None:
    """Writes each name -> array of `values` at `step` as a histogram.

    Raises:
      SummaryWriteError: the events could not be written.
    """
    if not values:
      return
    with self._writing(split, step, len(values)):
      for name, value in values.items():
        tf.summary.histogram(name, value)

  def write_run_description(self, hparams: dict, model_summary: str,
                            num_parameters: int) -> None:
    """Logs the run's configuration (HParams plugin) and its model as text.

    Raises:
      SummaryWriteError: the events could not be written.
    """
    with self._writing("train", 0, 2):
      hparams_api.hparams({k: _hparam_value(v) for k, v in hparams.items()})
      tf.summary.text("model_summary",
                      f"{num_parameters:,} parameters\n\n"
                      f"```\n{model_summary}\n```")

  def close(self):
    """Closes the writers; a failure only logs a warning.

    Every write was flushed and checked already, and close() runs while
    another error may be ending the run, which it must not replace.
    """
    for writer in self._writers.values():
      try:
        writer.close()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Cannot close a TensorBoard writer: %s",
                        errors.summary(e))


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
