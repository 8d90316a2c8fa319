"""The Python API: build a run from a Config, then train or evaluate it.

    from dist_train import config, train
    result = train.train_and_evaluate(config.Config(model_dir="/tmp/run"))

The command line (`dist_train.main`) calls `run`, which dispatches on
`config.mode` to the same functions. This is where the Config is unpacked:
every layer below takes the values it uses.
"""

import contextlib
import dataclasses
import json
import os
import time
from typing import Optional, Sequence

from absl import logging
import keras
import tensorflow as tf

from dist_train import config as config_lib
from dist_train import console
from dist_train import errors
from dist_train.data import datasets
from dist_train.distribute import cluster
from dist_train.distribute import inputs
from dist_train.distribute import strategy as strategy_lib
from dist_train.distribute import watchdog as watchdog_lib
from dist_train.loop import controller as controller_lib
from dist_train.loop import hooks
from dist_train.loop import optimizers
from dist_train.loop import precision
from dist_train.loop import preemption
from dist_train.loop import early_stopping as early_stopping_lib
from dist_train.loop import schedule as schedule_lib
from dist_train.loop import steps
from dist_train.loop import stop
from dist_train.outputs import best as best_lib
from dist_train.outputs import checkpoints
from dist_train.outputs import export
from dist_train.outputs import ownership
from dist_train.outputs import profiler as profiler_lib
from dist_train.outputs import summaries
from dist_train.outputs import warm_start
from dist_train.tasks import checks as task_checks
from dist_train.tasks import loading as task_loading

ModelFn = task_loading.ModelFn
# Written by the chief when training ends (at its last step or early): an
# evaluator beside the run stops after the checkpoint of that step.
TRAINING_DONE = "training_done.json"
# How often an evaluator without a new checkpoint looks for TRAINING_DONE.
_EVALUATOR_POLL_S = 2.0
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


create_task = task_loading.create_task
load_splits = task_loading.load_splits


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


def _profiler(config, layout, is_chief):
  profiled = config.profile_steps and (is_chief or config.profile_all_workers)
  return profiler_lib.StepProfiler(
      steps=config.profile_steps,
      logdir=profiler_lib.profile_dir(config.model_dir, layout.worker_index)
      if profiled else None)


def _hooks(config, *, trainer, summary_writers, is_chief, worker_index,
           profiler, boundary_checks, callbacks):
  """The run's one list of hooks, in the order they are called: ownership
  checks, the profiler and the read report; validation summaries and the
  best model; the user's callbacks; early stopping last, after every
  callback saw the evaluation. Also returns early stopping's state, which
  the run's checkpoint keeps (None without a patience)."""
  def global_step():
    return int(trainer.optimizer.iterations.numpy())
  own = [hooks.BoundaryCheck(check) for check in boundary_checks]
  own += [hooks.ProfileSteps(profiler),
          hooks.ReadReport(take_read_count=trainer.take_read_count,
                           worker_index=worker_index),
          hooks.ValidationSummaries(summary_writers=summary_writers,
                                    global_step_fn=global_step)]
  if config.best_metric:
    own.append(hooks.KeepBest(
        best=best_lib.BestModel(config.model_dir, metric=config.best_metric,
                                mode=config.best_mode, is_chief=is_chief),
        global_step_fn=global_step))
  stopping = (early_stopping_lib.EarlyStopping(
      metric=config.best_metric, mode=config.best_mode,
      patience=config.early_stopping_patience,
      min_delta=config.early_stopping_min_delta)
              if config.early_stopping_patience else None)
  last = [hooks.StopWhenNotImproving(stopping)] if stopping else []
  return own + list(callbacks) + last, stopping


