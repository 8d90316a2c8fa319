"""Example task: a character-level language model of Python source code.

Real text on every machine, offline: the lines of a fixed list of modules of
Python's own standard library. Each line is one variable-length example,
`[start] + characters + [end]`; the model reads `sequence[:-1]` and predicts
`sequence[1:]`, one character at a time. dist_train pads every global batch
to its longest line with zeros, and the per-token sample weight (1 for a
character, 0 for padding) masks the padding in the loss and the metrics.

    python -m dist_train.main --flagfile=launch/flags/char_lm.cfg \
        --cpu_replicas=2

`--num_train_examples` and `--num_validation_examples` cap the lines of each
split. The validation lines come from other modules than the training lines,
so the measured perplexity is that of unseen code. `unigram_baseline` is the
perplexity of predicting every character from its training frequency alone;
the task logs it when it loads the data.
"""

import importlib.util
from typing import Optional, Sequence

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from dist_train import tasks

# Modules present (as modules, not packages) in CPython 3.11 and later.
TRAIN_MODULES = (
    "argparse", "ast", "bisect", "calendar", "configparser", "copy",
    "dataclasses", "difflib", "enum", "fnmatch", "fractions", "functools",
    "gettext", "glob", "graphlib", "heapq", "pprint", "queue", "sched",
    "statistics", "tokenize")
VALIDATION_MODULES = ("csv", "shlex", "textwrap")
MAX_LINE_LENGTH = 80

# Token ids: padding is 0, as padded_batch pads; printable ASCII follows the
# special tokens; any other character is UNKNOWN.
PAD, START, END, UNKNOWN = 0, 1, 2, 3
_FIRST_CHAR, _LAST_CHAR = 32, 126
_CHAR_OFFSET = 4 - _FIRST_CHAR
VOCAB_SIZE = 4 + _LAST_CHAR - _FIRST_CHAR + 1


def read_lines(modules: Sequence[str],
               max_line_length: int = MAX_LINE_LENGTH) -> list:
  """The non-blank lines of the modules' source files, in order, without
  trailing whitespace; lines longer than `max_line_length` are left out.

  Raises:
    tasks.TaskError: a module's source file is not found.
  """
  lines = []
  for name in modules:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
      raise tasks.TaskError(
          f"char_lm: no source file for the standard library module {name!r}")
    with open(spec.origin, encoding="utf-8") as f:
      lines.extend(line.rstrip() for line in f)
  return [line for line in lines if line and len(line) <= max_line_length]


def encode(line: str) -> np.ndarray:
  """[START, characters..., END] as int32 token ids."""
  codes = np.frombuffer(line.encode("utf-32-le"), np.uint32).astype(np.int64)
  printable = (codes >= _FIRST_CHAR) & (codes <= _LAST_CHAR)
  ids = np.where(printable, codes + _CHAR_OFFSET, UNKNOWN)
  return np.concatenate([[START], ids, [END]]).astype(np.int32)


def unigram_baseline(train_sequences, validation_sequences,
                     vocab_size: int = VOCAB_SIZE) -> tuple:
  """(cross-entropy in nats, perplexity) on the validation targets of the
  training targets' token frequencies: a model that ignores the context.

  The targets of a sequence are its tokens after the first (what the model
  predicts). Frequencies are add-one smoothed over the vocabulary, so a
  token unseen in training costs log(count + vocab_size), not infinity.
  """
  def targets(sequences):
    return np.concatenate([np.asarray(s)[1:] for s in sequences])
  counts = np.bincount(targets(train_sequences), minlength=vocab_size) + 1.0
  log_probabilities = np.log(counts / counts.sum())
  cross_entropy = float(-log_probabilities[targets(validation_sequences)].mean())
  return cross_entropy, float(np.exp(cross_entropy))


@keras.saving.register_keras_serializable(package="dist_train")
class Perplexity(keras.metrics.Metric):
  """exp of the weighted mean token cross-entropy of logits.

  Sums sum(w * cross_entropy) and sum(w) over every token it is given, so
  the mean is over tokens whatever the batches' padded lengths.
  """

  def __init__(self, name="perplexity", dtype=None):
    super().__init__(name=name, dtype=dtype)
    self.total = self.add_variable(shape=(), initializer="zeros",
                                   name="total")
    self.count = self.add_variable(shape=(), initializer="zeros",
                                   name="count")

  def update_state(self, y_true, y_pred, sample_weight=None):
    cross_entropy = keras.losses.sparse_categorical_crossentropy(
        y_true, y_pred, from_logits=True)
    if sample_weight is None:
      sample_weight = keras.ops.ones_like(cross_entropy)
    sample_weight = keras.ops.cast(sample_weight, self.dtype)
    self.total.assign_add(keras.ops.sum(
        keras.ops.cast(cross_entropy, self.dtype) * sample_weight))
    self.count.assign_add(keras.ops.sum(sample_weight))

  def result(self):
    return keras.ops.exp(keras.ops.divide_no_nan(self.total, self.count))

  def reset_state(self):
    self.total.assign(0.0)
    self.count.assign(0.0)


