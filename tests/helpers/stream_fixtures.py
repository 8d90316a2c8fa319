"""Tasks of tests/e2e/test_step_budgets.py: endless streams (repeat()ed, one
stream for every worker or a shard each) and an in-memory data set, small
enough that runs take seconds.

With STREAM_FIXTURE_SLEEP_S=T in the environment, the training streams wait
T seconds before each example after the first SLOW_AFTER (the examples are
the same): a run lasts long enough to be stopped mid-way.
"""

import os

import keras
import numpy as np

from dist_train import tasks
from dist_train.data import datasets
from tests.helpers import task_fixtures

NUM_TRAIN = 47  # Not a multiple of any global batch: batches cross passes.
NUM_VALIDATION = 29
SLOW_AFTER = 1024 + 40  # The default shuffle buffer, and 4 steps of 10.


class RepeatedSequences(task_fixtures.MaskedSequences):
  """The masked sequence task, both splits endless (repeat()): training
  needs --train_steps and validation --validation_steps."""

  def __init__(self, config):
    super().__init__(config, num_train=NUM_TRAIN,
                     num_validation=NUM_VALIDATION)

  def build_dataset(self, split):
    return _slowed(super().build_dataset(split).repeat(), split)


class ShardedSequences(RepeatedSequences):
  """As RepeatedSequences, each worker reading its own shard (every
  num_workers-th example) of the one-pass data, repeated."""

  def build_dataset(self, split, input_context=None):
    dataset = task_fixtures.MaskedSequences.build_dataset(self, split)
    if input_context is not None:
      dataset = dataset.shard(input_context.num_input_pipelines,
                              input_context.input_pipeline_id)
    return _slowed(dataset.repeat(), split)


class InMemoryBlobs(tasks.Task):
  """Three classes of 6 features, NUM_TRAIN examples in memory (random
  access)."""

  def __init__(self, config):
    self._config = config

  def build_model(self):
    inputs = keras.Input(shape=(6,))
    hidden = keras.layers.Dense(8, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3)(hidden))

  def build_dataset(self, split):
    rng = np.random.default_rng(self._config.seed + (split == "validation"))
    size = NUM_TRAIN if split == "train" else NUM_VALIDATION
    labels = rng.integers(0, 3, size).astype(np.int32)
    features = (rng.normal(size=(size, 6)) + labels[:, None]).astype(
        np.float32)
    return datasets.InMemory((features, labels), f"blobs ({split})")

  def loss(self, labels, outputs):
    return keras.losses.sparse_categorical_crossentropy(labels, outputs,
                                                        from_logits=True)


def _slowed(dataset, split):
  """`dataset`, each training example after the first SLOW_AFTER (which
  fill the shuffle buffer and a few steps) STREAM_FIXTURE_SLEEP_S seconds
  late; the examples are the same."""
  seconds = float(os.environ.get("STREAM_FIXTURE_SLEEP_S", 0))
  if not seconds or split != "train":
    return dataset
  # pylint: disable-next=import-outside-toplevel
  from tensorflow.python.data.experimental.ops import testing
  return dataset.take(SLOW_AFTER).concatenate(
      dataset.skip(SLOW_AFTER).apply(testing.sleep(int(seconds * 1e6))))
