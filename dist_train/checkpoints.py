"""Checkpoints of everything a run needs to continue: model, optimizer, position.

The global step is the optimizer's `iterations`. The position in the data is
(`epoch`, `step_in_epoch`): with a per-epoch shuffle seed it identifies the
next batch exactly.
"""

import os

from absl import logging
import keras
import tensorflow as tf


class RunCheckpoint:
  """A tf.train.Checkpoint of a run, and the manager that writes and finds it."""

  def __init__(self, directory: str, *, model: keras.Model,
               optimizer: keras.optimizers.Optimizer, max_to_keep: int):
    # Plain (non-distributed) variables: they are read and assigned only by
    # the eager outer loop.
    self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    self.step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False,
                                     name="step_in_epoch")
    self.directory = directory
    self._step_counter = optimizer.iterations
    self._checkpoint = tf.train.Checkpoint(
        model=model, optimizer=optimizer, epoch=self.epoch,
        step_in_epoch=self.step_in_epoch)
    self._manager = tf.train.CheckpointManager(
        self._checkpoint, directory, max_to_keep=max_to_keep,
        step_counter=optimizer.iterations)

  @property
  def latest(self):
    """Path prefix of the newest checkpoint, or None."""
    return self._manager.latest_checkpoint

  def restore_latest(self) -> bool:
    """Restores the newest checkpoint if there is one; returns whether it did."""
    path = self.latest
    if path is None:
      return False
    # assert_existing_objects_matched: every variable of this run that the
    # checkpoint names must be restored, so a changed model fails loudly.
    self._checkpoint.restore(path).assert_existing_objects_matched()
    logging.info("Restored %s (epoch %d, step in epoch %d)", path,
                 int(self.epoch), int(self.step_in_epoch))
    return True

  def restore_latest_model(self) -> bool:
    """Restores only the model's weights from the newest checkpoint.

    For evaluation: the optimizer's state is not needed, and the evaluating
    run need not be given the training run's optimizer flags.
    """
    path = self.latest
    if path is None:
      return False
    model_only = tf.train.Checkpoint(model=self._checkpoint.model)
    model_only.restore(path).expect_partial().assert_existing_objects_matched()
    logging.info("Restored the model from %s", path)
    return True

  def save(self, *, epoch: int, step_in_epoch: int) -> str:
    """Records the position and writes a checkpoint; returns its path."""
    self.epoch.assign(epoch)
    self.step_in_epoch.assign(step_in_epoch)
    # Named by global step (ckpt-<step>), which is what a reader looks for.
    path = self._manager.save(
        checkpoint_number=int(self._step_counter.numpy()))
    logging.info("Saved checkpoint %s", path)
    return path


def step_of(path: str) -> int:
  """The global step of a checkpoint path prefix `.../ckpt-<step>`."""
  return int(path.rsplit("-", 1)[-1])


def checkpoint_dir(model_dir: str) -> str:
  return os.path.join(model_dir, "checkpoints")