def _build(config, task, description, strategy, boundary_checks=(),
           callbacks=(), *, writes_checkpoints=True) -> _Run:
  """Builds the strategy (first: before any other TensorFlow op, which a
  task's data may run), then data, model, optimizer and loop objects.

  An evaluator (`writes_checkpoints=False`) only reads the checkpoints: it
  leaves alone the `ckpt-<step>_temp*` files of a save in progress beside it.
  """
  if strategy is None:
    strategy = create_strategy(config)
  is_chief = strategy_lib.is_chief(strategy)
  splits = load_splits(config, task, inputs.input_context(
      inputs.replica_layout(strategy)), description=description)
  layout, train_input, validation_input = _inputs(splits, config, strategy)
  schedule = schedule_lib.LoopSchedule(
      num_examples=train_input.num_examples,
      global_batch_size=config.global_batch_size, num_epochs=config.epochs,
      steps_per_loop=config.steps_per_loop,
      log_every_steps=config.log_every_steps,
      checkpoint_every_steps=config.checkpoint_every_steps,
      eval_every_steps=config.eval_every_steps,
      epoch_steps=train_input.steps_per_epoch,
      profile_steps=config.profile_steps)

  # Identical initial weights in every process and for every replica count.
  keras.utils.set_random_seed(config.seed)
  with strategy.scope():
    with errors.phase("building the model"):
      with precision.policy_scope(config.mixed_precision):
        model = task_loading.build_model(task, description)
      optimizer = _create_optimizer(config, schedule.total_steps)
      # Built now, so that a checkpoint restores into existing slot variables.
      optimizer.build(model.trainable_variables)
  trainer = steps.Trainer(
      strategy=strategy, task=task, model=model, optimizer=optimizer,
      add_loss_reduction=config.add_loss_reduction,
      clip_norm=config.clip_norm, jit_compile=config.jit_compile,
      grad_accum_steps=config.grad_accum_steps, train_input=train_input,
      eval_input=validation_input, shuffle_buffer=config.shuffle_buffer,
      seed=config.seed, description=description)
  if len(splits.train):  # A worker's shard of a stream may be empty.
    with errors.phase("checking the task's loss on one batch"):
      task_checks.check_loss_shapes(description, model, splits.train)
  summary_writers = summaries.SummaryWriters(config.model_dir, enabled=is_chief)
  profiler = _profiler(config, layout, is_chief)
  run_hooks, stopping = _hooks(
      config, trainer=trainer, summary_writers=summary_writers,
      is_chief=is_chief, worker_index=layout.worker_index, profiler=profiler,
      boundary_checks=boundary_checks, callbacks=callbacks)
  with errors.phase("opening the checkpoints"):
    checkpoint = checkpoints.RunCheckpoint(
        checkpoints.checkpoint_dir(config.model_dir), model=model,
        optimizer=optimizer, max_to_keep=config.keep_checkpoints,
        is_chief=is_chief and writes_checkpoints,
        on_corrupt=config.on_corrupt_checkpoint,
        extra=stopping.variables if stopping else None)
  agreement = preemption.PreemptionAgreement(
      strategy=strategy, num_workers=strategy_lib.num_workers(strategy),
      watcher=preemption.SigtermWatcher())
  controller = controller_lib.Controller(
      trainer=trainer, schedule=schedule, checkpoint=checkpoint,
      summary_writers=summary_writers, preemption_agreement=agreement,
      log=logging.info if is_chief else lambda *args: None,
      callbacks=run_hooks,
      progress_fn=console.EpochProgress if is_chief else None,
      watchdog=watchdog_lib.CollectiveWatchdog(
          timeout_s=config.collective_timeout_s,
          num_workers=layout.num_workers))
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


def _warm_start(config, run: _Run) -> None:
  """--init_checkpoint, while the run has no checkpoint of its own."""
  if not config.init_checkpoint:
    return
  if run.checkpoint.latest is not None:
    logging.info("Ignoring --init_checkpoint=%s: the run resumes from its own "
                 "checkpoint %s", config.init_checkpoint,
                 run.checkpoint.latest)
    return
  with errors.phase(f"initialising from {config.init_checkpoint}"):
    skipped = warm_start.initialize(run.controller.model,
                                    config.init_checkpoint,
                                    skip_mismatch=config.init_skip_mismatch)
  logging.info("Initialised the model from %s%s", config.init_checkpoint,
               f"; skipped {'; '.join(skipped)}" if skipped else "")


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
  hparams["num_workers"] = strategy_lib.num_workers(run.strategy)
  run.summary_writers.write_run_description(
      hparams, "\n".join(lines), model.count_params())


