"""The Python API: build a run from a Config, then train or evaluate it.

    from dist_train import config, train
    result = train.train_and_evaluate(config.Config(model_dir="/tmp/run"))

The command line (`dist_train.main`) calls `run`, which dispatches on
`config.mode` to the same functions. This is where the Config is unpacked:
every layer below takes the values it uses.
"""

import contextlib
import dataclasses
import inspect
import json
import os
from typing import Callable, Optional

from absl import logging
import keras
import tensorflow as tf

from dist_train import config as config_lib
from dist_train import console
from dist_train import errors
from dist_train import user_code
from dist_train.data import datasets
from dist_train.distribute import cluster
from dist_train.distribute import inputs
from dist_train.distribute import strategy as strategy_lib
from dist_train.loop import controller as controller_lib
from dist_train.loop import optimizers
from dist_train.loop import precision
from dist_train.loop import preemption
from dist_train.loop import schedule as schedule_lib
from dist_train.loop import steps
from dist_train.outputs import checkpoints
from dist_train.outputs import export
from dist_train.outputs import ownership
from dist_train.outputs import profiler as profiler_lib
from dist_train.outputs import summaries
from dist_train.tasks import base as tasks_base
from dist_train.tasks import checks as task_checks
from dist_train.tasks import classification

ModelFn = Callable[[config_lib.Config], keras.Model]
RunResult = controller_lib.RunResult


class NoCheckpointError(errors.DistTrainError):
  """Evaluation was asked for, but model_dir holds no checkpoint."""


def create_strategy(
    config: config_lib.Config,
    resolved: Optional[cluster.Resolved] = None) -> tf.distribute.Strategy:
  """Builds the strategy of `config` on the cluster in the environment.

  Call before any other TensorFlow op.

  Args:
    config: the run configuration.
    resolved: the cluster and strategy `cluster.resolve` found, when the
      caller resolved it already (the command line does, before TensorFlow
      loads); by default it is resolved here.

  Raises:
    config_lib.ConfigError: the flags contradict the cluster environment.
  """
  if resolved is None:
    resolved = cluster.resolve(strategy=config.strategy,
                               cluster=config.cluster,
                               cpu_replicas=config.cpu_replicas,
                               environ=os.environ)
  return strategy_lib.create_strategy(
      resolved, num_gpus=config.num_gpus, cpu_replicas=config.cpu_replicas,
      collective=config.collective,
      collective_timeout_s=config.collective_timeout_s,
      slurm_port_base=config.slurm_port_base)


@dataclasses.dataclass(frozen=True)
class _Run:
  strategy: tf.distribute.Strategy
  controller: controller_lib.Controller
  summary_writers: summaries.SummaryWriters
  checkpoint: checkpoints.RunCheckpoint
  is_chief: bool
  profiler: profiler_lib.StepProfiler


def create_task(config: config_lib.Config, model_fn: Optional[ModelFn] = None):
  """The task of `config`: `--task=package.module:function`'s task_fn(config),
  or the built-in classification task of `--model` (or `model_fn`) on
  `--dataset`.

  Raises:
    user_code.UserCodeError: the task_fn cannot be loaded or raises.
    tasks.TaskError: what it returned is not a usable task.
  """
  if not config.task:
    return classification.ClassificationTask(config, model_fn)
  if model_fn is not None:
    raise ValueError("give a task or a model_fn, not both")
  task_fn = user_code.load_function("task", config.task)
  task = user_code.call("task", config.task, task_fn, config)
  tasks_base.check_task(task, f"--task={config.task}")
  if getattr(task, "name", None) in (None, tasks_base.Task.name):
    task.name = f"--task={config.task}"
  return task


def load_splits(config: config_lib.Config, task=None,
                input_context: Optional[tf.distribute.InputContext] = None
                ) -> datasets.Splits:
  """The training and validation splits of a task (default: the config's),
  checked.

  A task whose `build_dataset` takes an `input_context` gets it; with several
  workers, a tf.data.Dataset it returns is taken as this worker's shard.
  """
  task = task or create_task(config)
  where = getattr(task, "name", "the task")
  takes_context = "input_context" in _parameters(task.build_dataset)
  sharded = bool(takes_context and input_context and
                 input_context.num_input_pipelines > 1)
  splits = {}
  for split in tasks_base.SPLITS:
    with errors.phase(f"loading the {split} data"):
      kwargs = {"input_context": input_context} if takes_context else {}
      value = user_code.call("task", where, task.build_dataset, split,
                             **kwargs)
      splits[split] = datasets.task_split(
          value, where=f"{where} ({split})", required=split == "train",
          sharded=sharded)
  return datasets.Splits(**splits)


def _parameters(function) -> tuple:
  try:
    return tuple(inspect.signature(function).parameters)
  except (TypeError, ValueError):
    return ()


def _create_optimizer(config, total_steps):
  learning_rate = optimizers.create_learning_rate(
      kind=config.lr_schedule, base_learning_rate=config.learning_rate,
      total_steps=total_steps, warmup_steps=config.warmup_steps,
      boundaries=config.lr_boundaries, decay_factor=config.lr_decay_factor)
  return precision.wrap_optimizer(
      optimizers.create_optimizer(config.optimizer, learning_rate,
                                  momentum=config.momentum,
                                  weight_decay=config.weight_decay),
      config.mixed_precision)


