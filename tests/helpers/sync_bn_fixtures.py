"""Tasks with BatchNormalization for tests/e2e/test_sync_batchnorm.py
(--task=tests.helpers.sync_bn_fixtures:<name>).

Each trains NUM_TRAIN examples in global batches of GLOBAL_BATCH_SIZE: 65,
65 and a partial batch of 2. 65 rows make uneven shares on 2 replicas (33,
32) and on 3 (22, 22, 21); the batch of 2 leaves 1 of 3 replicas empty.
Read in order (--shuffle_buffer=1).
"""

import keras
import numpy as np

from dist_train import tasks
from dist_train.data import datasets

NUM_TRAIN = 132
GLOBAL_BATCH_SIZE = 65
NUM_FEATURES = 6
VOCAB = 7  # Token 0 pads (a Keras mask); sequences use 1 .. VOCAB - 1.
MAX_LEN = 6
MOMENTUM = 0.5  # The moving statistics move visibly in 6 steps.


class _BatchNormTask(tasks.Task):

  def __init__(self, config):
    self._config = config

  def loss(self, labels, outputs):
    return keras.losses.sparse_categorical_crossentropy(labels, outputs,
                                                        from_logits=True)

  def examples(self, split):
    """(features, labels) of `split` as arrays: what the reference reads."""
    rng = np.random.default_rng(self._config.seed + (split == "validation"))
    return self._examples(rng, NUM_TRAIN if split == "train" else 20)

  def build_dataset(self, split):
    return datasets.InMemory(self.examples(split), name=split)


class DenseBatchNorm(_BatchNormTask):
  """Dense -> BatchNormalization -> tanh -> Dense, 3 classes."""

  def build_model(self):
    inputs = keras.Input(shape=(NUM_FEATURES,))
    x = keras.layers.Dense(8)(inputs)
    x = keras.layers.BatchNormalization(momentum=MOMENTUM)(x)
    x = keras.layers.Activation("tanh")(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))

  def _examples(self, rng, size):
    features = (rng.normal(size=(size, NUM_FEATURES)) + 2).astype(
        np.float32)
    labels = ((features[:, 0] > 2).astype(np.int32) +
              (features[:, 1] > 2.5).astype(np.int32))
    return features, labels


class MaskedBatchNorm(_BatchNormTask):
  """Embedding(mask_zero) -> BatchNormalization (its moments skip the
  padding) -> masked average -> Dense, on token sequences of 1 to MAX_LEN
  tokens padded with 0."""

  def build_model(self):
    tokens = keras.Input(shape=(MAX_LEN,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, 4, mask_zero=True)(tokens)
    x = keras.layers.BatchNormalization(momentum=MOMENTUM)(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(tokens, keras.layers.Dense(3)(x))

  def _examples(self, rng, size):
    lengths = rng.integers(1, MAX_LEN + 1, size=size)
    tokens = rng.integers(1, VOCAB, size=(size, MAX_LEN)).astype(np.int32)
    tokens[np.arange(MAX_LEN)[None, :] >= lengths[:, None]] = 0
    labels = (tokens[:, 0] % 3).astype(np.int32)
    return tokens, labels


class NoBatchNorm(DenseBatchNorm):
  """DenseBatchNorm without its BatchNormalization layer."""

  def build_model(self):
    inputs = keras.Input(shape=(NUM_FEATURES,))
    x = keras.layers.Dense(8, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


dense_bn = DenseBatchNorm
masked_bn = MaskedBatchNorm
no_bn = NoBatchNorm
