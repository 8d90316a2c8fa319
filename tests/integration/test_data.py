"""Data loading from real files and the pipelines' batching."""

import dataclasses
import gzip

import keras
import numpy as np
import pytest

from dist_train import train
from dist_train.data import pipelines
from dist_train import config as config_lib
from dist_train.data import datasets
from dist_train.data import mnist


def _config(tmp_path, **changes):
  return config_lib.Config(model_dir=str(tmp_path / "run"), **changes)


def _write_mnist_npz(path, num_examples=120):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(num_examples, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, size=num_examples).astype(np.uint8)
  np.savez(path, x_train=images, y_train=labels, x_test=images[:10],
           y_test=labels[:10])
  return images, labels


def test_mnist_npz_in_data_dir(tmp_path):
  images, labels = _write_mnist_npz(tmp_path / "mnist.npz")
  splits = train.load_splits(_config(tmp_path, dataset="mnist",
                                    data_dir=str(tmp_path),
                                    num_validation_examples=20))
  assert len(splits.train) == 100 and len(splits.validation) == 20
  np.testing.assert_array_equal(splits.train.examples[0],
                                mnist.decode_images(images[:100]))
  np.testing.assert_array_equal(splits.validation.examples[1], labels[100:])


def test_mnist_keras_cache(tmp_path, monkeypatch):
  cache = tmp_path / "keras_home" / "datasets"
  cache.mkdir(parents=True)
  _write_mnist_npz(cache / "mnist.npz", num_examples=50)
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
  splits = train.load_splits(_config(tmp_path, dataset="mnist",
                                    num_validation_examples=10))
  assert len(splits.train) == 40


def test_mnist_missing_names_both_remedies(tmp_path, monkeypatch):
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty_keras_home"))

  def no_network(*args, **kwargs):
    raise OSError("no network")

  # Stands in for a machine with no network, whatever this one has.
  monkeypatch.setattr(keras.datasets.mnist, "load_data", no_network)
  with pytest.raises(datasets.DataError) as error:
    train.load_splits(_config(tmp_path, dataset="mnist",
                             data_dir=str(tmp_path)))
  message = str(error.value)
  assert "put mnist.npz in --data_dir" in message
  assert "--dataset=mnist_sample" in message
  assert "\n" not in message


def test_corrupt_mnist_file_is_named(tmp_path):
  path = tmp_path / "mnist.npz"
  path.write_bytes(gzip.compress(b"not an npz"))
  with pytest.raises(datasets.DataError, match="mnist.npz"):
    train.load_splits(_config(tmp_path, dataset="mnist",
                             data_dir=str(tmp_path)))


def test_mnist_sample_holds_out_every_class(tmp_path):
  splits = train.load_splits(_config(tmp_path, dataset="mnist_sample",
                                    num_validation_examples=1000))
  assert len(splits.train) == 4000
  features = splits.train.examples[0]
  assert features.dtype == np.float32 and features.shape[1:] == (784,)
  assert 0.0 <= features.min() and features.max() <= 1.0
  counts = np.bincount(splits.validation.examples[1], minlength=10)
  assert counts.min() >= 50, counts


def test_validation_larger_than_data_is_refused(tmp_path):
  with pytest.raises(datasets.DataError, match="leaves no training examples"):
    train.load_splits(_config(tmp_path, dataset="mnist_sample",
                             num_validation_examples=5000))


def test_synthetic_is_deterministic_and_learnable(tmp_path):
  config = _config(tmp_path, dataset="synthetic", num_train_examples=300,
                   num_validation_examples=50)
  a, b = train.load_splits(config), train.load_splits(config)
  np.testing.assert_array_equal(a.train.examples[0], b.train.examples[0])
  np.testing.assert_array_equal(a.train.examples[1], b.train.examples[1])
  other_seed = train.load_splits(dataclasses.replace(config, seed=1))
  assert not np.array_equal(a.train.examples[0], other_seed.train.examples[0])
  assert len(a.train) == 300 and len(a.validation) == 50
  assert len(np.unique(a.train.examples[1])) == mnist.NUM_CLASSES
  # Learnable from the pixels: the nearest class mean of the training images
  # labels the held-out images far better than chance (10%).
  train_x = a.train.examples[0]
  means = np.stack([train_x[a.train.examples[1] == c].mean(axis=0)
                    for c in range(mnist.NUM_CLASSES)])
  validation_x = a.validation.examples[0]
  distances = ((validation_x[:, None, :] - means[None]) ** 2).sum(axis=-1)
  accuracy = np.mean(distances.argmin(axis=1) == a.validation.examples[1])
  print(f"nearest class mean: validation accuracy {accuracy:.2f}")
  assert accuracy >= 0.9, accuracy


