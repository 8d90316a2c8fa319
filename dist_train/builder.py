"""Builds a run from a Config, with only what its mode needs: the Trainer
(data, model, optimizer) and checkpoint of every mode; for training, the
Controller with its hooks, the preemption agreement and the profiler."""

import dataclasses
import functools
import os
from typing import Callable, Optional, Sequence

from absl import logging
import keras
import tensorflow as tf

from dist_train import config as config_lib
from dist_train import errors
from dist_train import progress
from dist_train.data import datasets
from dist_train.distribute import cluster
from dist_train.distribute import inputs
from dist_train.distribute import strategy as strategy_lib
from dist_train.distribute import watchdog as watchdog_lib
from dist_train.loop import controller as controller_lib
from dist_train.loop import early_stopping as early_stopping_lib
from dist_train.loop import ema as ema_lib
from dist_train.loop import health as health_lib
from dist_train.loop import health_report as health_report_lib
from dist_train.loop import hooks
from dist_train.loop import keras_optimizer
from dist_train.loop import optimizers
from dist_train.loop import plateau as plateau_lib
from dist_train.loop import precision
from dist_train.loop import preemption
from dist_train.loop import schedule as schedule_lib
from dist_train.loop import spikes
from dist_train.loop import steps
from dist_train.loop import time_limits
from dist_train.outputs import best as best_lib
from dist_train.outputs import checkpoints
from dist_train.outputs import metrics_file as metrics_file_lib
from dist_train.outputs import profiler as profiler_lib
from dist_train.outputs import run_record
from dist_train.outputs import summaries
from dist_train.tasks import base as tasks_base
from dist_train.tasks import checks as task_checks
from dist_train.tasks import loading as task_loading


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
class Parts:
  """What every mode builds: the trainer and what it reads and writes."""

  strategy: tf.distribute.Strategy
  trainer: steps.Trainer
  schedule: schedule_lib.LoopSchedule
  summary_writers: summaries.SummaryWriters
  is_chief: bool
  layout: object  # pipelines.ReplicaLayout of this worker.
  watchdog: watchdog_lib.CollectiveWatchdog
  plateau: Optional[plateau_lib.PlateauRule] = None  # --lr_schedule=plateau
  # The factor of the learning rate (optimizers.create_rate_scale), and
  # () -> the schedule's rate of the next step before it.
  rate_scale: Optional[tf.Variable] = None
  unscaled_rate_fn: Optional[Callable[[], float]] = None
  health: Optional[health_lib.StepHealth] = None  # --health_scalars.


@dataclasses.dataclass(frozen=True)
class TrainingRun:
  """A training run: the Controller drives the trainer."""

  strategy: tf.distribute.Strategy
  controller: controller_lib.Controller
  summary_writers: summaries.SummaryWriters
  checkpoint: checkpoints.RunCheckpoint
  is_chief: bool
  profiler: profiler_lib.StepProfiler


@dataclasses.dataclass(frozen=True)
class EvaluationRun:
  """An evaluator: restores checkpoints into the trainer's model and
  evaluates them; it never trains, saves or agrees on a stop."""

  parts: Parts
  checkpoint: checkpoints.RunCheckpoint

  @property
  def model(self) -> keras.Model:
    return self.parts.trainer.model

  @property
  def is_chief(self) -> bool:
    return self.parts.is_chief

  @property
  def summary_writers(self) -> summaries.SummaryWriters:
    return self.parts.summary_writers

  @property
  def has_validation(self) -> bool:
    return self.parts.trainer.has_validation

  @property
  def total_steps(self) -> int:
    return self.parts.schedule.total_steps

  def validate(self) -> dict:
    """One pass over the validation split, in compiled calls of
    `--steps_per_loop` steps."""
    trainer = self.parts.trainer
    what = (f"validating at step "
            f"{int(trainer.optimizer.iterations.numpy())}")
    with errors.phase(what):
      return trainer.evaluate(
          chunk_steps=self.parts.schedule.steps_per_loop,
          guard=lambda: self.parts.watchdog.guard(
              what, armed=trainer.eval_traces > 0))


def _plateau_rule(config, scale):
  """The rule of --lr_schedule=plateau (None for another schedule)."""
  if config.lr_schedule != "plateau":
    return None
  metric = config.lr_plateau_metric or config.best_metric or "loss"
  return plateau_lib.PlateauRule(
      scale=scale, metric=metric,
      mode=config.best_mode if metric == config.best_metric else "auto",
      patience=config.lr_plateau_patience, factor=config.lr_plateau_factor,
      base_learning_rate=config.learning_rate,
      min_learning_rate=config.lr_min)


