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

import dataclasses
import inspect
from typing import (Any, Callable, FrozenSet, Mapping, Optional, Sequence,
                    Tuple)

from dist_train import errors

SPLITS = ("train", "validation")


class TaskError(errors.DistTrainError):
  """A task is unusable: a method is missing, or returned what cannot train."""


class Task:
  """Base class of tasks; subclasses override what they need.

  Every hook dist_train reads is declared here. Only `build_model`,
  `build_dataset` and `loss` (or `train_step`) are required; the rest are
  optional in fact: an object that does not subclass Task trains with
  whichever of them it defines, and the defaults below stand in for the
  others. dist_train reads a task once (`check_task`) and never writes into
  it.

  Attributes:
    loss_weights: for a dict `loss`, the weight of each output's loss in the
      objective (default 1 each).
    loss_name: how the training summaries name the data term of a single
      `loss` (default "task_loss"); a dict `loss` names each output's
      `<output>_loss`.
    loss_terms: for a task's own `train_step`, the names of the terms it
      returns besides "loss" (each summed over replicas, logged and checked
      for NaN).
    name: how messages name the task (default: its `--task` flag, or its
      class name given to the Python API).
  """

  loss_weights: Optional[dict] = None
  loss_name: str = "task_loss"
  loss_terms: Sequence[str] = ()
  name: Optional[str] = None

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
    when there are any; or a dict of such functions by output name.
    Required unless the task has its own `train_step`."""
    raise NotImplementedError

  def metrics(self):
    """Optional: keras.metrics.Metric objects (a list, or a dict of lists by
    output name), updated with update_state(labels, outputs, sample_weight).
    Called once for training and once for validation, so it must create new
    objects on each call. The default has none."""
    return []

  def validate_batch(self, batch):
    """Optional: checks a replica's share of a training batch before the
    step trains on it (e.g. that labels are in range; on GPUs some kernels
    return NaN instead of failing); returns the share. Runs in the replica's
    context, outside XLA. The default checks nothing."""
    return batch

  def build_optimizer(self, learning_rate):
    """Optional: this task's own keras.optimizers.Optimizer (e.g. AdamW with
    `exclude_from_weight_decay`, Lion, rates per group of variables), at
    `learning_rate`, the schedule the flags built (`--learning_rate`,
    `--lr_schedule`, `--warmup_steps`, ...). Called under the strategy's
    scope. dist_train still scales the loss (mixed_float16), clips the
    summed gradient, accumulates micro-batches, averages the weights and
    checkpoints the optimizer; the optimizer's own `clipnorm`,
    `gradient_accumulation_steps` and `use_ema` would act on one replica's
    share, so leave them unset. Without it, `--optimizer` is used."""
    raise NotImplementedError

  def train_step(self, batch, ctx):
    """Optional: this task's own step on a replica's share of the global
    batch, for what a declarative `loss` cannot say; the model being trained
    is `ctx.model` (see `loop/step_context.py`). Returns the share's loss,
    or a dict of "loss" and the names in `loss_terms`. Without it,
    dist_train's step minimises `loss`."""
    raise NotImplementedError


REQUIRED_METHODS = ("build_model", "build_dataset")
OPTIONAL_HOOKS = ("metrics", "validate_batch", "train_step",
                  "build_optimizer")


def defines(task: Any, name: str) -> bool:
  """Whether `task` itself defines `name`: not absent, not None, not the
  base class's default."""
  value = getattr(task, name, None)
  if value is None:
    return False
  default = getattr(Task, name, None)
  return default is None or getattr(value, "__func__", None) is not default


