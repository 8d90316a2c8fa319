"""Checkpoints of everything a run needs to continue: model, optimizer, position.

The global step is the optimizer's `iterations`. The position in the data is
(`epoch`, `step_in_epoch`): with a per-epoch shuffle seed it identifies the
next batch exactly.
"""

import contextlib
import dataclasses
import os
import shutil
import tempfile
from typing import Optional

from absl import logging
import keras
import tensorflow as tf

from dist_train import compat
from dist_train import errors
from dist_train.outputs import model_dir as model_dir_lib


class CheckpointError(errors.DistTrainError):
  """A checkpoint cannot be used; the message names the file and why."""


class CorruptCheckpointError(CheckpointError):
  """A checkpoint's files are missing, truncated or unreadable."""


class CheckpointWriteError(CheckpointError):
  """A checkpoint could not be written (a full disk, a lost mount)."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint was written by a different model (a variable's shape)."""


SHAPE_MISMATCH = compat.CHECKPOINT_SHAPE_MISMATCH


def mismatch_error(path, error):
  """A CheckpointMismatchError naming the variable and both shapes, if the
  restore error says them (Keras' shape check does)."""
  match = SHAPE_MISMATCH.search(str(error))
  if match:
    return CheckpointMismatchError(
        f"{path} does not fit the model: variable {match['name']} has shape "
        f"{match['checkpoint']} in the checkpoint and {match['model']} in the "
        "model; use another --model_dir or the model that wrote it")
  return CheckpointMismatchError(
      f"{path} does not fit the model: {errors.first_line(error)}")


@dataclasses.dataclass(frozen=True)
class Position:
  """Where a restored run continues: the checkpoint and its place in the data."""

  path: str
  global_step: int
  epoch: int
  step_in_epoch: int


def _missing_files(path):
  """The files a checkpoint prefix needs that are not there."""
  index = path + ".index"
  if not tf.io.gfile.exists(index):
    return [index]
  return [] if tf.io.gfile.glob(path + ".data-*") else [path + ".data-*"]


