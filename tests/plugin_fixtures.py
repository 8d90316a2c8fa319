"""User code loaded by import path in tests (--model=tests.plugin_fixtures:...)."""

import keras

NOT_CALLABLE = 3


def small_model(config):
  """A user model: 784 floats -> 10 logits."""
  inputs = keras.Input(shape=(784,))
  x = keras.layers.Dense(config.hidden_units, activation="tanh",
                         name="user_hidden")(inputs)
  return keras.Model(inputs, keras.layers.Dense(10, name="user_logits")(x))


def returns_none(config):
  del config
  return None


def wrong_input_shape(config):
  del config
  inputs = keras.Input(shape=(100,))
  return keras.Model(inputs, keras.layers.Dense(10)(inputs))