def _inputs(splits, config, strategy):
  """The ReplicaInput of each split (validation: None when it is empty on
  every worker)."""
  layout = inputs.replica_layout(strategy)
  placement = inputs.resolve_placement(
      config.input_placement, splits, strategy,
      config.device_data_max_mb * 2**20)

  def make(split, where):
    return inputs.ReplicaInput(
        split, strategy=strategy, layout=layout,
        global_batch_size=config.global_batch_size, placement=placement,
        where=where)
  train_input = make(splits.train, "the training data")
  if not train_input.num_examples:
    raise datasets.DataError("the training split is empty on every worker")
  validation_input = (make(splits.validation, "the validation data")
                      if splits.validation is not None else None)
  if validation_input is not None and not validation_input.num_examples:
    validation_input = None
  return layout, train_input, validation_input


def _train_iterator_fn(train_input, config):
  def make(epoch, step_in_epoch):
    # Batches already consumed are skipped on the global order (or this
    # worker's shard), before any split across replicas: a resumed epoch
    # goes on exactly.
    return iter(train_input.train_dataset(
        shuffle_buffer=config.shuffle_buffer, seed=config.seed, epoch=epoch,
        num_epochs=config.epochs - epoch, skip_batches=step_in_epoch))
  return make


def _read_report(train_input, worker_index):
  def report(epoch):
    del epoch
    logging.info("worker %d read %d training examples", worker_index,
                 train_input.take_read_count())
  return report


def _profiler(config, layout, is_chief):
  profiled = config.profile_steps and (is_chief or config.profile_all_workers)
  return profiler_lib.StepProfiler(
      steps=config.profile_steps,
      logdir=profiler_lib.profile_dir(config.model_dir, layout.worker_index)
      if profiled else None)


def _build(config, task, strategy, boundary_checks=()) -> _Run:
  """Builds the strategy (first: before any other TensorFlow op, which a
  task's data may run), then data, model, optimizer and loop objects."""
  if strategy is None:
    strategy = create_strategy(config)
  is_chief = strategy_lib.is_chief(strategy)
  splits = load_splits(config, task, inputs.input_context(
      inputs.replica_layout(strategy)))
  layout, train_input, validation_input = _inputs(splits, config, strategy)
  schedule = schedule_lib.LoopSchedule(
      num_examples=train_input.num_examples,
      global_batch_size=config.global_batch_size, num_epochs=config.epochs,
      steps_per_loop=config.steps_per_loop,
      log_every_steps=config.log_every_steps,
      checkpoint_every_steps=config.checkpoint_every_steps,
      epoch_steps=train_input.steps_per_epoch,
      profile_steps=config.profile_steps)

  # Identical initial weights in every process and for every replica count.
  keras.utils.set_random_seed(config.seed)
  with strategy.scope():
    with errors.phase("building the model"):
      with precision.policy_scope(config.mixed_precision):
        model = user_code.call("task", task.name, task.build_model)
      user_code.check_returns("task", task.name, model, keras.Model,
                              "a keras.Model from build_model()")
      optimizer = _create_optimizer(config, schedule.total_steps)
      # Built now, so that a checkpoint restores into existing slot variables.
      optimizer.build(model.trainable_variables)
  task.model = model  # What a task's own train_step trains.
  trainer = steps.Trainer(
      strategy=strategy, task=task, model=model, optimizer=optimizer,
      add_loss_reduction=config.add_loss_reduction,
      clip_norm=config.clip_norm, jit_compile=config.jit_compile,
      grad_accum_steps=config.grad_accum_steps, train_input=train_input,
      eval_input=validation_input)
  if len(splits.train):  # A worker's shard of a stream may be empty.
    with errors.phase("checking the task's loss on one batch"):
      task_checks.check_loss_shapes(task, model, splits.train)
  with errors.phase("opening the checkpoints"):
    checkpoint = checkpoints.RunCheckpoint(
        checkpoints.checkpoint_dir(config.model_dir), model=model,
        optimizer=optimizer, max_to_keep=config.keep_checkpoints,
        is_chief=is_chief, on_corrupt=config.on_corrupt_checkpoint)
  summary_writers = summaries.SummaryWriters(config.model_dir, enabled=is_chief)
  agreement = preemption.PreemptionAgreement(
      strategy=strategy, num_workers=strategy_lib.num_workers(strategy),
      watcher=preemption.SigtermWatcher())
  profiler = _profiler(config, layout, is_chief)
  validation = None if validation_input is None else controller_lib.Validation(
      dataset_fn=validation_input.eval_dataset,
      num_steps=validation_input.steps_per_epoch)
  controller = controller_lib.Controller(
      trainer=trainer, schedule=schedule,
      train_iterator_fn=_train_iterator_fn(train_input, config),
      validation=validation, checkpoint=checkpoint,
      summary_writers=summary_writers, preemption_agreement=agreement,
      log=logging.info if is_chief else lambda *args: None,
      progress_fn=console.EpochProgress if is_chief else None,
      boundary_checks=boundary_checks,
      epoch_end_fns=(_read_report(train_input, layout.worker_index),),
      profiler=profiler)
  if is_chief:
    logging.info(
        "Training %d examples, validating %d, in global batches of %d (%d "
        "steps per epoch) on %d replica(s); input placement: %s",
        train_input.num_examples,
        validation_input.num_examples if validation_input else 0,
        config.global_batch_size, schedule.steps_per_epoch,
        strategy.num_replicas_in_sync, train_input.placement)
  return _Run(strategy, controller, summary_writers, checkpoint, is_chief,
              profiler)


