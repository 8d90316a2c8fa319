"""Checks a task's loss on two examples before training, so that a loss that
reduces, or whose shape does not match the sample weights, stops the run
with one line instead of training on the wrong objective."""

import tensorflow as tf

from dist_train.data import datasets
from dist_train.tasks import base


def _first_examples(split, count: int = 2):
  if isinstance(split, datasets.InMemory):
    return tf.nest.map_structure(lambda t: t[:count], split.tensors)
  return next(iter(split.dataset.take(count).padded_batch(count)))


def _shape(tensor):
  return tuple(tf.shape(tensor).numpy().tolist())


def check_loss_shapes(description: base.TaskDescription, model, split) -> None:
  """Calls the model and the task's loss on the first two training examples.

  Args:
    description: the task, as `base.check_task` described it.
    model: the task's model.
    split: the training split.

  Raises:
    base.TaskError: an output named by the loss is missing, the loss is not
      per element (a scalar, or not one value per example), or its shape is
      not the shape of the sample weights.
  """
  if not description.has_loss:
    return  # A task's own step computes its own objective.
  batch = _first_examples(split)
  features, labels = batch[0], batch[1]
  weights = batch[2] if len(batch) == 3 else None
  outputs = model(features, training=False)
  num_examples = _shape(tf.nest.flatten(labels)[0])[0]
  where = description.name
  for output in description.outputs:
    if output is not None:
      for what, structure in (("outputs", outputs), ("labels", labels)):
        if not isinstance(structure, dict) or output not in structure:
          names = sorted(structure) if isinstance(structure, dict) else (
              "a single tensor")
          raise base.TaskError(
              f"{where}: loss names output {output!r}, but the model's "
              f"{what} are {names}")
  outputs = tf.nest.map_structure(
      lambda t: tf.cast(t, tf.float32) if t.dtype.is_floating else t, outputs)
  for output, per_element in description.per_element_losses(
      labels, outputs).items():
    name = "loss" if output is None else f"loss[{output!r}]"
    shape = _shape(per_element)
    if not shape or shape[0] != num_examples:
      raise base.TaskError(
          f"{where}: {name} must return the loss of each element, unreduced "
          f"(e.g. a Keras loss with reduction=None), got shape {shape} for "
          f"{num_examples} examples")
    weight = weights
    if isinstance(weights, dict):
      weight = weights.get(output)
    if weight is not None and _shape(weight) != shape:
      raise base.TaskError(
          f"{where}: {name} returned shape {shape}, but sample_weight has "
          f"shape {_shape(weight)}; they must match (e.g. [batch] per "
          "example, or [batch, time] per token)")
