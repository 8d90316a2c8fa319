"""MNIST in its distributed formats, written by the tests, loads to one array."""

import gzip
import struct

import numpy as np
import pytest

from dist_train import train
from dist_train import config as config_lib
from dist_train.data import mnist
from dist_train.data import mnist_files


def _idx_bytes(array):
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
  header += struct.pack(f">{array.ndim}I", *array.shape)
  return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def digits():
  rng = np.random.default_rng(7)
  return (rng.integers(0, 256, size=(50, 28, 28), dtype=np.uint8),
          rng.integers(0, 10, size=50).astype(np.uint8))


def _write_idx(directory, images, labels, gz):
  for name, array in ((mnist_files.IDX_TRAIN_IMAGES, images),
                      (mnist_files.IDX_TRAIN_LABELS, labels)):
    content = _idx_bytes(array)
    if gz:
      (directory / (name + ".gz")).write_bytes(gzip.compress(content))
    else:
      (directory / name).write_bytes(content)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_and_npz_load_to_the_same_arrays(tmp_path, digits, gz):
  images, labels = digits
  idx_dir, npz_dir = tmp_path / "idx", tmp_path / "npz"
  idx_dir.mkdir()
  npz_dir.mkdir()
  _write_idx(idx_dir, images, labels, gz)
  np.savez(npz_dir / "mnist.npz", x_train=images, y_train=labels,
           x_test=images[:5], y_test=labels[:5])

  def load(directory):
    config = config_lib.Config(model_dir=str(tmp_path / "run"),
                               dataset="mnist", data_dir=str(directory),
                               num_validation_examples=10)
    return train.load_splits(config)

  from_idx, from_npz = load(idx_dir), load(npz_dir)
  for split in ("train", "validation"):
    for a, b in zip(getattr(from_idx, split).examples,
                    getattr(from_npz, split).examples):
      np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(from_idx.train.examples[0],
                                mnist.decode_images(images[:40]))


def test_bad_magic_is_named(tmp_path, digits):
  images, labels = digits
  _write_idx(tmp_path, images, labels, gz=False)
  (tmp_path / mnist_files.IDX_TRAIN_IMAGES).write_bytes(b"\x01\x02garbage")
  with pytest.raises(mnist_files.MnistFileError,
                     match="train-images-idx3-ubyte is not an IDX file"):
    mnist_files.read_idx_pair(*mnist_files.find_idx_pair(str(tmp_path)))


def test_truncated_file_is_named(tmp_path, digits):
  images, labels = digits
  _write_idx(tmp_path, images, labels, gz=False)
  path = tmp_path / mnist_files.IDX_TRAIN_LABELS
  path.write_bytes(path.read_bytes()[:-3])
  with pytest.raises(mnist_files.MnistFileError, match="header promises"):
    mnist_files.read_idx(str(path))


def test_mismatched_counts_are_refused(tmp_path, digits):
  images, labels = digits
  _write_idx(tmp_path, images, labels[:49], gz=True)
  with pytest.raises(mnist_files.MnistFileError, match="not N images"):
    mnist_files.read_idx_pair(*mnist_files.find_idx_pair(str(tmp_path)))
