"""The example tasks' own pieces (examples/char_lm.py,
mnist_two_heads.py): the baseline, the encoding, the data split and the
metrics compute what they claim to (tests/e2e/test_examples.py trains them).
"""

import math

import numpy as np
import pytest

from examples import char_lm
from examples import mnist_two_heads


def test_unigram_baseline_of_a_tiny_corpus():
  # Training targets (tokens after the first): 2, 2, 3, 2, 3. With add-one
  # smoothing over 4 tokens the counts are 1, 1, 4, 3 of 9.
  train = [[1, 2, 2, 3], [1, 2, 3]]
  validation = [[1, 3, 2]]  # Targets 3 and 2: p = 3/9 and 4/9.
  cross_entropy, perplexity = char_lm.unigram_baseline(train, validation,
                                                       vocab_size=4)
  assert cross_entropy == pytest.approx(-(math.log(3 / 9) +
                                          math.log(4 / 9)) / 2)
  assert perplexity == pytest.approx(9 / math.sqrt(12))


def test_encode_marks_start_end_and_unknown_characters():
  tokens = char_lm.encode("a ~\t")
  assert tokens.tolist() == [char_lm.START, ord("a") - 28, 4,
                             char_lm.VOCAB_SIZE - 1, char_lm.UNKNOWN,
                             char_lm.END]


def test_lines_are_short_non_blank_and_from_other_modules_in_validation():
  train = char_lm.read_lines(char_lm.TRAIN_MODULES)
  validation = char_lm.read_lines(char_lm.VALIDATION_MODULES)
  assert len(train) > 10_000 and len(validation) > 1_000
  for line in train + validation:
    assert line.strip() and len(line) <= char_lm.MAX_LINE_LENGTH
  assert not set(char_lm.TRAIN_MODULES) & set(char_lm.VALIDATION_MODULES)


def test_token_metrics_count_every_token_once_across_padded_lengths():
  rng = np.random.default_rng(0)
  batches = []
  for length in (3, 7):  # Two batches padded to different lengths.
    labels = rng.integers(0, 5, size=(2, length))
    logits = rng.normal(size=(2, length, 5)).astype(np.float32)
    weights = (rng.random((2, length)) < 0.7).astype(np.float32)
    batches.append((labels, logits, weights))
  perplexity = char_lm.Perplexity()
  accuracy = char_lm.TokenAccuracy()
  for labels, logits, weights in batches:
    perplexity.update_state(labels, logits, sample_weight=weights)
    accuracy.update_state(labels, logits, sample_weight=weights)
  labels, logits, weights = (np.concatenate([b[i].reshape(
      (-1,) + b[i].shape[2:]) for b in batches]) for i in range(3))
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  cross_entropy = -log_softmax[np.arange(len(labels)), labels]
  assert float(perplexity.result()) == pytest.approx(
      np.exp((weights * cross_entropy).sum() / weights.sum()), rel=1e-5)
  assert float(accuracy.result()) == pytest.approx(
      (weights * (logits.argmax(-1) == labels)).sum() / weights.sum())


def test_ink_fraction_counts_pixels_above_one_half():
  features = np.zeros((2, 784), np.float32)
  features[0, :98] = 0.6  # An eighth of the pixels.
  features[1, :10] = 0.5  # Not above one half.
  assert mnist_two_heads.ink_fraction(features).tolist() == [[0.125], [0.0]]


def test_resnet_block_adds_its_input_and_normalises_each_convolution():
  import keras  # pylint: disable=import-outside-toplevel
  from examples import mnist_resnet  # pylint: disable=import-outside-toplevel
  model = mnist_resnet.create_model(channels=4)
  kinds = [type(layer).__name__ for layer in model.layers]
  assert kinds.count("BatchNormalization") == 3  # The stem's and 2 a block.
  assert kinds.count("Add") == 1
  assert not any(layer.use_bias for layer in model.layers
                 if isinstance(layer, keras.layers.Conv2D))
  assert model.output_shape == (None, 10)
  add = next(l for l in model.layers if isinstance(l, keras.layers.Add))
  # The block's input (the stem's ReLU) is one of the two added tensors.
  assert any("re_lu" in t._keras_history.operation.name  # pylint: disable=protected-access
             for t in add.input)