@keras.saving.register_keras_serializable(package="dist_train")
class TokenAccuracy(keras.metrics.SparseCategoricalAccuracy):
  """Accuracy over tokens: SparseCategoricalAccuracy of the flattened tokens.

  Keras' accuracy of [batch, time] weights averages over time within each
  example first, which weights the tokens of batches of different padded
  lengths differently; flattened, every token counts once.
  """

  def __init__(self, name="token_accuracy", dtype=None):
    super().__init__(name=name, dtype=dtype)

  def update_state(self, y_true, y_pred, sample_weight=None):
    y_pred = keras.ops.reshape(y_pred, (-1, keras.ops.shape(y_pred)[-1]))
    y_true = keras.ops.reshape(y_true, (-1,))
    if sample_weight is not None:
      sample_weight = keras.ops.reshape(sample_weight, (-1,))
    return super().update_state(y_true, y_pred, sample_weight)


def _examples(sequences) -> tf.data.Dataset:
  """(tokens[:-1], tokens[1:], ones) per sequence, sliced from one flat
  tensor (padded_batch cannot batch ragged slices)."""
  lengths = np.array([len(s) for s in sequences], np.int64)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  flat = tf.constant(np.concatenate(sequences))

  def example(start, length):
    tokens = flat[start:start + length]
    return tokens[:-1], tokens[1:], tf.ones([length - 1], tf.float32)
  return tf.data.Dataset.from_tensor_slices((starts, lengths)).map(example)


class CharLMTask(tasks.Task):
  """Next-character prediction by a stack of causal convolutions."""

  loss_name = "token_cross_entropy"

  def __init__(self, *, max_train_lines: Optional[int] = None,
               max_validation_lines: Optional[int] = None,
               embedding_dim: int = 64, units: int = 96,
               dilations: Sequence[int] = (1, 2, 4, 8, 16)):
    """Creates the task.

    Args:
      max_train_lines: use at most this many training lines (the first).
      max_validation_lines: use at most this many validation lines.
      embedding_dim: width of the character embedding.
      units: width of the residual stream of the convolutions.
      dilations: one causal convolution (kernel 3) per dilation.
    """
    self._max_lines = {"train": max_train_lines,
                       "validation": max_validation_lines}
    self._embedding_dim = embedding_dim
    self._units = units
    self._dilations = tuple(dilations)
    self._sequences = {}

  def sequences(self, split: str) -> list:
    """The split's lines as token sequences (see `encode`), read once."""
    if split not in self._sequences:
      modules = TRAIN_MODULES if split == "train" else VALIDATION_MODULES
      lines = read_lines(modules)[:self._max_lines[split]]
      self._sequences[split] = [encode(line) for line in lines]
    return self._sequences[split]

  def baseline(self) -> tuple:
    """The unigram baseline of this task's splits: (cross-entropy,
    perplexity) on the validation tokens."""
    return unigram_baseline(self.sequences("train"),
                            self.sequences("validation"))

  def build_dataset(self, split):
    if not self.sequences(split):
      return None  # No validation lines: only --mode=train runs.
    if split == "validation":
      cross_entropy, perplexity = self.baseline()
      logging.info(
          "char_lm: %d training lines, %d validation lines; unigram "
          "baseline on validation: cross-entropy %.4f, perplexity %.3f",
          len(self.sequences("train")), len(self.sequences("validation")),
          cross_entropy, perplexity)
    return _examples(self.sequences(split))

  def build_model(self):
    """Causal dilated convolutions (a small WaveNet without gates): each
    position sees the `receptive_field` characters up to itself."""
    tokens = keras.Input(shape=(None,), dtype="int32", name="tokens")
    # One-hot then Dense is an Embedding whose gradient is dense: replicas
    # sum it with one all-reduce of a fixed shape.
    x = keras.layers.Dense(self._embedding_dim, use_bias=False,
                           name="embedding")(
                               keras.ops.one_hot(tokens, VOCAB_SIZE))
    x = keras.layers.Dense(self._units, name="project")(x)
    for dilation in self._dilations:
      # Causal: padding follows a line's characters, so it cannot change
      # the predictions of the characters before it.
      y = keras.layers.Conv1D(2 * self._units, 3, padding="causal",
                              dilation_rate=dilation, activation="relu")(x)
      x = keras.layers.Add()([x, keras.layers.Dense(self._units)(y)])
    x = keras.layers.Activation("relu")(x)
    logits = keras.layers.Dense(VOCAB_SIZE, name="logits")(x)
    return keras.Model(tokens, logits, name="char_lm")

  @property
  def receptive_field(self) -> int:
    """How many characters, up to its own, each prediction reads."""
    return 1 + 2 * sum(self._dilations)

  def loss(self, labels, outputs):
    """Cross-entropy of each token, [batch, time]."""
    return keras.losses.sparse_categorical_crossentropy(labels, outputs,
                                                        from_logits=True)

  def metrics(self):
    return [TokenAccuracy(name="token_accuracy"), Perplexity(name="perplexity")]


def task(config) -> CharLMTask:
  """task_fn for `--task=examples.char_lm:task`."""
  return CharLMTask(max_train_lines=config.num_train_examples,
                    max_validation_lines=config.num_validation_examples)