def _require_validation(run: _Run, config: config_lib.Config, hint: str):
  """Raises DataError unless the run has validation data."""
  if not run.controller.has_validation:
    raise datasets.DataError(
        f"the validation split of --dataset={config.dataset} is empty{hint}")


def _describe_run(run: _Run, config: config_lib.Config) -> None:
  """Logs the configuration and the model to TensorBoard (chief only)."""
  model = run.controller.model
  lines = []
  model.summary(print_fn=lambda line, **kwargs: lines.append(line))
  hparams = dataclasses.asdict(config)
  hparams["num_replicas"] = run.strategy.num_replicas_in_sync
  run.summary_writers.write_run_description(
      hparams, "\n".join(lines), model.count_params())


def train_and_evaluate(
    config: config_lib.Config, *, task=None,
    model_fn: Optional[ModelFn] = None,
    strategy: Optional[tf.distribute.Strategy] = None,
    validate: Optional[bool] = None,
) -> RunResult:
  """Trains as the config says, resuming from model_dir, then exports.

  Args:
    config: the run configuration.
    task: what to train (see `tasks.Task`); default: `create_task(config,
      model_fn)`, the `--task` of the config or the built-in classification.
    model_fn: for the built-in classification task: builds the Keras model
      (called under the strategy's scope); it must map [batch, 784] floats to
      [batch, 10] logits. Default: `models.mnist.create_model`, which follows
      `config.model`.
    strategy: an existing strategy; by default one is built from `config`
      (which must then happen before any other TensorFlow op).
    validate: run the validation pass after each epoch; default: unless
      `config.mode` is "train".

  Returns:
    The trained model, its final metrics and position.

  Raises:
    errors.DistTrainError: the run cannot start or stopped; the message says
      what and where (subclasses: data.datasets.DataError,
      user_code.UserCodeError, outputs.checkpoints.CheckpointError, ...).
  """
  if validate is None:
    validate = config.mode != "train"
  if strategy is None:
    strategy = create_strategy(config)
  # The chief owns model_dir before it writes anything there, and checks at
  # every loop boundary that it still does.
  owner = (ownership.ModelDirOwnership(config.model_dir)
           if strategy_lib.is_chief(strategy) else None)
  with owner or contextlib.nullcontext():
    task = task or create_task(config, model_fn)
    run = _build(config, task, strategy,
                 boundary_checks=(owner.check,) if owner else ())
    if validate:
      _require_validation(run, config, ": give --num_validation_examples > 0, "
                          "or --mode=train to train without validation")
    try:
      _describe_run(run, config)
      result = run.controller.train(validate=validate)
    finally:
      run.profiler.close()
      run.summary_writers.close()
    if run.is_chief:
      with errors.phase("exporting the model"):
        export.export_model(result.model, config.model_dir,
                            saved_model=config.export_saved_model)
  return result


def evaluate(config: config_lib.Config, *, task=None,
             model_fn: Optional[ModelFn] = None,
             strategy: Optional[tf.distribute.Strategy] = None) -> dict:
  """Evaluates the latest checkpoint on the validation split.

  Writes the metrics as JSON to <model_dir>/eval_results.json and returns
  them, with the checkpoint's path and global step.

  Raises:
    NoCheckpointError: model_dir holds no checkpoint.
  """
  run = _build(config, task or create_task(config, model_fn), strategy)
  try:
    with errors.phase("restoring the latest checkpoint"):
      position = run.checkpoint.restore_latest(model_only=True)
    if position is None:
      raise NoCheckpointError(
          f"no checkpoint to evaluate in {run.checkpoint.directory}")
    _require_validation(run, config, "")
    metrics = run.controller.validate()
  finally:
    run.summary_writers.close()
  results = {"checkpoint": position.path, "global_step": position.global_step,
             **metrics}
  if run.is_chief:
    with errors.phase("writing eval_results.json"):
      path = os.path.join(config.model_dir, "eval_results.json")
      with tf.io.gfile.GFile(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
      tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
    logging.info("Wrote %s", path)
  return results


def run(config: config_lib.Config,
        resolved: Optional[cluster.Resolved] = None):
  """Runs `config.mode`; what the command line calls.

  Args:
    config: the run configuration.
    resolved: the cluster `cluster.resolve` found for `config`, if known.
  """
  strategy = create_strategy(config, resolved)
  if config.mode == "evaluate":
    results = evaluate(config, strategy=strategy)
    print(json.dumps(results))
    return results
  return train_and_evaluate(config, strategy=strategy)
