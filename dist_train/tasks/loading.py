"""Loads a run's task and its data: `--task`, or the built-in classification.

A task is checked and described once (`base.check_task`); everything after
reads that description and calls the task through `call_task`, which names
the task and the user's file:line when its code raises.
"""

import inspect
from typing import Callable, Optional, Tuple

import keras
import tensorflow as tf

from dist_train import config as config_lib
from dist_train import errors
from dist_train import user_code
from dist_train.data import datasets
from dist_train.tasks import base
from dist_train.tasks import classification

ModelFn = Callable[[config_lib.Config], keras.Model]


def create_task(config: config_lib.Config,
                model_fn: Optional[ModelFn] = None):
  """The task of `config`: `--task=package.module:function`'s task_fn(config),
  or the built-in classification task of `--model` (or `model_fn`) on
  `--dataset`.

  Raises:
    user_code.UserCodeError: the task_fn cannot be loaded or raises.
    tasks.TaskError: what it returned is not a usable task.
  """
  return load_task(config, model_fn=model_fn)[0]


def load_task(config: config_lib.Config, *, task=None,
              model_fn: Optional[ModelFn] = None
              ) -> Tuple[object, base.TaskDescription]:
  """(task, its description): `task` when given (checked as a --task is),
  else the config's.

  Raises:
    user_code.UserCodeError: the task_fn cannot be loaded or raises.
    tasks.TaskError: the task is not usable.
  """
  if task is not None:
    return task, describe(task)
  if not config.task:
    task = classification.ClassificationTask(config, model_fn)
    return task, base.check_task(task, task.name)
  if model_fn is not None:
    raise ValueError("give a task or a model_fn, not both")
  task_fn = user_code.load_function("task", config.task)
  task = user_code.call("task", config.task, task_fn, config)
  where = f"--task={config.task}"
  return task, base.check_task(task, where,
                               name=getattr(task, "name", None) or where)


def describe(task) -> base.TaskDescription:
  """A task given to the Python API, checked and named: by its `name`, else
  its class."""
  name = getattr(task, "name", None) or type(task).__name__
  return base.check_task(task, name)


def load_splits(config: config_lib.Config, task=None,
                input_context: Optional[tf.distribute.InputContext] = None,
                *, description: Optional[base.TaskDescription] = None
                ) -> datasets.Splits:
  """The training and validation splits of a task (default: the config's),
  checked.

  A task whose `build_dataset` takes an `input_context` gets it; with several
  workers, a tf.data.Dataset it returns is taken as this worker's shard.
  """
  if task is None:
    task, description = load_task(config)
  description = description or describe(task)
  takes_context = "input_context" in _parameters(task.build_dataset)
  sharded = bool(takes_context and input_context and
                 input_context.num_input_pipelines > 1)
  splits = {}
  for split in base.SPLITS:
    with errors.phase(f"loading the {split} data"):
      kwargs = {"input_context": input_context} if takes_context else {}
      value = call_task(task, description, task.build_dataset, split,
                        **kwargs)
      splits[split] = datasets.task_split(
          value, where=f"{description.name} ({split})",
          required=split == "train", sharded=sharded,
          steps=step_budget(config, split), steps_flag=f"--{split}_steps")
  return datasets.Splits(**splits)


def step_budget(config, split: str):
  """--train_steps or --validation_steps: the steps that let `split` be a
  stream of unknown length (None: it must be of known length)."""
  return getattr(config, f"{split}_steps", None)


def build_model(task, description: base.TaskDescription) -> keras.Model:
  """The task's model, checked to be a keras.Model."""
  model = call_task(task, description, task.build_model)
  return user_code.check_returns("task", description.name, model, keras.Model,
                                 "a keras.Model from build_model()")


def build_optimizer(task, description: base.TaskDescription,
                    learning_rate) -> keras.optimizers.Optimizer:
  """The task's own optimizer at `learning_rate`, checked.

  Raises:
    base.TaskError: it returned something else than a
      keras.optimizers.Optimizer, or an optimizer that would clip,
      accumulate or average one replica's share (dist_train does these for
      the global batch); naming where build_optimizer is defined.
  """
  optimizer = call_task(task, description, task.build_optimizer,
                        learning_rate)
  defined = _defined_at(task.build_optimizer)
  where = f"{description.name}: build_optimizer(){defined}"
  if not isinstance(optimizer, keras.optimizers.Optimizer) or isinstance(
      optimizer, keras.optimizers.LossScaleOptimizer):
    raise base.TaskError(
        f"{where} must return a keras.optimizers.Optimizer (not a "
        f"LossScaleOptimizer: --mixed_precision adds it), got "
        f"{type(optimizer).__name__}")
  per_share = [name for name, value in (
      ("clipnorm", optimizer.clipnorm),
      ("global_clipnorm", optimizer.global_clipnorm),
      ("clipvalue", optimizer.clipvalue), ("use_ema", optimizer.use_ema),
      ("gradient_accumulation_steps",
       optimizer.gradient_accumulation_steps)) if value]
  if per_share:
    raise base.TaskError(
        f"{where} returned an optimizer with {', '.join(per_share)}, which "
        "would act on one replica's share of the batch: use --clip_norm, "
        "--grad_accum_steps and --ema_decay instead")
  return optimizer


def _defined_at(function) -> str:
  """` (at file:line)` where `function` is defined, else ''."""
  try:
    path = inspect.getsourcefile(function)
    _, line = inspect.getsourcelines(function)
  except (OSError, TypeError):  # A builtin, a C extension, no source.
    return ""
  return f" (at {path}:{line})"


def call_task(task, description: base.TaskDescription, method, *args,
              **kwargs):
  """Calls a task's method: a user's through user_code.call (one line naming
  the task and the user's file:line if it raises); the built-in task's
  directly, as library code, whose errors name themselves."""
  if isinstance(task, classification.ClassificationTask):
    return method(*args, **kwargs)
  return user_code.call("task", description.name, method, *args, **kwargs)


def _parameters(function) -> tuple:
  try:
    return tuple(inspect.signature(function).parameters)
  except (TypeError, ValueError):
    return ()