def train_and_evaluate(
    config: config_lib.Config, *, task=None,
    model_fn: Optional[ModelFn] = None,
    strategy: Optional[tf.distribute.Strategy] = None,
    validate: Optional[bool] = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
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
    validate: run validation passes (every epoch, or every
      `config.eval_every_steps`); default: unless `config.mode` is "train".
    callbacks: keras.callbacks.Callback objects, called at loop boundaries
      with the logs the console shows: on_train_begin/end,
      on_epoch_begin/end (validation metrics as `val_<name>`),
      on_train_batch_end after each compiled loop (with the global step),
      on_test_end after each evaluation. A callback that sets
      `model.stop_training = True` ends the run at the next loop boundary,
      agreed across workers.

  Returns:
    The trained model, its final metrics and position.

  Raises:
    errors.DistTrainError: the run cannot start or stopped; the message says
      what and where (subclasses: data.datasets.DataError,
      user_code.UserCodeError, outputs.checkpoints.CheckpointError, ...).
  """
  if validate is None:
    validate = config.mode != "train"
  with stop.installed():
    stop.clear()
    stop.set_phase("before the first training step")
    return _train_and_evaluate(config, task=task, model_fn=model_fn,
                               strategy=strategy, validate=validate,
                               callbacks=callbacks)


def _train_and_evaluate(config, *, task, model_fn, strategy, validate,
                        callbacks) -> RunResult:
  if strategy is None:
    strategy = create_strategy(config)
  # The chief owns model_dir before it writes anything there, and checks at
  # every loop boundary that it still does.
  owner = (ownership.ModelDirOwnership(config.model_dir)
           if strategy_lib.is_chief(strategy) else None)
  with owner or contextlib.nullcontext(), (
      stop.closing(owner.release) if owner else contextlib.nullcontext()):
    task, description = task_loading.load_task(config, task=task,
                                               model_fn=model_fn)
    run = _build(config, task, description, strategy,
                 boundary_checks=(owner.check,) if owner else (),
                 callbacks=callbacks)
    _warm_start(config, run)
    if run.is_chief and tf.io.gfile.exists(
        os.path.join(config.model_dir, TRAINING_DONE)):
      # Training (again, e.g. with more epochs): an evaluator beside it
      # waits for the new final checkpoint.
      tf.io.gfile.remove(os.path.join(config.model_dir, TRAINING_DONE))
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
      # The export is written under a temporary name and renamed, and
      # training_done.json comes last: a stop here exits at once, and the
      # rerun exports again.
      stop.set_phase("while exporting the model")
      stop.check_now()
      with errors.phase("exporting the model"):
        export.export_model(result.model, config.model_dir,
                            saved_model=config.export_saved_model)
        _write_json(os.path.join(config.model_dir, TRAINING_DONE),
                    {"global_step": result.global_step,
                     "stopped_early": result.stopped_early})
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
  stop.set_phase("while evaluating")  # Nothing to save: a stop exits at once.
  task, description = task_loading.load_task(config, task=task,
                                             model_fn=model_fn)
  run = _build(config, task, description, strategy, writes_checkpoints=False)
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
    _write_eval_results(config.model_dir, results)
  return results


def continuous_evaluate(config: config_lib.Config, *, task=None,
                        model_fn: Optional[ModelFn] = None,
                        strategy: Optional[tf.distribute.Strategy] = None
                        ) -> dict:
  """Evaluates each new checkpoint of a training run beside it, once.

  Watches <model_dir>/checkpoints, writes each evaluation's metrics to
  TensorBoard under <model_dir>/eval/ (at the checkpoint's step) and to
  <model_dir>/eval_results.json, keeps <model_dir>/best/ when given
  --best_metric (give it to the trainers or to the evaluator, not both), and
  returns after the run's final checkpoint (its last step, or the step
  <model_dir>/training_done.json names when it stopped early) or after
  --eval_timeout_s without a new one.

  Returns:
    The results of the last evaluation ({} when there was none).
  """
  stop.set_phase("while evaluating")  # Nothing to save: a stop exits at once.
  task, description = task_loading.load_task(config, task=task,
                                             model_fn=model_fn)
  run = _build(config, task, description, strategy, writes_checkpoints=False)
  _require_validation(run, config, "")
  best = (best_lib.BestModel(config.model_dir, metric=config.best_metric,
                             mode=config.best_mode, is_chief=run.is_chief)
          if config.best_metric else None)
  total_steps = run.controller.total_steps
  results = {}
  last_new = time.monotonic()

  def training_ended():
    return bool(results) and (
        results["global_step"] >= _final_step(config, total_steps))

  def stop_waiting():
    # Called after each poll without a new checkpoint.
    return training_ended() or (
        time.monotonic() - last_new >= config.eval_timeout_s)

  try:
    for path in tf.train.checkpoints_iterator(
        run.checkpoint.directory, min_interval_secs=0.5,
        timeout=min(config.eval_timeout_s, _EVALUATOR_POLL_S),
        timeout_fn=stop_waiting):
      last_new = time.monotonic()
      results = _evaluate_checkpoint(run, path, best, config) or results
      if training_ended():
        break
  finally:
    run.summary_writers.close()
  if training_ended():
    logging.info("Evaluated the final checkpoint (step %d); done",
                 results["global_step"])
  else:
    logging.info("No new checkpoint for %gs; done", config.eval_timeout_s)
  return results


def _evaluate_checkpoint(run: _Run, path: str, best, config) -> dict:
  """Evaluates one checkpoint for continuous_evaluate and writes the results;
  {} when it is gone."""
  try:
    position = run.checkpoint.restore_model(path)
  except checkpoints.CheckpointError as e:
    # Deleted by --keep_checkpoints before it could be read: go on.
    logging.warning("Skipping %s: %s", path, e)
    return {}
  metrics = run.controller.validate()
  results = {"checkpoint": path, "global_step": position.global_step,
             **metrics}
  run.summary_writers.write_scalars("eval", metrics, position.global_step)
  if best is not None:
    best.update(global_step=position.global_step, metrics=metrics,
                model=run.controller.model)
  if run.is_chief:
    _write_eval_results(config.model_dir, results)
  logging.info("Evaluated %s | %s", path, " ".join(
      f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
  return results


def _write_eval_results(model_dir, results):
  path = os.path.join(model_dir, "eval_results.json")
  with errors.phase("writing eval_results.json"):
    _write_json(path, results)
  logging.info("Wrote %s", path)


def _write_json(path, value):
  """Writes JSON to a temporary name and renames it: never half a file."""
  with tf.io.gfile.GFile(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2)
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def _final_step(config, default):
  """The last step of the training run in model_dir, once it has ended."""
  path = os.path.join(config.model_dir, TRAINING_DONE)
  if not tf.io.gfile.exists(path):
    return default
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)["global_step"]


def run(config: config_lib.Config,
        resolved: Optional[cluster.Resolved] = None):
  """Runs `config.mode`; what the command line calls.

  Args:
    config: the run configuration.
    resolved: the cluster `cluster.resolve` found for `config`, if known.
  """
  strategy = create_strategy(config, resolved)
  if config.mode == "continuous_eval":
    return continuous_evaluate(config, strategy=strategy)
  if config.mode == "evaluate":
    results = evaluate(config, strategy=strategy)
    print(json.dumps(results))
    return results
  return train_and_evaluate(config, strategy=strategy)
