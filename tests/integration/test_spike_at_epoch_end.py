"""A loss spike in the last loop of an epoch, through the Python API in this
process: the rollback ends the epoch at once, and the epoch's save writes
the checkpoint rolled back to a third time, at the next epoch's start.

The spiking task of tests/helpers/spike_fixtures.py, its marked batch the
last of the epoch (step 12 of 12): with loops of 2 steps and a checkpoint
every 4, each epoch's spike is seen after its step 12 and rolled back to the
checkpoint of its step 8. The reference trains the data without batches
9-12 of each epoch; the recovered run must end with its weights.
"""

import os

import numpy as np
import pytest
import tensorflow as tf

from dist_train import config as config_lib
from dist_train import train
from dist_train.outputs import model_dir as model_dir_lib
from tests.helpers import spike_fixtures

RUN = dict(global_batch_size=8, shuffle_buffer=1, steps_per_loop=2,
           log_every_steps=2, checkpoint_every_steps=4, optimizer="adam",
           learning_rate=0.01, seed=3, mode="train", epochs=2)


@pytest.fixture(scope="module")
def strategy():
  return train.create_strategy(config_lib.Config(model_dir="/tmp/unused"))


def _position(model_dir, step):
  reader = tf.train.load_checkpoint(
      os.path.join(model_dir, "checkpoints", f"ckpt-{step}"))
  return tuple(int(reader.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE"))
               for name in ("epoch", "step_in_epoch"))


def test_a_spike_at_the_end_of_an_epoch(tmp_path, strategy):
  recovered_dir = str(tmp_path / "recovered")
  config = config_lib.Config(model_dir=recovered_dir, loss_upper_bound=10.0,
                             recovery_max_trials=2, **RUN)
  recovered = train.train_and_evaluate(
      config, strategy=strategy, task=spike_fixtures.SpikingRegression(
          config, marked_step=12))
  reference_config = config_lib.Config(model_dir=str(tmp_path / "reference"),
                                       **RUN)
  reference = train.train_and_evaluate(
      reference_config, strategy=strategy,
      task=spike_fixtures.SpikingRegression(
          reference_config, marked_step=12, dropped_steps=(9, 10, 11, 12)))

  assert (recovered.global_step, recovered.epochs_completed) == (16, 2)
  assert reference.global_step == 16
  record = model_dir_lib.read_json(
      model_dir_lib.run_info_file(recovered_dir))
  assert [(r["spike_step"], r["rolled_back_to_step"], r["batches_skipped"],
           r["first_skipped"], r["last_skipped"])
          for r in record["recoveries"]] == [
              (12, 8, 4, [1, 9], [1, 12]), (20, 16, 4, [2, 9], [2, 12])]
  # Each epoch's end saved the step rolled back to, at the next epoch.
  assert _position(recovered_dir, 8) == (1, 0)
  assert _position(recovered_dir, 16) == (2, 0)
  differences = [float(np.max(np.abs(a - b))) for a, b in zip(
      recovered.model.get_weights(), reference.model.get_weights())]
  print(f"recovered vs reference: {max(differences):.2e}")
  assert max(differences) <= 1e-6
