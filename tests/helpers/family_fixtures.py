"""One small task per model family, for tests/test_model_families.py
(--task=tests.helpers.family_fixtures:<name>).

Every task trains NUM_TRAIN examples and validates NUM_VALIDATION in global
batches of GLOBAL_BATCH_SIZE: 15 examples in batches of 7 are 7, 7 and 1,
and 8 are 7 and 1. The batch of 1 leaves every replica but one and every
micro-batch but one empty, and shares of 2 or 3 rows cut into 4 micro-batches
leave some empty in full batches too. Read in order (--shuffle_buffer=1).
"""

import keras
import numpy as np
import tensorflow as tf

from dist_train import tasks
from dist_train.models import mnist
from tests.helpers import task_fixtures

NUM_TRAIN = 15
NUM_VALIDATION = 8
GLOBAL_BATCH_SIZE = 7
VOCAB = 9  # Token 0 pads; sequences use 1 .. VOCAB - 1.
MAX_LEN = 7
L2 = 0.01  # On every kernel of the tasks whose REGULARIZED is True.


def _cross_entropy(labels, logits):
  return keras.losses.sparse_categorical_crossentropy(labels, logits,
                                                      from_logits=True)


class _Family(tasks.Task):
  REGULARIZED = False

  def __init__(self, config):
    self._config = config

  def _rng(self, split):
    return np.random.default_rng(self._config.seed + (split == "validation"))

  @staticmethod
  def _size(split):
    return NUM_TRAIN if split == "train" else NUM_VALIDATION

  def _l2(self):
    return keras.regularizers.L2(L2) if self.REGULARIZED else None

  def loss(self, labels, outputs):
    return _cross_entropy(labels, outputs)


class DenseMLP(_Family):
  """An MLP on 6 features, 3 classes, L2 on its kernels."""

  REGULARIZED = True

  def build_model(self):
    inputs = keras.Input(shape=(6,))
    x = keras.layers.Dense(16, activation="tanh",
                           kernel_regularizer=self._l2())(inputs)
    return keras.Model(inputs, keras.layers.Dense(
        3, kernel_regularizer=self._l2())(x))

  def build_dataset(self, split):
    rng = self._rng(split)
    features = rng.normal(size=(self._size(split), 6)).astype(np.float32)
    labels = ((features[:, 0] > 0).astype(np.int32) +
              (features[:, 1] > 0.5).astype(np.int32))
    return tf.data.Dataset.from_tensor_slices((features, labels))


class Conv2DPooling(_Family):
  """The built-in --model=cnn (Conv2D, max pooling, Dense), L2 on its
  kernels, on random 28x28 images."""

  REGULARIZED = True

  def build_model(self):
    return mnist.create_cnn(hidden_units=16, kernel_l2=L2)

  def build_dataset(self, split):
    rng = self._rng(split)
    size = self._size(split)
    images = rng.uniform(size=(size, 784)).astype(np.float32)
    labels = rng.integers(0, 10, size=size).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices((images, labels))


class _Sequences(_Family):
  """Next-token prediction on sequences of 2 to MAX_LEN - 1 targets, padded
  per global batch; per-token sample weights mask the padding."""

  def build_dataset(self, split):
    rng = self._rng(split)
    sequences = []
    for _ in range(self._size(split)):
      length = int(rng.integers(3, MAX_LEN + 1))
      start = int(rng.integers(0, VOCAB - 1))
      sequences.append([1 + (start + i + int(rng.random() < 0.2)) %
                        (VOCAB - 1) for i in range(length)])

    return task_fixtures.sequence_dataset(sequences)


class CausalConv1D(_Sequences):
  """Embedding -> causal Conv1D -> Dense."""

  def build_model(self):
    tokens = keras.Input(shape=(None,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, 8)(tokens)
    x = keras.layers.Conv1D(16, 3, padding="causal", activation="tanh",
                            kernel_regularizer=self._l2())(x)
    return keras.Model(tokens, keras.layers.Dense(
        VOCAB, kernel_regularizer=self._l2())(x))


class MaskedGRU(_Sequences):
  """Embedding (mask_zero: the padding is masked) -> GRU -> Dense."""

  def build_model(self):
    tokens = keras.Input(shape=(None,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, 8, mask_zero=True)(tokens)
    x = keras.layers.GRU(12, return_sequences=True)(x)
    return keras.Model(tokens, keras.layers.Dense(VOCAB)(x))


class SelfAttention(_Sequences):
  """Embedding -> self-attention with a padding mask, residual,
  LayerNormalization -> Dense."""

  def build_model(self):
    tokens = keras.Input(shape=(None,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, 8)(tokens)
    real = keras.ops.not_equal(tokens, 0)
    # [batch, query, key]: no query attends to a padding key.
    attention_mask = keras.ops.logical_and(
        keras.ops.expand_dims(keras.ops.ones_like(real), 2),
        keras.ops.expand_dims(real, 1))
    attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(
        x, x, attention_mask=attention_mask)
    x = keras.layers.LayerNormalization()(x + attended)
    return keras.Model(tokens, keras.layers.Dense(VOCAB)(x))


class TwoOutputs(task_fixtures.TwoHeads):
  """Two outputs, a dict of losses with loss weights, per-output sample
  weights (some zero)."""

  def build_dataset(self, split):
    return super().build_dataset(split).take(
        NUM_TRAIN if split == "train" else NUM_VALIDATION)


class OwnStepConv1D(CausalConv1D):
  """The causal Conv1D task with its own train_step: the token cross
  entropy, an L2 penalty on the logits and the kernels' L2 regularization,
  through StepContext."""

  REGULARIZED = True
  loss_terms = ("penalty",)
  PENALTY = 0.01

  def train_step(self, batch, ctx):
    tokens, targets, weights = batch
    with tf.GradientTape() as tape:
      outputs, add_losses = ctx.call(ctx.model, tokens)
      penalty = self.PENALTY * ctx.global_mean(
          tf.reduce_mean(outputs ** 2, -1), weights)
      loss = (ctx.global_mean(_cross_entropy(targets, outputs), weights) +
              penalty + ctx.regularization() + ctx.add_loss_share(add_losses))
    ctx.apply_gradients(tape, loss)
    ctx.update_metrics(targets, outputs, weights)
    return {"loss": loss, "penalty": penalty}


class FailsOnSmallShares(DenseMLP):
  """The MLP behind a layer that mixes pairs of examples (a reshape that
  assumes an even number of rows): it fails on a share of odd size."""

  def build_model(self):
    inner = super().build_model()
    inputs = keras.Input(shape=(6,))
    pairs = keras.layers.Lambda(lambda x: tf.reshape(x, [-1, 12]),
                                name="pairs")(inputs)
    mixed = keras.layers.Dense(12, name="mix")(pairs)
    rows = keras.layers.Lambda(lambda x: tf.reshape(x, [-1, 6]),
                               name="rows")(mixed)
    return keras.Model(inputs, inner(rows))


dense_mlp = DenseMLP
conv2d_pooling = Conv2DPooling
causal_conv1d = CausalConv1D
masked_gru = MaskedGRU
self_attention = SelfAttention
two_outputs = TwoOutputs
own_step_conv1d = OwnStepConv1D
fails_on_small_shares = FailsOnSmallShares