def _create_optimizer(config, total_steps, task, description, scale):
  """(optimizer, schedule): the flags' optimizer, or the task's own
  (`Task.build_optimizer`), at the flags' learning-rate schedule times
  `scale`, wrapped for loss scaling."""
  learning_rate = optimizers.create_learning_rate(
      kind=config.lr_schedule, base_learning_rate=config.learning_rate,
      total_steps=total_steps, warmup_steps=config.warmup_steps,
      boundaries=config.lr_boundaries, decay_factor=config.lr_decay_factor,
      scale=scale)
  if "build_optimizer" in description.hooks:
    optimizer = task_loading.build_optimizer(task, description, learning_rate)
  else:
    optimizer = optimizers.create_optimizer(
        config.optimizer, learning_rate, momentum=config.momentum,
        weight_decay=config.weight_decay)
  return (precision.wrap_optimizer(optimizer, config.mixed_precision),
          learning_rate)


def _inputs(splits, config, strategy):
  """The ReplicaInput of each split (validation: None when it is empty on
  every worker)."""
  layout = inputs.replica_layout(strategy)
  placement = inputs.resolve_placement(
      config.input_placement, splits, strategy,
      config.device_data_max_mb * 2**20)

  def make(split, where, **steps):
    return inputs.ReplicaInput(
        split, strategy=strategy, layout=layout,
        global_batch_size=config.global_batch_size, placement=placement,
        where=where, **steps)
  train_input = make(splits.train, "the training data",
                     endless_steps=config.train_steps)
  if train_input.num_examples == 0:
    raise datasets.DataError("the training split is empty on every worker")
  validation_input = (make(splits.validation, "the validation data",
                           endless_steps=config.validation_steps,
                           max_steps=config.validation_steps)
                      if splits.validation is not None else None)
  if validation_input is not None and validation_input.num_examples == 0:
    validation_input = None
  return layout, train_input, validation_input


def _profiler(config, layout, is_chief):
  profiled = config.profile_steps and (is_chief or config.profile_all_workers)
  return profiler_lib.StepProfiler(
      steps=config.profile_steps,
      logdir=profiler_lib.profile_dir(config.model_dir, layout.worker_index)
      if profiled else None)


