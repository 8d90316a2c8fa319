"""The Python API: build a run from a Config, then train or evaluate it.

    from dist_train import config, train
    result = train.train_and_evaluate(config.Config(model_dir="/tmp/run"))

The command line (`dist_train.main`) calls `run`, which dispatches on
`config.mode` to the same functions.
"""

import dataclasses
import json
import os
from typing import Callable, Optional

from absl import logging
import keras
import tensorflow as tf

from dist_train import checkpoints
from dist_train import config as config_lib
from dist_train import controller as controller_lib
from dist_train import data
from dist_train import export
from dist_train import models
from dist_train import optimizers
from dist_train import plugins
from dist_train import precision
from dist_train import strategy as strategy_lib
from dist_train import summaries
from dist_train import trainer as trainer_lib

ModelFn = Callable[[config_lib.Config], keras.Model]


class NoCheckpointError(RuntimeError):
  """Evaluation was asked for, but model_dir holds no checkpoint."""


@dataclasses.dataclass(frozen=True)
class _Run:
  strategy: tf.distribute.Strategy
  controller: controller_lib.Controller
  summary_writers: summaries.SummaryWriters
  checkpoint: checkpoints.RunCheckpoint
  is_chief: bool


def _build(config, model_fn, strategy) -> _Run:
  """Builds the strategy (first: before any other TensorFlow op, which a user
  dataset_fn may run), then data, model, optimizer and loop objects."""
  model_fn = model_fn or models.create_model
  if strategy is None:
    strategy = strategy_lib.create_strategy(config)
  splits = data.load_splits(config)
  is_chief = strategy_lib.is_chief(strategy)
  total_steps = config.epochs * data.num_batches(len(splits.train),
                                                 config.global_batch_size)

  # Identical initial weights in every process and for every replica count.
  keras.utils.set_random_seed(config.seed)
  with strategy.scope():
    with precision.policy_scope(config.mixed_precision):
      model = model_fn(config)
    plugins.check_model_fits("model", config.model, model,
                             splits.train.feature_shape)
    optimizer = precision.wrap_optimizer(
        optimizers.create_optimizer(config, total_steps),
        config.mixed_precision)
    # Built now, so that a checkpoint restores into existing slot variables.
    optimizer.build(model.trainable_variables)
  trainer = trainer_lib.Trainer(
      strategy=strategy, model=model, optimizer=optimizer,
      add_loss_reduction=config.add_loss_reduction,
      clip_norm=config.clip_norm, jit_compile=config.jit_compile)
  checkpoint = checkpoints.RunCheckpoint(
      checkpoints.checkpoint_dir(config.model_dir), model=model,
      optimizer=optimizer, max_to_keep=config.keep_checkpoints,
      is_chief=is_chief, on_corrupt=config.on_corrupt_checkpoint)
  summary_writers = summaries.SummaryWriters(config.model_dir, enabled=is_chief)
  controller = controller_lib.Controller(
      config=config, strategy=strategy, trainer=trainer, splits=splits,
      checkpoint=checkpoint, summary_writers=summary_writers,
      is_chief=is_chief)
  return _Run(strategy, controller, summary_writers, checkpoint, is_chief)


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
    config: config_lib.Config, *, model_fn: Optional[ModelFn] = None,
    strategy: Optional[tf.distribute.Strategy] = None,
    validate: Optional[bool] = None,
) -> controller_lib.RunResult:
  """Trains as the config says, resuming from model_dir, then exports.

  Args:
    config: the run configuration.
    model_fn: builds the Keras model (called under the strategy's scope); it
      must map [batch, 784] floats to [batch, 10] logits. Default:
      `models.create_model`, which follows `config.model`.
    strategy: an existing strategy; by default one is built from `config`
      (which must then happen before any other TensorFlow op).
    validate: run the validation pass after each epoch; default: unless
      `config.mode` is "train".

  Returns:
    The trained model, its final metrics and position.

  Raises:
    data.DataError: the data set cannot be loaded.
    plugins.PluginError: a user model_fn is unusable.
  """
  if validate is None:
    validate = config.mode != "train"
  run = _build(config, model_fn, strategy)
  if validate and not run.controller.num_validation_examples:
    raise data.DataError(
        f"the validation split of --dataset={config.dataset} is empty: give "
        "--num_validation_examples > 0, or --mode=train to train without "
        "validation")
  try:
    _describe_run(run, config)
    result = run.controller.run(validate=validate)
  finally:
    run.summary_writers.close()
  if run.is_chief:
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
    if not run.checkpoint.restore_latest_model():
      raise NoCheckpointError(
          f"no checkpoint to evaluate in {run.checkpoint.directory}")
    if not run.controller.num_validation_examples:
      raise data.DataError(
          f"the validation split of --dataset={config.dataset} is empty")
    metrics = run.controller.evaluate()
  finally:
    run.summary_writers.close()
  results = {"checkpoint": run.checkpoint.latest,
             "global_step": checkpoints.step_of(run.checkpoint.latest),
             **metrics}
  if run.is_chief:
    path = os.path.join(config.model_dir, "eval_results.json")
    with tf.io.gfile.GFile(path + ".tmp", "w") as f:
      json.dump(results, f, indent=2)
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
    logging.info("Wrote %s", path)
  return results


def run(config: config_lib.Config):
  """Runs `config.mode`; what the command line calls."""
  if config.mode == "evaluate":
    results = evaluate(config)
    print(json.dumps(results))
    return results
  return train_and_evaluate(config)
