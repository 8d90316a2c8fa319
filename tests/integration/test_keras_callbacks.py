"""Stock Keras callbacks that use `model.optimizer`, through the Python API
in this process: each trains exactly as the dist_train option that does the
same thing (ReduceLROnPlateau as --lr_schedule=plateau,
LearningRateScheduler as --lr_schedule=step), and SwapEMAWeights evaluates
the weight average of --ema_decay as --eval_with_ema does."""

import keras
import numpy as np
import pytest

from dist_train import config as config_lib
from dist_train import train

# 256 synthetic examples in global batches of 32: 8 steps an epoch, 4
# epochs; a validation pass at each epoch's end.
RUN = dict(dataset="synthetic", num_train_examples=256,
           num_validation_examples=64, global_batch_size=32, hidden_units=8,
           steps_per_loop=4, log_every_steps=4, learning_rate=0.05,
           epochs=4, optimizer="momentum")


@pytest.fixture(scope="module")
def strategy():
  return train.create_strategy(config_lib.Config(model_dir="/tmp/unused"))


class _Rates(keras.callbacks.Callback):
  """model.optimizer.learning_rate at each epoch's start."""

  def __init__(self):
    super().__init__()
    self.rates = []

  def on_epoch_begin(self, epoch, logs=None):
    self.rates.append(float(self.model.optimizer.learning_rate))


def _train(strategy, model_dir, callbacks=(), **options):
  rates = _Rates()
  result = train.train_and_evaluate(
      config_lib.Config(model_dir=str(model_dir), **{**RUN, **options}),
      strategy=strategy, callbacks=[*callbacks, rates])
  return result, rates.rates


def _weights(result):
  return [v.numpy() for v in result.model.trainable_variables]


def _difference(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def test_reduce_lr_on_plateau_trains_as_the_plateau_schedule(tmp_path,
                                                             strategy):
  # max mode on the loss: every falling validation loss is "no improvement".
  stock, stock_rates = _train(strategy, tmp_path / "stock", [
      keras.callbacks.ReduceLROnPlateau(monitor="val_loss", mode="max",
                                        factor=0.5, patience=1,
                                        min_delta=0.0, min_lr=0.01)])
  own, own_rates = _train(strategy, tmp_path / "own",
                          lr_schedule="plateau", best_metric="loss",
                          best_mode="max", lr_plateau_patience=1,
                          lr_plateau_factor=0.5, lr_min=0.01)
  print(f"rates per epoch: {stock_rates} (stock), {own_rates} (plateau)")
  assert stock_rates == pytest.approx(own_rates, rel=1e-6)
  assert len(set(np.round(stock_rates, 6))) >= 2  # It did cut.
  assert _difference(_weights(stock), _weights(own)) <= 1e-6


def test_learning_rate_scheduler_trains_as_the_step_schedule(tmp_path,
                                                             strategy):
  stock, stock_rates = _train(strategy, tmp_path / "stock", [
      keras.callbacks.LearningRateScheduler(
          lambda epoch, rate: 0.05 * 0.5 ** epoch)])
  own, own_rates = _train(strategy, tmp_path / "own", lr_schedule="step",
                          lr_boundaries=(8, 16, 24), lr_decay_factor=0.5)
  assert stock_rates == pytest.approx([0.05, 0.025, 0.0125, 0.00625],
                                      rel=1e-6)
  assert own_rates == pytest.approx(stock_rates, rel=1e-6)
  assert _difference(_weights(stock), _weights(own)) <= 1e-6


def test_swap_ema_weights_evaluates_the_average(tmp_path, strategy):
  ema = dict(ema_decay=0.8, ema_warmup_steps=3)
  stock, _ = _train(strategy, tmp_path / "stock",
                    [keras.callbacks.SwapEMAWeights()], eval_with_ema=False,
                    **ema)
  own, _ = _train(strategy, tmp_path / "own", **ema)
  raw, _ = _train(strategy, tmp_path / "raw", eval_with_ema=False, **ema)
  for epoch in range(RUN["epochs"]):
    swapped = stock.history[epoch]["validation"]["loss"]
    averaged = own.history[epoch]["validation"]["loss"]
    assert swapped == pytest.approx(averaged, abs=1e-5), epoch
  assert abs(stock.validation_metrics["loss"] -
             raw.validation_metrics["loss"]) > 1e-4
  # Swapped back after each evaluation: training went on with its own
  # weights (the swap adds and subtracts, so to float32 rounding).
  assert _difference(_weights(stock), _weights(own)) <= 1e-5