def test_train_dataset_batches_and_scales(tmp_path):
  splits = train.load_splits(_config(tmp_path, dataset="synthetic",
                                    num_train_examples=100,
                                    num_validation_examples=0))
  batches = list(pipelines.make_train_dataset(
      splits.train, global_batch_size=32, shuffle_buffer=100, seed=1,
      epoch=0))
  assert [len(y) for _, y in batches] == [32, 32, 32, 4]
  assert len(batches) == pipelines.num_batches(100, 32)
  features = np.concatenate([x.numpy() for x, _ in batches])
  assert features.shape == (100, 784)
  assert 0.0 <= features.min() and features.max() <= 1.0
  # Same (seed, epoch): same order; another epoch: another order.
  again = list(pipelines.make_train_dataset(
      splits.train, global_batch_size=32, shuffle_buffer=100, seed=1,
      epoch=0))
  other = list(pipelines.make_train_dataset(
      splits.train, global_batch_size=32, shuffle_buffer=100, seed=1,
      epoch=1))
  np.testing.assert_array_equal(batches[0][1], again[0][1])
  assert not np.array_equal(batches[0][1], other[0][1])


@pytest.mark.parametrize("user", [False, True])
def test_one_pipeline_over_epochs_equals_epoch_by_epoch(tmp_path, user):
  """The multi-epoch pipeline gives each epoch's own order, and skipping
  resumes in the middle of the first epoch."""
  if user:
    splits = train.load_splits(_config(
        tmp_path, dataset="tests.helpers.plugin_fixtures:blobs"))
  else:
    splits = train.load_splits(_config(tmp_path, dataset="synthetic",
                                      num_train_examples=100,
                                      num_validation_examples=0))

  def labels(**kwargs):
    return [y.numpy().tolist() for _, y in pipelines.make_train_dataset(
        splits.train, global_batch_size=32, shuffle_buffer=64, seed=3,
        **kwargs)]

  epoch_by_epoch = labels(epoch=1) + labels(epoch=2) + labels(epoch=3)
  assert labels(epoch=1, num_epochs=3) == epoch_by_epoch
  assert labels(epoch=1, num_epochs=3, skip_batches=2) == epoch_by_epoch[2:]
  assert labels(epoch=1) != labels(epoch=2)


@pytest.mark.parametrize("global_seed", [None, 0, 3, 2**31 - 1])
def test_shuffle_with_seed_tensor_matches_python_seed(global_seed):
  """compat.shuffle gives Dataset.shuffle's order for the same seed, as a
  Python int or as a tensor inside a traced function (where Dataset.shuffle
  itself fails with TensorFlow's global seed at 0): the epochs of a lazy
  pipeline keep the documented order."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from dist_train import compat  # pylint: disable=import-outside-toplevel
  tf.random.set_seed(global_seed)
  try:
    examples = tf.data.Dataset.range(50)
    seeds = [0, 1, 7 * 1_000_003 + 2, 2**31 - 1]
    expected = [list(examples.shuffle(
        16, seed=s, reshuffle_each_iteration=False).as_numpy_iterator())
                for s in seeds]
    assert [list(compat.shuffle(examples, 16, s).as_numpy_iterator())
            for s in seeds] == expected
    lazy = tf.data.Dataset.from_tensor_slices(
        tf.constant(seeds, tf.int64)).flat_map(
            lambda s: compat.shuffle(examples, 16, s))
    assert list(lazy.as_numpy_iterator()) == sum(expected, [])
  finally:
    tf.random.set_seed(None)


def test_pipeline_over_epochs_has_the_documented_order(tmp_path):
  """Epoch e of a multi-epoch pipeline is the split shuffled with seed
  `shuffle_seed(seed, e)` under the global seed `seed` (what the reference
  loops of the parity tests rebuild), for --seed=0 too."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  splits = train.load_splits(_config(tmp_path, dataset="synthetic",
                                    num_train_examples=40,
                                    num_validation_examples=0))
  for seed in (0, 5):
    keras.utils.set_random_seed(seed)
    labels = [y.numpy().tolist() for _, y in pipelines.make_train_dataset(
        splits.train, global_batch_size=16, shuffle_buffer=64, seed=seed,
        epoch=2, num_epochs=2)]
    expected = []
    for epoch in (2, 3):
      indices = tf.data.Dataset.range(40).shuffle(
          64, seed=pipelines.shuffle_seed(seed, epoch),
          reshuffle_each_iteration=False).batch(16)
      expected += [splits.train.examples[1][i.numpy()].tolist()
                   for i in indices]
    assert labels == expected
  tf.random.set_seed(None)
