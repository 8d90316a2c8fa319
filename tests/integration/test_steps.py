"""The compiled training loop: loops of any length share one trace."""

import keras
import numpy as np
import tensorflow as tf

from dist_train import config as config_lib
from dist_train.loop import steps
from dist_train.tasks import classification
from dist_train.models import mnist
from tests.helpers import global_batches


def test_loops_of_different_lengths_share_one_trace():
  strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
  with strategy.scope():
    model = mnist.create_mlp(hidden_units=4)
    optimizer = keras.optimizers.SGD(learning_rate=0.01)
    optimizer.build(model.trainable_variables)
  trainer = steps.Trainer(strategy=strategy,
                          task=classification.ClassificationTask(
                              config_lib.Config(model_dir="/tmp/unused")),
                          model=model, optimizer=optimizer,
                          add_loss_reduction="mean",
                          train_input=global_batches.GlobalBatches(strategy))
  batch = (np.zeros([8, 784], np.float32), np.arange(8, dtype=np.int32))
  iterator = iter(tf.data.Dataset.from_tensors(batch).repeat())
  assert trainer.train_traces == 0
  for num_steps in (3, 1, 2):
    losses = trainer.train_steps(iterator, num_steps)
    assert trainer.train_traces == 1, num_steps
    assert np.isfinite(losses["loss"])
  assert int(optimizer.iterations.numpy()) == 3 + 1 + 2
