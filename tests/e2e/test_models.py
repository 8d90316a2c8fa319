"""The built-in models train from the command line."""

import os

import pytest
import tensorflow as tf

from dist_train.outputs import summaries
from tests.helpers import processes


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
  """--model=cnn on 640 real digits, 2 replicas, 2 epochs of 20 steps."""
  model_dir = str(tmp_path_factory.mktemp("cnn") / "run")
  processes.run_cli(
      f"--model_dir={model_dir}", "--model=cnn", "--hidden_units=32",
      "--dataset=mnist_sample", "--num_train_examples=640",
      "--num_validation_examples=320", "--global_batch_size=32",
      "--epochs=2", "--optimizer=adam", "--learning_rate=0.003",
      "--log_every_steps=5", "--steps_per_loop=5", "--cpu_replicas=2",
      check=True)
  return model_dir


def test_cnn_is_the_convolutional_model(cnn_run):
  reader = tf.train.load_checkpoint(
      tf.train.latest_checkpoint(os.path.join(cnn_run, "checkpoints")))
  # The model's weights are saved as the optimizer's trainable variables.
  shapes = sorted(tuple(shape) for name, shape in
                  reader.get_variable_to_shape_map().items()
                  if name.startswith("optimizer/_trainable_variables/"))
  assert shapes == sorted([(3, 3, 1, 16), (16,), (3, 3, 16, 32), (32,),
                           (800, 32), (32,), (32, 10), (10,)]), shapes


def test_cnn_learns(cnn_run):
  train = summaries.read_scalars(os.path.join(cnn_run, "train"))
  validation = summaries.read_scalars(os.path.join(cnn_run, "validation"))
  losses = [value for _, value in train["loss"]]
  assert len(losses) == 8 and losses[-1] < 0.6 * losses[0], losses
  [(_, first), (step, last)] = validation["accuracy"]
  assert step == 40
  assert last > 0.5 and last > first, validation["accuracy"]  # Chance: 0.1.
