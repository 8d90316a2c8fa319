"""Tasks used by the tests (--task=tests.helpers.task_fixtures:...): a masked
variable-length sequence task, a weighted two-output task, a task with its
own train_step, a task with a global batch of zero weights, a task whose
validation accuracy peaks mid-run, and unusable tasks. Small and synthetic,
so that runs take seconds."""

import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

from dist_train import tasks

VOCAB = 11
MAX_LEN = 9



def sequence_dataset(sequences):
  """Next-token examples of token sequences: (tokens[:-1], tokens[1:], a
  weight of 1 per target token), unbatched and of varying length."""

  def examples():
    for sequence in sequences:
      tokens = np.array(sequence, np.int32)
      yield tokens[:-1], tokens[1:], np.ones(len(tokens) - 1, np.float32)

  spec = tf.TensorSpec([None], tf.int32)
  return tf.data.Dataset.from_generator(
      examples, output_signature=(spec, spec,
                                  tf.TensorSpec([None], tf.float32)))

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

    return sequence_dataset(sequences)

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
      outputs, add_losses = ctx.call(ctx.model, tokens)
      per_token = keras.losses.sparse_categorical_crossentropy(
          targets, outputs, from_logits=True)
      penalty = 0.01 * ctx.global_mean(tf.reduce_mean(outputs ** 2, -1),
                                       weights)
      loss = (ctx.global_mean(per_token, weights) + penalty +
              ctx.regularization() + ctx.add_loss_share(add_losses))
    ctx.apply_gradients(tape, loss)
    ctx.update_metrics(targets, outputs, weights)
    return {"loss": loss, "penalty": penalty}


class OwnOptimizer(TwoHeads):
  """The two-output task with its own optimizer: AdamW whose weight decay
  leaves the biases alone."""

  WEIGHT_DECAY = 0.2

  def build_optimizer(self, learning_rate):
    optimizer = keras.optimizers.AdamW(learning_rate=learning_rate,
                                       weight_decay=self.WEIGHT_DECAY)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    return optimizer


class NotAnOptimizer(TwoHeads):
  """build_optimizer returns the name of an optimizer."""

  def build_optimizer(self, learning_rate):
    return "adamw"


def masked_sequences(config):
  return MaskedSequences(config)


def own_optimizer(config):
  return OwnOptimizer(config)


def two_heads(config):
  return TwoHeads(config)


def own_step(config):
  return OwnStep(config)


class ZeroWeightBatch(tasks.Task):
  """Weighted regression whose last examples all have weight 0, with an L2
  kernel regularizer. Read in order (--shuffle_buffer=1) in global batches of
  15, the last global batch is those 8 examples: its data term is 0 (not
  NaN), so that step changes the weights by the regularization's gradient
  only."""

  L2 = 0.01
  NUM_EXAMPLES = 158
  FIRST_ZERO_WEIGHT = 150

  def __init__(self, config, num_train=NUM_EXAMPLES):
    self._config = config
    self._num_train = num_train

  def build_model(self):
    inputs = keras.Input(shape=(4,))
    hidden = keras.layers.Dense(
        8, activation="tanh", name="hidden",
        kernel_regularizer=keras.regularizers.L2(self.L2))(inputs)
    return keras.Model(inputs, keras.layers.Dense(1, name="value")(hidden))

  def build_dataset(self, split):
    rng = np.random.default_rng(self._config.seed + (split == "validation"))
    size = self.NUM_EXAMPLES if split == "train" else 20
    features = rng.normal(size=(size, 4)).astype(np.float32)
    targets = np.tanh(features[:, :2].sum(axis=1, keepdims=True))
    weights = rng.uniform(0.5, 2.0, size=size).astype(np.float32)
    weights[self.FIRST_ZERO_WEIGHT:] = 0.0
    if split == "train":
      features, targets, weights = (
          a[:self._num_train] for a in (features, targets, weights))
    return tf.data.Dataset.from_tensor_slices((features, targets, weights))

  def loss(self, labels, outputs):
    return keras.losses.mean_squared_error(labels, outputs)


def zero_weight_batch(config):
  return ZeroWeightBatch(config)


def zero_weight_batch_dropped(config):
  """The same examples without the zero-weight ones."""
  return ZeroWeightBatch(config, num_train=ZeroWeightBatch.FIRST_ZERO_WEIGHT)


