"""The Task: what a user's training is, in Keras' own conventions.

A task says what to train and on what; dist_train decides how (replicas,
workers, loops, checkpoints). It follows `model.compile`/`model.fit`:

    class MyTask(dist_train.tasks.Task):
      def build_model(self):                 # called under the strategy scope
        return keras.Model(...)
      def build_dataset(self, split):        # "train" or "validation"
        return tf.data.Dataset(...)           # unbatched examples:
                                             # (features, labels[, weights])
      def loss(self, labels, outputs):       # per-element loss, unreduced
        return keras.losses.sparse_categorical_crossentropy(
            labels, outputs, from_logits=True)
      def metrics(self):                     # optional
        return [keras.metrics.SparseCategoricalAccuracy("accuracy")]

`--task=package.module:function` names `task_fn(config)`, which returns one.
Several outputs: `loss` may be a dict of per-element loss functions by output
name (with `loss_weights`), and `metrics()` a dict of lists by output name, as
in `model.compile`. Steps the declarative form cannot express implement
`train_step(batch, ctx)` (see `loop/step_context.py`).
"""

import inspect
from typing import Any, Callable, Optional

from dist_train import errors

SPLITS = ("train", "validation")


class TaskError(errors.DistTrainError):
  """A task is unusable: a method is missing, or returned what cannot train."""


class Task:
  """Base class of tasks; subclasses override what they need.

  Attributes:
    loss_weights: for a dict `loss`, the weight of each output's loss in the
      objective (default 1 each).
    name: how messages name the task.
  """

  loss_weights: Optional[dict] = None
  name: str = "the task"

  def build_model(self):
    """The keras.Model to train; called under the strategy's scope."""
    raise NotImplementedError

  def build_dataset(self, split: str):
    """One finite pass over `split` ("train" or "validation") as a
    tf.data.Dataset of unbatched examples: (features, labels) or (features,
    labels, sample_weight), each any nested structure of tensors.

    A task may instead return a `dist_train.data.datasets.InMemory` of arrays
    (random access: shuffled and gathered without a shuffle buffer; each
    worker gathers only its replicas' rows).

    A task may take a second argument, `input_context` (a
    `tf.distribute.InputContext`: `input_pipeline_id` of
    `num_input_pipelines`, one per worker) and return only that worker's
    shard of a stream, e.g. every num_input_pipelines-th file from
    input_pipeline_id on (`dist_train.data.tfrecord.read` does). The workers'
    batches then make up each global batch (docs/data.md, "Several
    workers").
    """
    raise NotImplementedError

  def loss(self, labels, outputs):
    """The per-element loss, unreduced, with the shape of the sample weights
    when there are any; or a dict of such functions by output name."""
    raise NotImplementedError

  def metrics(self):
    """keras.metrics.Metric objects (a list, or a dict of lists by output
    name), updated with update_state(labels, outputs, sample_weight)."""
    return []

  def validate_batch(self, batch):
    """Checks a replica's share of a training batch before the step trains
    on it (e.g. that labels are in range; on GPUs some kernels return NaN
    instead of failing); returns the share. Runs in the replica's context,
    outside XLA. The default checks nothing."""
    return batch


REQUIRED_METHODS = ("build_model", "build_dataset")


def check_task(task: Any, where: str) -> None:
  """Raises TaskError unless `task` has what training needs.

  A task needs `build_model` and `build_dataset`, and either `loss` or its
  own `train_step`; whatever it has must be callable.
  """
  missing = [name for name in REQUIRED_METHODS
             if not callable(getattr(task, name, None))]
  has_step = callable(getattr(task, "train_step", None))
  loss = getattr(task, "loss", None)
  if not has_step and not (callable(loss) or isinstance(loss, dict)):
    missing.append("loss (or train_step)")
  if missing:
    raise TaskError(
        f"{where} has no {', '.join(missing)}: a task needs build_model(), "
        "build_dataset(split) and loss(labels, outputs) (or its own "
        "train_step(batch, ctx))")
  if isinstance(loss, dict):
    not_callable = [k for k, fn in loss.items() if not callable(fn)]
    if not_callable:
      raise TaskError(f"{where}: loss[{not_callable[0]!r}] is not callable")
  _check_not_abstract(task, where)


def _check_not_abstract(task, where):
  """A Task subclass that kept a base method it must override."""
  if not isinstance(task, Task):
    return
  for name in REQUIRED_METHODS + ("loss",):
    if name == "loss" and callable(getattr(task, "train_step", None)):
      continue
    method = getattr(type(task), name, None)
    if method is getattr(Task, name):
      raise TaskError(f"{where} does not implement {name}()")


def loss_functions(task) -> dict:
  """{output name or None: per-element loss function} of a task."""
  loss = task.loss
  if isinstance(loss, dict):
    return dict(loss)
  return {None: loss}


def accepts(function: Callable, *args) -> bool:
  """Whether `function(*args)` binds (for messages about signatures)."""
  try:
    inspect.signature(function).bind(*args)
    return True
  except TypeError:
    return False
  except ValueError:
    return True