class RunCheckpoint:
  """A tf.train.Checkpoint of a run, and the manager that writes and finds it.

  In a multi-worker run every worker saves, because saving distributed
  variables may run collectives that need all workers; only the chief
  (`is_chief`) writes to `directory`, the others write to a temporary
  directory that they remove. Every worker restores from `directory`, so on
  several hosts it must be on storage they all read.
  """

  def __init__(self, directory: str, *, model: keras.Model,
               optimizer: keras.optimizers.Optimizer, max_to_keep: int,
               is_chief: bool = True, on_corrupt: str = "fail",
               extra: Optional[dict] = None,
               optional: Optional[dict] = None,
               model_extra: Optional[dict] = None):
    """Creates the checkpoint of a run.

    Args:
      directory: where the chief writes and every worker reads checkpoints.
      model: the model.
      optimizer: the optimizer; its `iterations` is the global step.
      max_to_keep: how many checkpoints to keep.
      is_chief: whether this task writes to `directory`.
      on_corrupt: "fail" or "previous", see `restore_latest`.
      extra: more trackables to save with the run, by name (the early
        stopping state).
      optional: trackables saved with the run that an older checkpoint
        may lack: a state a resume turned on (the plateau rule); restored
        when there, left as they are when not.
      model_extra: like `optional`, and also restored by restores of the
        model alone (the weight average, which evaluation uses).
    """
    # Plain (non-distributed) variables: they are read and assigned only by
    # the eager outer loop.
    self._epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    self._step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False,
                                     name="step_in_epoch")
    self.directory = directory
    self._is_chief = is_chief
    self._on_corrupt = on_corrupt
    self._model = model
    self._model_extra = dict(model_extra or {})
    self._optional = {**(optional or {}), **self._model_extra}
    self._step_counter = optimizer.iterations
    self._checkpoint = tf.train.Checkpoint(
        model=model, optimizer=optimizer, epoch=self._epoch,
        step_in_epoch=self._step_in_epoch, **(extra or {}))
    # What a save writes; restores read the optional part on its own (see
    # _restore_one), so that its absence is no mismatch.
    self._saved = tf.train.Checkpoint(
        model=model, optimizer=optimizer, epoch=self._epoch,
        step_in_epoch=self._step_in_epoch, **(extra or {}), **self._optional)
    try:
      self._manager = tf.train.CheckpointManager(
          self._saved, directory, max_to_keep=max_to_keep,
          step_counter=optimizer.iterations)
    except Exception as e:  # A garbled state file raises a parse error.
      raise CorruptCheckpointError(
          f"cannot read the checkpoint state file "
          f"{os.path.join(directory, 'checkpoint')}: "
          f"{errors.first_line(e)}") from e
    self._check_state_file()
    if is_chief:
      self._remove_interrupted_saves()

  def _check_state_file(self):
    """Refuses checkpoints that the state file does not lead to.

    TensorFlow treats an unparsable or missing `checkpoint` state file as "no
    checkpoint", which would silently restart the run from step 0.
    """
    state_file = os.path.join(self.directory, "checkpoint")
    has_checkpoints = bool(tf.io.gfile.glob(
        os.path.join(self.directory, "ckpt-*.index")))
    if not tf.io.gfile.exists(state_file):
      if has_checkpoints:
        raise CorruptCheckpointError(
            f"{self.directory} holds checkpoints but no state file "
            f"{state_file}; restore it or move the checkpoints away")
      return
    if self._manager.latest_checkpoint is None:
      raise CorruptCheckpointError(
          f"cannot read the checkpoint state file {state_file}: it names no "
          "checkpoint")

  def _remove_interrupted_saves(self):
    """Removes what a save killed half-way left: TensorFlow writes a
    checkpoint into `<prefix>_temp*` and renames it only when complete."""
    for path in tf.io.gfile.glob(os.path.join(self.directory, "*_temp*")):
      logging.warning("Removing %s, left by an interrupted save", path)
      if tf.io.gfile.isdir(path):
        tf.io.gfile.rmtree(path)
      else:
        tf.io.gfile.remove(path)

  @property
  def latest(self):
    """Path prefix of the newest checkpoint, or None."""
    return self._manager.latest_checkpoint

  def restore_latest(self, *, model_only: bool = False) -> Optional[Position]:
    """Restores the newest usable checkpoint; returns its position, or None
    when there is no checkpoint.

    A checkpoint that cannot be read never leads to a silent restart from
    step 0: it raises CorruptCheckpointError naming the file, or, with
    on_corrupt="previous", the next older intact checkpoint is restored with
    a warning.

    Args:
      model_only: restore only the model's weights (for evaluation: the
        optimizer's state is not needed, and the evaluating run need not be
        given the training run's optimizer flags).

    Raises:
      CorruptCheckpointError: the newest (or, falling back, every)
        checkpoint is unreadable.
      CheckpointMismatchError: a checkpoint was written by another model.
    """
    checkpoint = (tf.train.Checkpoint(model=self._model) if model_only
                  else self._checkpoint)
    return self._restore(checkpoint, partial=model_only,
                         optional=(self._model_extra if model_only
                                   else self._optional))

  def _candidates(self):
    """Checkpoint prefixes to try, newest first."""
    state = tf.train.get_checkpoint_state(self.directory)
    if state is None or not state.model_checkpoint_path:
      return []
    paths = list(state.all_model_checkpoint_paths) or [
        state.model_checkpoint_path]
    if state.model_checkpoint_path not in paths:
      paths.append(state.model_checkpoint_path)
    # The state file names checkpoints relative to it, or by absolute path
    # (a gs:// URL is one).
    resolve = lambda p: p if os.path.isabs(p) or not model_dir_lib.is_local(
        p) else os.path.join(self.directory, p)
    return [resolve(p) for p in reversed(paths)]

  def has_checkpoint(self) -> bool:
    """Whether `directory` names a checkpoint now (read from its state file:
    on a worker other than the chief, the chief's saves count)."""
    return bool(self._candidates())

  def restore_model(self, path: str) -> Position:
    """Restores only the model's weights from the checkpoint `path` (an
    evaluator beside a training run evaluates each one it sees).

    Raises:
      CorruptCheckpointError, CheckpointMismatchError: as `restore_latest`.
    """
    self._restore_one(tf.train.Checkpoint(model=self._model), path,
                      partial=True, optional=self._model_extra)
    return Position(path=path, global_step=step_of(path), epoch=-1,
                    step_in_epoch=-1)

  def _restore_one(self, checkpoint, path, *, partial, optional=None):
    missing = _missing_files(path)
    if missing:
      raise CorruptCheckpointError(
          f"checkpoint {path} is incomplete: {', '.join(missing)} is "
          "missing")
    try:
      status = checkpoint.restore(path)
      if partial:
        status.expect_partial()
      # Every variable of this run that the checkpoint names must be
      # restored, so a changed model fails loudly.
      status.assert_existing_objects_matched()
      if optional:
        status.expect_partial()  # The optional part is read next.
        tf.train.Checkpoint(**optional).restore(path).expect_partial()
    except Exception as e:  # Readers raise many types for bad files.
      if isinstance(e, AssertionError) or SHAPE_MISMATCH.search(str(e)):
        raise mismatch_error(path, e) from e
      files = [path + ".index"] + tf.io.gfile.glob(path + ".data-*")
      raise CorruptCheckpointError(
          f"checkpoint {', '.join(files)} is unreadable: "
          f"{errors.first_line(e)}") from e

  def _restore(self, checkpoint, *, partial: bool,
               optional=None) -> Optional[Position]:
    candidates = self._candidates()
    for i, path in enumerate(candidates):
      try:
        self._restore_one(checkpoint, path, partial=partial,
                          optional=optional)
      except CorruptCheckpointError as e:
        older = candidates[i + 1:]
        if self._on_corrupt != "previous":
          raise CorruptCheckpointError(
              f"{e}; pass --on_corrupt_checkpoint=previous to resume from an "
              "older checkpoint") from e
        if not older:
          raise CorruptCheckpointError(
              f"{e}, and no older checkpoint is intact") from e
        logging.warning("%s; falling back to %s", e, older[0])
        continue
      logging.info("Restored %sfrom %s (epoch %d, step in epoch %d)",
                   "the model " if partial else "", path, int(self._epoch),
                   int(self._step_in_epoch))
      return Position(path=path, global_step=step_of(path),
                      epoch=int(self._epoch),
                      step_in_epoch=int(self._step_in_epoch))
    return None

  def save(self, *, epoch: int, step_in_epoch: int) -> Optional[str]:
    """Records the position and writes a checkpoint.

    The caller checks the weights first (`guards.check_variables`): this
    writes what it is given.

    Returns:
      The checkpoint's path; None on a worker other than the chief, whose
      copy is written to a temporary directory and removed.
    """
    self._epoch.assign(epoch)
    self._step_in_epoch.assign(step_in_epoch)
    # Named by global step (ckpt-<step>), which is what a reader looks for.
    step = int(self._step_counter.numpy())
    if not self._is_chief:
      temp_dir = tempfile.mkdtemp(prefix="dist_train_worker_checkpoint_")
      try:
        tf.train.CheckpointManager(self._saved, temp_dir,
                                   max_to_keep=1).save(checkpoint_number=step)
      finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
      logging.info("Saved this worker's copy of the checkpoint of step %d to "
                   "%s and removed it; the chief writes %s", step, temp_dir,
                   self.directory)
      return None
    latest = self.latest
    try:
      path = self._manager.save(checkpoint_number=step)
    except Exception as e:  # OS and TensorFlow errors of many types.
      # TensorFlow writes into ckpt-<step>_temp* and renames only when
      # complete, so older checkpoints and the state file are untouched.
      # What the failed save left takes space that the next attempt needs.
      with contextlib.suppress(Exception):
        self._remove_interrupted_saves()
      rerun = ("free the space or fix the mount and rerun the same command "
               "to")
      rerun = (f"the latest intact checkpoint is {latest} (step "
               f"{step_of(latest)}): {rerun} resume from it" if latest else
               f"there is no earlier checkpoint: {rerun} start again")
      raise CheckpointWriteError(
          f"cannot write the checkpoint of step {step} to "
          f"{os.path.join(self.directory, f'ckpt-{step}')}: "
          f"{errors.reason(e)}; {rerun}") from e
    logging.info("Saved checkpoint %s", path)
    return path


def step_of(path: str) -> int:
  """The global step of a checkpoint path prefix `.../ckpt-<step>`."""
  return int(path.rsplit("-", 1)[-1])


def checkpoint_dir(model_dir: str) -> str:
  return model_dir_lib.checkpoints_dir(model_dir)
