"""Readers for MNIST as distributed: the original IDX files and Keras' mnist.npz."""

import gzip
import os
import struct

import numpy as np

from dist_train import errors

IDX_TRAIN_IMAGES = "train-images-idx3-ubyte"
IDX_TRAIN_LABELS = "train-labels-idx1-ubyte"
_IDX_UBYTE = 0x08


class MnistFileError(ValueError):
  """A file is not valid MNIST; the message names the file."""


def find_idx_pair(directory):
  """Returns (images path, labels path) of the IDX training files, or None.

  Each file may be plain or gzipped (`.gz`), as LeCun's site serves them.
  """
  def find(name):
    for candidate in (name, name + ".gz"):
      path = os.path.join(directory, candidate)
      if os.path.isfile(path):
        return path
    return None
  images, labels = find(IDX_TRAIN_IMAGES), find(IDX_TRAIN_LABELS)
  return (images, labels) if images and labels else None


def read_idx(path) -> np.ndarray:
  """Reads an IDX file of unsigned bytes (plain or .gz) into an array.

  Raises:
    MnistFileError: bad magic number, element type, or length.
  """
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      content = f.read()
  except OSError as e:
    raise MnistFileError(f"cannot read {path}: {e}") from e
  if len(content) < 4 or content[:2] != b"\x00\x00":
    raise MnistFileError(f"{path} is not an IDX file (bad magic number)")
  element_type, num_dims = content[2], content[3]
  if element_type != _IDX_UBYTE:
    raise MnistFileError(
        f"{path}: IDX element type 0x{element_type:02x}, expected unsigned "
        "bytes (0x08)")
  header = 4 + 4 * num_dims
  if len(content) < header:
    raise MnistFileError(f"{path} is truncated inside its header")
  shape = struct.unpack(f">{num_dims}I", content[4:header])
  expected = header + int(np.prod(shape))
  if len(content) != expected:
    raise MnistFileError(
        f"{path} has {len(content)} bytes, its header promises {expected}")
  return np.frombuffer(content, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_pair(images_path, labels_path):
  """Returns (images [N, 28, 28], labels [N]) from the IDX training files."""
  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise MnistFileError(
        f"{images_path} {images.shape} and {labels_path} {labels.shape} are "
        "not N images with N labels")
  return images, labels


def read_npz(path):
  """Returns (images, labels) of the training split of a Keras mnist.npz."""
  try:
    with np.load(path) as f:
      return f["x_train"], f["y_train"]
  except Exception as e:  # np.load raises several types for bad files.
    raise MnistFileError(
        f"cannot read MNIST from {path}: {errors.first_line(e)}") from e
