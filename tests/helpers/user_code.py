"""User code that fails, written as a package outside the checkout: what the
failure tests load with --model=/--dataset= (in a process of their own, or in
the test's process)."""

import os
import textwrap

from tests.helpers import processes

USER_PACKAGE = "userpkg"
USER_MODULE = textwrap.dedent("""\
    import keras
    import numpy as np
    import tensorflow as tf


    def two_args(config, extra):
      return None


    def raises(config):
      width = config.hidden_units
      raise ValueError("bad width")


    def data_raises(split, config):
      raise RuntimeError(f"no {split} data here")


    def data_one_arg(split):
      return None


    class Boom(keras.layers.Layer):
      def call(self, x, training=None):
        if training:
          raise RuntimeError("boom in training")
        return x


    def raises_in_training(config):
      inputs = keras.Input(shape=(784,))
      return keras.Model(inputs, keras.layers.Dense(10)(Boom()(inputs)))


    def _decode(features):
      raise ValueError("corrupt record")


    def _corrupt_records():
      rng = np.random.default_rng(0)
      dataset = tf.data.Dataset.from_tensor_slices(
          (rng.random((256, 784), np.float32), rng.integers(0, 10, 256)))
      def decode(features, label):
        features = tf.py_function(_decode, [features], tf.float32)
        features.set_shape([784])
        return features, label
      return dataset.map(decode)


    def corrupt_records(split, config):
      return _corrupt_records()


    def corrupt_records_of_unknown_size(split, config):
      return _corrupt_records().filter(lambda features, label: True)


    def deep(config):
      # Its summary, written to TensorBoard as text, is over 4 KB.
      x = inputs = keras.Input(shape=(784,))
      for i in range(60):
        x = keras.layers.Dense(8, name=f"a_rather_long_layer_name_{i:03d}")(x)
      return keras.Model(inputs, keras.layers.Dense(10)(x))
    """)


def write_package(root):
  """Writes USER_MODULE as a package under `root`.

  Returns:
    (its module path, its file, the environment a process needs to import
    it).
  """
  package = root / "user_code" / USER_PACKAGE
  package.mkdir(parents=True)
  (package / "__init__.py").write_text("")
  (package / "plugins.py").write_text(USER_MODULE)
  env = {"PYTHONPATH": f"{root / 'user_code'}{os.pathsep}"
                       f"{processes.REPO_ROOT}"}
  return f"{USER_PACKAGE}.plugins", package / "plugins.py", env


def line_of(file, text):
  """`file:line` of the first line of `file` that holds `text`."""
  lines = file.read_text().splitlines()
  return f"{file}:{next(i for i, l in enumerate(lines, 1) if text in l)}"
