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
from typing import Callable, Optional

from absl import logging
import keras
import tensorflow as tf

from dist_train import config as config_lib
from dist_train import errors
from dist_train import user_code
from dist_train.data import datasets
from dist_train.data import pipelines
from dist_train.distribute import cluster
from dist_train.distribute import strategy as strategy_lib
from dist_train.loop import controller as controller_lib
from dist_train.loop import optimizers
from dist_train.loop import precision
from dist_train.loop import preemption
from dist_train.loop import schedule as schedule_lib
from dist_train.loop import steps
from dist_train.models import mnist
from dist_train.outputs import checkpoints
from dist_train.outputs import export
from dist_train.outputs import ownership
from dist_train.outputs import summaries

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


def load_splits(config: config_lib.Config) -> datasets.Splits:
  """The training and validation splits of the config's data set."""
  with errors.phase("loading data"):
    return datasets.load_splits(
        dataset=config.dataset, data_dir=config.data_dir,
        num_validation_examples=config.num_validation_examples,
        num_train_examples=config.num_train_examples, seed=config.seed,
        user_config=config)


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


def _validation(splits, config):
  if not len(splits.validation):
    return None
  return controller_lib.Validation(
      dataset_fn=lambda: pipelines.make_eval_dataset(
          splits.validation, global_batch_size=config.global_batch_size),
      num_steps=schedule_lib.num_batches(len(splits.validation),
                                         config.global_batch_size))


def _train_iterator_fn(splits, config):
  def make(epoch, step_in_epoch):
    # Batches already consumed are skipped on the global dataset, before the
    # trainer splits it across replicas: a resumed epoch goes on exactly.
    return iter(pipelines.make_train_dataset(
        splits.train, global_batch_size=config.global_batch_size,
        shuffle_buffer=config.shuffle_buffer, seed=config.seed, epoch=epoch,
        num_epochs=config.epochs - epoch, skip_batches=step_in_epoch))
  return make


def _build(config, model_fn, strategy, boundary_checks=()) -> _Run:
  """Builds the strategy (first: before any other TensorFlow op, which a user
  dataset_fn may run), then data, model, optimizer and loop objects."""
  model_fn = model_fn or mnist.create_model
  if strategy is None:
    strategy = create_strategy(config)
  is_chief = strategy_lib.is_chief(strategy)
  splits = load_splits(config)
  schedule = schedule_lib.LoopSchedule(
      num_examples=len(splits.train),
      global_batch_size=config.global_batch_size, num_epochs=config.epochs,
      steps_per_loop=config.steps_per_loop,
      log_every_steps=config.log_every_steps,
      checkpoint_every_steps=config.checkpoint_every_steps)

  # Identical initial weights in every process and for every replica count.
  keras.utils.set_random_seed(config.seed)
  with strategy.scope():
    with errors.phase("building the model"):
      with precision.policy_scope(config.mixed_precision):
        model = model_fn(config)
      user_code.check_model_fits("model", config.model, model,
                                 splits.train.feature_shape)
      optimizer = _create_optimizer(config, schedule.total_steps)
      # Built now, so that a checkpoint restores into existing slot variables.
      optimizer.build(model.trainable_variables)
  trainer = steps.Trainer(
      strategy=strategy, model=model, optimizer=optimizer,
      add_loss_reduction=config.add_loss_reduction,
      clip_norm=config.clip_norm, jit_compile=config.jit_compile)
  with errors.phase("opening the checkpoints"):
    checkpoint = checkpoints.RunCheckpoint(
        checkpoints.checkpoint_dir(config.model_dir), model=model,
        optimizer=optimizer, max_to_keep=config.keep_checkpoints,
        is_chief=is_chief, on_corrupt=config.on_corrupt_checkpoint)
  summary_writers = summaries.SummaryWriters(config.model_dir, enabled=is_chief)
  agreement = preemption.PreemptionAgreement(
      strategy=strategy, num_workers=strategy_lib.num_workers(strategy),
      watcher=preemption.SigtermWatcher())
  controller = controller_lib.Controller(
      trainer=trainer, schedule=schedule,
      train_iterator_fn=_train_iterator_fn(splits, config),
      validation=_validation(splits, config), checkpoint=checkpoint,
      summary_writers=summary_writers, preemption_agreement=agreement,
      log=logging.info if is_chief else lambda *args: None,
      boundary_checks=boundary_checks)
  if is_chief:
    logging.info(
        "Training %d examples, validating %d, in global batches of %d (%d "
        "steps per epoch) on %d replica(s)", len(splits.train),
        len(splits.validation), config.global_batch_size,
        schedule.steps_per_epoch, strategy.num_replicas_in_sync)
  return _Run(strategy, controller, summary_writers, checkpoint, is_chief)


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
    config: config_lib.Config, *, model_fn: Optional[ModelFn] = None,
    strategy: Optional[tf.distribute.Strategy] = None,
    validate: Optional[bool] = None,
) -> RunResult:
  """Trains as the config says, resuming from model_dir, then exports.

  Args:
    config: the run configuration.
    model_fn: builds the Keras model (called under the strategy's scope); it
      must map [batch, 784] floats to [batch, 10] logits. Default:
      `models.mnist.create_model`, which follows `config.model`.
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
    run = _build(config, model_fn, strategy,
                 boundary_checks=(owner.check,) if owner else ())
    if validate:
      _require_validation(run, config, ": give --num_validation_examples > 0, "
                          "or --mode=train to train without validation")
    try:
      _describe_run(run, config)
      result = run.controller.train(validate=validate)
    finally:
      run.summary_writers.close()
    if run.is_chief:
      with errors.phase("exporting the model"):
        export.export_model(result.model, config.model_dir,
                            saved_model=config.export_saved_model)
  return result


def evaluate(config: config_lib.Config, *, model_fn: Optional[ModelFn] = None,
             strategy: Optional[tf.distribute.Strategy] = None) -> dict:
  """Evaluates the latest checkpoint on the validation split.

  Writes the metrics as JSON to <model_dir>/eval_results.json and returns
  them, with the checkpoint's path and global step.

  Raises:
    NoCheckpointError: model_dir holds no checkpoint.
  """
  run = _build(config, model_fn, strategy)
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
