"""The Python API: build a run from a Config and train it.

    from dist_train import config, train
    result = train.train_and_evaluate(config.Config(model_dir="/tmp/run"))

The command line (`dist_train.main`) is a thin wrapper around this function.
"""

from typing import Callable, Optional

import keras
import tensorflow as tf

from dist_train import checkpoints
from dist_train import config as config_lib
from dist_train import controller as controller_lib
from dist_train import data
from dist_train import models
from dist_train import strategy as strategy_lib
from dist_train import summaries
from dist_train import trainer as trainer_lib

ModelFn = Callable[[config_lib.Config], keras.Model]


def create_optimizer(config: config_lib.Config) -> keras.optimizers.Optimizer:
  if config.optimizer == "sgd":
    return keras.optimizers.SGD(learning_rate=config.learning_rate)
  if config.optimizer == "adam":
    return keras.optimizers.Adam(learning_rate=config.learning_rate)
  raise ValueError(f"unknown optimizer {config.optimizer!r}")


def train_and_evaluate(
    config: config_lib.Config, *, model_fn: ModelFn = models.create_model,
    strategy: Optional[tf.distribute.Strategy] = None,
) -> controller_lib.RunResult:
  """Trains `model_fn(config)` as the config says, resuming from model_dir.

  Args:
    config: the run configuration.
    model_fn: builds the Keras model (called under the strategy's scope).
      It must return logits for sparse categorical cross-entropy.
    strategy: an existing strategy; by default one is built from `config`
      (which must then happen before any other TensorFlow op).

  Returns:
    The final metrics and position of the run.

  Raises:
    data.DataError: the data set cannot be loaded.
  """
  splits = data.load_splits(config)
  if strategy is None:
    strategy = strategy_lib.create_strategy(config)
  is_chief = strategy_lib.is_chief(strategy)

  # Identical initial weights in every process and for every replica count.
  keras.utils.set_random_seed(config.seed)
  with strategy.scope():
    model = model_fn(config)
    optimizer = create_optimizer(config)
    # Built now, so that a checkpoint restores into existing slot variables.
    optimizer.build(model.trainable_variables)
  trainer = trainer_lib.Trainer(
      strategy=strategy, model=model, optimizer=optimizer,
      add_loss_reduction=config.add_loss_reduction)
  checkpoint = checkpoints.RunCheckpoint(
      checkpoints.checkpoint_dir(config.model_dir), model=model,
      optimizer=optimizer, max_to_keep=config.keep_checkpoints)
  summary_writers = summaries.SummaryWriters(config.model_dir, enabled=is_chief)
  try:
    return controller_lib.Controller(
        config=config, strategy=strategy, trainer=trainer, splits=splits,
        checkpoint=checkpoint, summary_writers=summary_writers,
        is_chief=is_chief).run()
  finally:
    summary_writers.close()
