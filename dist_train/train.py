"""The Python API: train or evaluate the run a Config describes.

    from dist_train import config, train
    result = train.train_and_evaluate(config.Config(model_dir="/tmp/run"))

The command line (`dist_train.main`) calls `run`, which dispatches on
`config.mode` to the same functions. The run is built by `builder.py`
(where the Config is unpacked: every layer below takes the values it uses),
evaluated by `evaluation.py`, and its task loaded by `tasks/loading.py`;
their public names are importable from here.
"""

import contextlib
import dataclasses
import json
import os
from typing import Optional, Sequence

from absl import logging
import keras
import tensorflow as tf

from dist_train import builder
from dist_train import config as config_lib
from dist_train import errors
from dist_train import evaluation
from dist_train.data import datasets
from dist_train.distribute import cluster
from dist_train.distribute import strategy as strategy_lib
from dist_train.loop import controller as controller_lib
from dist_train.loop import ema as ema_lib
from dist_train.loop import hooks
from dist_train.loop import stop
from dist_train.outputs import export
from dist_train.outputs import model_dir as model_dir_lib
from dist_train.outputs import ownership
from dist_train.outputs import run_record
from dist_train.outputs import warm_start
from dist_train.tasks import loading as task_loading

ModelFn = task_loading.ModelFn
RunResult = controller_lib.RunResult
TRAINING_DONE = evaluation.TRAINING_DONE

create_strategy = builder.create_strategy
create_task = task_loading.create_task
load_splits = task_loading.load_splits
evaluate = evaluation.evaluate
continuous_evaluate = evaluation.continuous_evaluate
NoCheckpointError = evaluation.NoCheckpointError


def _warm_start(config, run: builder.TrainingRun) -> None:
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


def _check_resume(config) -> None:
  """Checks a resume against the earlier run.cfg (every worker, so that all
  refuse together)."""
  earlier = run_record.read_config(config.model_dir)
  # Only a checkpoint holds the mathematics of the earlier start.
  if earlier is not None and tf.io.gfile.exists(
      model_dir_lib.checkpoint_state_file(config.model_dir)):
    for change in run_record.check_resume(config, earlier):
      logging.info("Resuming with a changed option %s", change)


def _run_record_hook(config, strategy) -> hooks.AtTrainBegin:
  """Writes run.cfg and run.json (the chief) once the run restored and is
  about to train."""
  def write():
    if not strategy_lib.is_chief(strategy):
      return
    with errors.phase("writing the run record"):
      run_record.write(
          config, num_replicas=strategy.num_replicas_in_sync,
          num_workers=strategy_lib.num_workers(strategy),
          devices=strategy.extended.worker_devices)
  return hooks.AtTrainBegin(write)


def _describe_run(run: builder.TrainingRun, config: config_lib.Config) -> None:
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
    _check_resume(config)
    task, description = task_loading.load_task(config, task=task,
                                               model_fn=model_fn)
    run = builder.build_training(
        config, task, description, strategy,
        boundary_checks=(owner.check,) if owner else (),
        callbacks=(_run_record_hook(config, strategy), *callbacks))
    _warm_start(config, run)
    if run.is_chief and tf.io.gfile.exists(
        os.path.join(config.model_dir, evaluation.TRAINING_DONE)):
      # Training (again, e.g. with more epochs): an evaluator beside it
      # waits for the new final checkpoint.
      tf.io.gfile.remove(os.path.join(config.model_dir,
                                      evaluation.TRAINING_DONE))
    if config.lr_schedule == "plateau" and not (
        validate and run.controller.has_validation):
      raise datasets.DataError(
          "--lr_schedule=plateau cuts the rate after validation passes, but "
          f"this run has none (the validation split of --dataset="
          f"{config.dataset} is empty, or validation is off): give "
          "validation data, or another --lr_schedule")
    if validate:
      builder.require_validation(
          run.controller.has_validation, config,
          ": give --num_validation_examples > 0, or --mode=train to train "
          "without validation")
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
      with errors.phase("exporting the model"), ema_lib.evaluation_weights(
          run.controller.eval_average):
        export.export_model(result.model, config.model_dir,
                            saved_model=config.export_saved_model)
        model_dir_lib.write_json(
            model_dir_lib.training_done_file(config.model_dir),
            {"global_step": result.global_step,
             "stopped_early": result.stopped_early})
  return result


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
