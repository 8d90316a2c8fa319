"""The built-in task: classify digits (--dataset) with a Keras model (--model).

It is one task among others: the reference MLP with its add_loss layer, the
CNN, a user model_fn and a user dataset_fn of (features, integer label)
pairs all train through it, with sparse cross-entropy and accuracy.
"""

import functools

import keras
import tensorflow as tf

from dist_train import config as config_lib
from dist_train import user_code
from dist_train.data import datasets
from dist_train.data import mnist as mnist_data
from dist_train.models import mnist
from dist_train.tasks import base


def cross_entropy(labels, logits):
  """Per-example sparse cross-entropy of integer labels and logits."""
  return keras.losses.sparse_categorical_crossentropy(labels, logits,
                                                      from_logits=True)


class ClassificationTask(base.Task):
  """Single-label classification: `--model` on `--dataset`."""

  loss_name = "cross_entropy"

  def __init__(self, config: config_lib.Config, model_fn=None):
    """Creates the task.

    Args:
      config: the run configuration (its data, model and loss flags).
      model_fn: builds the model from the config; default: `--model`.
    """
    self._config = config
    self._model_fn = model_fn or mnist.create_model
    self.name = f"--dataset={config.dataset}"
    self._num_classes = None

  @functools.cached_property
  def _splits(self) -> datasets.Splits:
    config = self._config
    return mnist_data.load_splits(
        dataset=config.dataset, data_dir=config.data_dir,
        num_validation_examples=config.num_validation_examples,
        num_train_examples=config.num_train_examples, seed=config.seed,
        user_config=config)

  def build_dataset(self, split: str):
    return getattr(self._splits, split)

  def build_model(self) -> keras.Model:
    model = self._model_fn(self._config)
    user_code.check_model_fits("model", self._config.model, model,
                               self._splits.train.feature_shape)
    self._num_classes = (model.outputs[0].shape[-1] if model.outputs
                         else None)
    return model

  def loss(self, labels, outputs):
    return cross_entropy(labels, outputs)

  def metrics(self):
    return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]

  def validate_batch(self, batch):
    """The batch, after checking every label is in [0, classes).

    On CPU the cross-entropy kernel rejects such labels itself; on GPU it
    returns NaN instead, so the check is explicit. It runs on each replica's
    share, outside any XLA cluster (XLA compiles no assertion).
    """
    features, labels = batch[0], batch[1]
    num_classes = self._num_classes
    if num_classes is None:
      return batch
    outside = tf.logical_or(labels < 0, labels >= num_classes)
    check = tf.debugging.Assert(
        tf.logical_not(tf.reduce_any(outside)),
        ["label", tf.boolean_mask(labels, outside)[:1],
         f"is outside [0, {num_classes}) ({num_classes} classes)"],
        summarize=1)
    with tf.control_dependencies([check]):
      return (features, tf.identity(labels)) + tuple(batch[2:])
