"""Tasks used by the tests (--task=tests.task_fixtures:...): a masked
variable-length sequence task, a weighted two-output task, and a task with
its own train_step. Small and synthetic, so that runs take seconds."""

import keras
import numpy as np
import tensorflow as tf

from dist_train import tasks

VOCAB = 11
MAX_LEN = 9


class MaskedSequences(tasks.Task):
  """Next-token prediction on variable-length sequences, padding masked by
  per-token sample weights, so token counts differ between shares."""

  loss_name = "token_cross_entropy"

  def __init__(self, config, num_train=203, num_validation=41):
    self._config = config
    self._sizes = {"train": num_train, "validation": num_validation}

  def build_model(self):
    tokens = keras.Input(shape=(None,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, 8)(tokens)
    x = keras.layers.Dense(16, activation="tanh")(x)
    return keras.Model(tokens, keras.layers.Dense(VOCAB)(x))

  def build_dataset(self, split):
    rng = np.random.default_rng(self._config.seed + (split == "validation"))
    sequences = []
    for _ in range(self._sizes[split]):
      length = int(rng.integers(2, MAX_LEN + 1))
      start = int(rng.integers(0, VOCAB))
      # Mostly counting up, so that there is something to learn.
      sequences.append([(start + i + int(rng.random() < 0.2)) % VOCAB
                        for i in range(length)])

    def examples():
      for sequence in sequences:
        tokens = np.array(sequence, np.int32)
        yield tokens[:-1], tokens[1:], np.ones(len(tokens) - 1, np.float32)

    spec = tf.TensorSpec([None], tf.int32)
    return tf.data.Dataset.from_generator(
        examples, output_signature=(spec, spec,
                                    tf.TensorSpec([None], tf.float32)))

  def loss(self, labels, outputs):
    return keras.losses.sparse_categorical_crossentropy(labels, outputs,
                                                        from_logits=True)

  def metrics(self):
    return [keras.metrics.SparseCategoricalAccuracy(name="token_accuracy")]


class TwoHeads(tasks.Task):
  """A class and a value from one input; two losses with loss weights and
  per-example weights (some zero) on the class head."""

  loss_weights = {"label": 1.0, "value": 0.5}

  def __init__(self, config):
    self._config = config

  def build_model(self):
    inputs = keras.Input(shape=(6,))
    hidden = keras.layers.Dense(12, activation="relu")(inputs)
    return keras.Model(inputs, {
        "label": keras.layers.Dense(3, name="label")(hidden),
        "value": keras.layers.Dense(1, name="value")(hidden)})

  def build_dataset(self, split):
    rng = np.random.default_rng(self._config.seed + (split == "validation"))
    size = 157 if split == "train" else 40
    features = rng.normal(size=(size, 6)).astype(np.float32)
    labels = {"label": (features[:, 0] > 0).astype(np.int32) +
                       (features[:, 1] > 1).astype(np.int32),
              "value": features[:, 2:3] * 2.0 + 0.5}
    weights = {"label": rng.choice([0.0, 0.5, 2.0], size=size).astype(
        np.float32), "value": np.ones(size, np.float32)}
    return tf.data.Dataset.from_tensor_slices((features, labels, weights))

  @property
  def loss(self):
    return {
        "label": lambda y, p: keras.losses.sparse_categorical_crossentropy(
            y, p, from_logits=True),
        "value": lambda y, p: keras.losses.mean_squared_error(y, p)}

  def metrics(self):
    return {"label": [keras.metrics.SparseCategoricalAccuracy(name="acc")],
            "value": [keras.metrics.MeanAbsoluteError(name="mae")]}


class OwnStep(MaskedSequences):
  """The masked sequence task with a hand-written step: the same objective
  through StepContext, plus an L2 penalty on the logits' mean."""

  loss_terms = ("penalty",)

  def train_step(self, batch, ctx):
    tokens, targets, weights = batch
    with tf.GradientTape() as tape:
      outputs, add_losses = ctx.call(self.model, tokens)
      per_token = keras.losses.sparse_categorical_crossentropy(
          targets, outputs, from_logits=True)
      penalty = 0.01 * ctx.global_mean(tf.reduce_mean(outputs ** 2, -1),
                                       weights)
      loss = (ctx.global_mean(per_token, weights) + penalty +
              ctx.regularization() + ctx.add_loss_share(add_losses))
    ctx.apply_gradients(tape, loss)
    ctx.update_metrics(targets, outputs, weights)
    return {"loss": loss, "penalty": penalty}


def masked_sequences(config):
  return MaskedSequences(config)


def two_heads(config):
  return TwoHeads(config)


def own_step(config):
  return OwnStep(config)