def _hooks(config, *, trainer, summary_writers, is_chief, worker_index,
           profiler, boundary_checks, callbacks, plateau=None):
  """The run's one list of hooks, in the order they are called: the start
  of the weight average (with --ema_decay); ownership checks, the profiler
  and the read report; validation summaries, the best model and the plateau
  rule; the user's callbacks; early stopping last, after every
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
        global_step_fn=global_step, average=trainer.eval_average))
  if plateau is not None:
    own.append(plateau_lib.CutOnPlateau(plateau, global_step_fn=global_step))
  stopping = (early_stopping_lib.EarlyStopping(
      metric=config.best_metric, mode=config.best_mode,
      patience=config.early_stopping_patience,
      min_delta=config.early_stopping_min_delta)
              if config.early_stopping_patience else None)
  last = [hooks.StopWhenNotImproving(stopping)] if stopping else []
  if trainer.ema is not None:
    # After the checkpoint (and any warm start) restored.
    own.insert(0, hooks.AtTrainBegin(
        lambda: trainer.ema.start(global_step())))
  return own + list(callbacks) + last, stopping


def _num_epochs(config, steps_per_epoch) -> int:
  """--epochs, or with --train_steps the passes its steps start (the last
  one may end early)."""
  if config.train_steps is None:
    return config.epochs
  return -(-config.train_steps // steps_per_epoch)


def _build_parts(config, task, description, strategy) -> Parts:
  """Builds the strategy (first: before any other TensorFlow op, which a
  task's data may run), then data, model, optimizer and trainer."""
  if strategy is None:
    strategy = create_strategy(config)
  is_chief = strategy_lib.is_chief(strategy)
  splits = task_loading.load_splits(
      config, task, inputs.input_context(inputs.replica_layout(strategy)),
      description=description)
  layout, train_input, validation_input = _inputs(splits, config, strategy)
  schedule = schedule_lib.LoopSchedule(
      num_examples=train_input.num_examples,
      global_batch_size=config.global_batch_size,
      num_epochs=_num_epochs(config, train_input.steps_per_epoch),
      train_steps=config.train_steps,
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
      rate_scale = optimizers.create_rate_scale(strategy)
      plateau = _plateau_rule(config, rate_scale)
      optimizer, learning_rate = _create_optimizer(
          config, schedule.total_steps, task, description, rate_scale)
      # Built now, so that a checkpoint restores into existing slot variables.
      optimizer.build(model.trainable_variables)
  ema = (ema_lib.WeightAverage(
      strategy=strategy, variables=model.trainable_variables,
      decay=config.ema_decay, warmup_steps=config.ema_warmup_steps)
         if config.ema_decay else None)
  health = (health_lib.StepHealth(
      strategy=strategy, variables=model.trainable_variables,
      keep_gradients=bool(config.histogram_every_steps),
      timed_steps=health_lib.TIMED_STEPS if layout.num_workers > 1 else 0)
            if config.health_scalars else None)
  trainer = steps.Trainer(
      strategy=strategy, task=task, model=model, optimizer=optimizer,
      add_loss_reduction=config.add_loss_reduction,
      clip_norm=config.clip_norm, jit_compile=config.jit_compile,
      grad_accum_steps=config.grad_accum_steps, train_input=train_input,
      eval_input=validation_input, shuffle_buffer=config.shuffle_buffer,
      seed=config.seed, description=description, ema=ema,
      eval_with_ema=config.eval_with_ema,
      sync_batchnorm=config.sync_batchnorm, health=health)
  # A worker's shard of a stream may be empty.
  if getattr(splits.train, "endless", False) or len(splits.train):
    with errors.phase("checking the task's loss on one batch"):
      task_checks.check_loss_shapes(description, model, splits.train)
  if is_chief:
    logging.info(
        "Training %s, validating %s, in global batches of %d (%s) on %d "
        "replica(s); input placement: %s",
        _examples(train_input), _examples(validation_input, noun=False),
        config.global_batch_size,
        f"{schedule.total_steps} steps, no epochs" if schedule.epoch_less
        else f"{schedule.steps_per_epoch} steps per epoch",
        strategy.num_replicas_in_sync, train_input.placement)
  return Parts(
      strategy=strategy, trainer=trainer, schedule=schedule,
      summary_writers=summaries.SummaryWriters(config.model_dir,
                                               enabled=is_chief),
      is_chief=is_chief, layout=layout,
      watchdog=watchdog_lib.CollectiveWatchdog(
          timeout_s=config.collective_timeout_s,
          num_workers=layout.num_workers), plateau=plateau,
      rate_scale=rate_scale,
      unscaled_rate_fn=lambda: learning_rate.unscaled(optimizer.iterations),
      health=health)


def _examples(replica_input, noun=True) -> str:
  """"N examples" of a split ("N" without `noun`), or how a stream of
  unknown length is read."""
  if replica_input is not None and replica_input.endless:
    return (f"a stream of unknown length ({replica_input.steps_per_epoch} "
            "global batches a pass)")
  count = replica_input.num_examples if replica_input is not None else 0
  return f"{count} examples" if noun else str(count)


def _checkpoint(config, parts: Parts, *, writes: bool, extra=None,
                optional=None):
  ema = parts.trainer.ema
  with errors.phase("opening the checkpoints"):
    return checkpoints.RunCheckpoint(
        checkpoints.checkpoint_dir(config.model_dir),
        model=parts.trainer.model, optimizer=parts.trainer.optimizer,
        max_to_keep=config.keep_checkpoints,
        is_chief=parts.is_chief and writes,
        on_corrupt=config.on_corrupt_checkpoint, extra=extra,
        optional=optional, model_extra=ema.variables if ema is not None else None)


def build_training(config: config_lib.Config, task,
                   description: tasks_base.TaskDescription,
                   strategy: Optional[tf.distribute.Strategy], *,
                   boundary_checks: Sequence[Callable[[], None]] = (),
                   callbacks: Sequence[keras.callbacks.Callback] = ()
                   ) -> TrainingRun:
  """A training run: the trainer, its checkpoint (with early stopping's
  state), the hooks, the preemption agreement and the Controller.

  Args:
    config: the run configuration.
    task: what to train, and `description` its description.
    strategy: the strategy; None builds the config's.
    boundary_checks: callables run at each loop boundary that raise to stop
      the run (the model_dir ownership check).
    callbacks: the user's keras.callbacks.Callback objects.
  """
  parts = _build_parts(config, task, description, strategy)
  trainer, is_chief = parts.trainer, parts.is_chief
  profiler = _profiler(config, parts.layout, is_chief)
  run_hooks, stopping = _hooks(
      config, trainer=trainer, summary_writers=parts.summary_writers,
      is_chief=is_chief, worker_index=parts.layout.worker_index,
      profiler=profiler, boundary_checks=boundary_checks, callbacks=callbacks,
      plateau=parts.plateau)
  checkpoint = _checkpoint(
      config, parts, writes=True,
      extra=stopping.variables if stopping else None,
      optional={"lr_scale": parts.rate_scale,
                **(parts.plateau.variables if parts.plateau else {})})
  # What Keras callbacks find as model.optimizer (see keras_optimizer.py).
  trainer.model.optimizer = keras_optimizer.KerasOptimizerView(
      optimizer=trainer.optimizer, scale=parts.rate_scale,
      unscaled_rate_fn=parts.unscaled_rate_fn,
      average=trainer.ema, variables=trainer.model.trainable_variables)
  metrics_path = metrics_file_lib.resolve_path(config.metrics_file,
                                               config.model_dir)
  if is_chief and metrics_path:
    metrics_file = metrics_file_lib.MetricsFile(
        metrics_path, steps_per_epoch=parts.schedule.steps_per_epoch)
    parts.summary_writers.add_scalar_listener(metrics_file)
    # After the restore: the lines of steps the resume runs again go.
    run_hooks.insert(0, hooks.AtTrainBegin(lambda: metrics_file.start(
        int(trainer.optimizer.iterations.numpy()))))
  agreement = preemption.PreemptionAgreement(
      strategy=parts.strategy,
      num_workers=strategy_lib.num_workers(parts.strategy),
      watcher=preemption.SigtermWatcher())
  controller = controller_lib.Controller(
      trainer=trainer, schedule=parts.schedule, checkpoint=checkpoint,
      summary_writers=parts.summary_writers, preemption_agreement=agreement,
      log=logging.info if is_chief else lambda *args: None,
      callbacks=run_hooks,
      progress_fn=progress.EpochProgress if is_chief else None,
      watchdog=parts.watchdog,
      health_report=_health_report(config, parts, is_chief),
      wall_clock=time_limits.WallClock(
          max_runtime_s=config.max_runtime_s,
          # One clock decides when a time-based checkpoint is due: the
          # chief's; the agreement tells the other workers.
          checkpoint_every_secs=(config.checkpoint_every_secs if is_chief
                                 else None),
          start_time=time_limits.run_start()),
      spike_policy=spikes.SpikePolicy(
          loss_upper_bound=config.loss_upper_bound,
          max_trials=config.recovery_max_trials),
      recovery_fn=(functools.partial(run_record.add_recovery,
                                     config.model_dir) if is_chief else None))
  return TrainingRun(strategy=parts.strategy, controller=controller,
                     summary_writers=parts.summary_writers,
                     checkpoint=checkpoint, is_chief=is_chief,
                     profiler=profiler)


def _health_report(config, parts: Parts, is_chief: bool):
  """The report of --health_scalars (None when off)."""
  if parts.health is None:
    return None
  return health_report_lib.HealthReport(
      health=parts.health, strategy=parts.strategy,
      num_workers=parts.layout.num_workers,
      num_local_replicas=parts.layout.num_local_replicas,
      optimizer=parts.trainer.optimizer, clip_norm=config.clip_norm,
      straggler_warn_ratio=config.straggler_warn_ratio,
      histogram_every_steps=config.histogram_every_steps,
      warn=logging.warning if is_chief else lambda *args: None)


def build_evaluation(config: config_lib.Config, task,
                     description: tasks_base.TaskDescription,
                     strategy: Optional[tf.distribute.Strategy]
                     ) -> EvaluationRun:
  """An evaluator: the trainer and a checkpoint it only reads (it leaves
  alone the `ckpt-<step>_temp*` files of a save in progress beside it)."""
  parts = _build_parts(config, task, description, strategy)
  return EvaluationRun(parts=parts,
                       checkpoint=_checkpoint(config, parts, writes=False))


def require_validation(has_validation: bool, config: config_lib.Config,
                       hint: str) -> None:
  """Raises DataError unless the run has validation data."""
  if not has_validation:
    raise datasets.DataError(
        f"the validation split of --dataset={config.dataset} is empty{hint}")