@dataclasses.dataclass(frozen=True)
class TaskDescription:
  """What a task is, decided once by `check_task`: the Trainer, the loss
  check and the loaders read this instead of asking the task again.

  Attributes:
    name: how messages name the task.
    own_step: whether the task has its own `train_step`.
    loss_fns: {output name, or None for a single loss: per-element loss
      function}; empty for an own step without a declarative loss.
    loss_weights: {output name: weight} of a dict loss.
    loss_name: the name of a single loss's data term.
    loss_terms: the extra terms an own step returns.
    hooks: which of OPTIONAL_HOOKS the task defines.
  """

  name: str
  own_step: bool
  loss_fns: Mapping[Optional[str], Callable]
  loss_weights: Mapping[str, float]
  loss_name: str
  loss_terms: Tuple[str, ...]
  hooks: FrozenSet[str]

  @property
  def has_loss(self) -> bool:
    return bool(self.loss_fns)

  @property
  def outputs(self) -> tuple:
    """The outputs the loss names (None: the model's single output)."""
    return tuple(self.loss_fns)

  def loss_weight(self, output) -> float:
    return self.loss_weights.get(output, 1.0)

  def per_element_losses(self, labels, outputs) -> dict:
    """{output: the loss of each element} of `labels` and `outputs` (each a
    dict by output name when the loss is one)."""
    return {output: loss_fn(select(labels, output), select(outputs, output))
            for output, loss_fn in self.loss_fns.items()}


def select(structure, output):
  """`structure[output]`, or the whole structure for a single loss."""
  return structure if output is None else structure[output]


def check_task(task: Any, where: str, *,
               name: Optional[str] = None) -> TaskDescription:
  """Checks `task` has what training needs, and describes it.

  A task needs `build_model` and `build_dataset`, and either `loss` or its
  own `train_step`; whatever it has must be callable. Every other hook is
  optional.

  Args:
    task: a `Task`, or any object with those methods.
    where: how errors name it (e.g. its --task flag).
    name: how later messages name it; default: `where`.

  Returns:
    The task's description.

  Raises:
    TaskError: the task lacks a required method, or a hook is not callable.
  """
  missing = [method for method in REQUIRED_METHODS
             if not callable(getattr(task, method, None))]
  own_step = defines(task, "train_step")
  loss = getattr(task, "loss", None)
  if not own_step and not (callable(loss) or isinstance(loss, dict)):
    missing.append("loss (or train_step)")
  if missing:
    raise TaskError(
        f"{where} has no {', '.join(missing)}: a task needs build_model(), "
        "build_dataset(split) and loss(labels, outputs) (or its own "
        "train_step(batch, ctx))")
  _check_not_abstract(task, where)
  if not defines(task, "loss"):
    loss = None  # The base class's: a task's own step has no loss.
  hooks = frozenset(hook for hook in OPTIONAL_HOOKS if defines(task, hook))
  for hook in hooks:
    if not callable(getattr(task, hook)):
      raise TaskError(f"{where}: {hook} is not callable")
  if isinstance(loss, dict):
    not_callable = [k for k, fn in loss.items() if not callable(fn)]
    if not_callable:
      raise TaskError(f"{where}: loss[{not_callable[0]!r}] is not callable")
    loss_fns = dict(loss)
  else:
    loss_fns = {} if loss is None else {None: loss}
  return TaskDescription(
      name=name or where, own_step=own_step, loss_fns=loss_fns,
      loss_weights=dict(getattr(task, "loss_weights", None) or {}),
      loss_name=getattr(task, "loss_name", None) or Task.loss_name,
      loss_terms=tuple(getattr(task, "loss_terms", None) or ()),
      hooks=hooks)


def _check_not_abstract(task, where):
  """A Task subclass that kept a base method it must override."""
  if not isinstance(task, Task):
    return
  for method in REQUIRED_METHODS:
    if not defines(task, method):
      raise TaskError(f"{where} does not implement {method}()")
  if not defines(task, "loss") and not defines(task, "train_step"):
    raise TaskError(f"{where} does not implement loss()")


def accepts(function: Callable, *args) -> bool:
  """Whether `function(*args)` binds (for messages about signatures)."""
  try:
    inspect.signature(function).bind(*args)
    return True
  except TypeError:
    return False
  except ValueError:
    return True