class DriftingBoundary(tasks.Task):
  """A validation metric that peaks mid-run and then gets worse, by design.

  One input x in [-1, 1]; the training labels say x > -0.5, the validation
  labels x > 0.25. The model starts with its decision boundary at x = 1
  (fixed initial weights) and SGD moves it towards -0.5, through 0.25: the
  validation accuracy rises while the boundary approaches 0.25 and falls
  after it passed, so the best model is in the middle of the run, and the
  validation loss bottoms out at another step than the accuracy peaks.
  """

  def build_model(self):
    inputs = keras.Input(shape=(1,))
    # Logits (-x/2 + 1/2, x/2 - 1/2): class 1 exactly where x > 1.
    outputs = keras.layers.Dense(
        2, kernel_initializer=keras.initializers.Constant([[-0.5, 0.5]]),
        bias_initializer=keras.initializers.Constant([0.5, -0.5]))(inputs)
    return keras.Model(inputs, outputs)

  def build_dataset(self, split):
    if split == "train":
      x = np.linspace(-1, 1, 200, dtype=np.float32)
      labels = x > -0.5
    else:
      x = np.linspace(-0.99, 0.99, 100, dtype=np.float32)
      labels = x > 0.25
    return tf.data.Dataset.from_tensor_slices(
        (x[:, None], labels.astype(np.int32)))

  def loss(self, labels, outputs):
    return keras.losses.sparse_categorical_crossentropy(labels, outputs,
                                                        from_logits=True)

  def metrics(self):
    return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]


# Unusable tasks (--task=tests.helpers.task_fixtures:<class>: a class taking the
# config is a task_fn); each must stop the run with one line saying why.


class NoBuildModel:
  """A task object without build_model."""

  def __init__(self, config):
    self._sequences = MaskedSequences(config)

  def build_dataset(self, split):
    return self._sequences.build_dataset(split)

  def loss(self, labels, outputs):
    return self._sequences.loss(labels, outputs)


class NoLoss(tasks.Task):
  """A Task with a model and data but neither loss nor train_step."""

  def __init__(self, config):
    self._sequences = MaskedSequences(config)

  def build_model(self):
    return self._sequences.build_model()

  def build_dataset(self, split):
    return self._sequences.build_dataset(split)


class BatchedData(MaskedSequences):
  """Returns batches instead of examples."""

  def build_dataset(self, split):
    return super().build_dataset(split).padded_batch(4)


class InfiniteData(MaskedSequences):
  """Returns a dataset that never ends."""

  def build_dataset(self, split):
    return super().build_dataset(split).repeat()


class LossOverTime(MaskedSequences):
  """Averages the loss over time steps ([batch]) though the sample weights
  are per token ([batch, time])."""

  def loss(self, labels, outputs):
    return tf.reduce_mean(super().loss(labels, outputs), axis=-1)


class ReducedLoss(MaskedSequences):
  """Returns the batch's mean loss, a scalar."""

  def loss(self, labels, outputs):
    return tf.reduce_mean(super().loss(labels, outputs))


class StalledWorker(MaskedSequences):
  """The masked sequence task whose worker 1 (of TF_CONFIG) stops for
  `STALL_S` seconds in its 12th step, before the step's all-reduce: alive
  (its heartbeats go on), but its peers wait in the collective."""

  STALL_S = 180
  STALL_AT_CALL = 12

  def __init__(self, config):
    super().__init__(config)
    task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {})
    self._stalls = task.get("index") == 1
    self._calls = 0

  def _count_and_stall(self):
    self._calls += 1
    if self._stalls and self._calls == self.STALL_AT_CALL:
      time.sleep(self.STALL_S)
    return np.int32(self._calls)

  def validate_batch(self, batch):
    calls = tf.numpy_function(self._count_and_stall, [], tf.int32,
                              stateful=True)
    with tf.control_dependencies([calls]):
      return tf.nest.map_structure(tf.identity, batch)


def stalled_worker(config):
  return StalledWorker(config)


# Unusable tasks: --task, and what the one error line must say.
BAD_TASKS = {
    "no_build_model": ("tests.helpers.task_fixtures:NoBuildModel",
                       "has no build_model"),
    "no_loss": ("tests.helpers.task_fixtures:NoLoss",
                "does not implement loss()"),
    "batched_data": ("tests.helpers.task_fixtures:BatchedData",
                     "(train) is batched: return unbatched examples"),
    "infinite_data": ("tests.helpers.task_fixtures:InfiniteData",
                      "(train) is infinite"),
    "loss_over_time": ("tests.helpers.task_fixtures:LossOverTime",
                       "loss returned shape (2,), but sample_weight has "
                       "shape (2, "),
    "reduced_loss": ("tests.helpers.task_fixtures:ReducedLoss",
                     "loss must return the loss of each element, unreduced"),
    "not_an_optimizer": ("tests.helpers.task_fixtures:NotAnOptimizer",
                         "build_optimizer() (at "),
    "not_importable": ("tests.no_such_module:task",
                       "cannot import module 'tests.no_such_module'"),
}
