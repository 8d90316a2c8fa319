"""Plain Keras models. Nothing here knows about distribution."""

import keras

from dist_train import config as config_lib
from dist_train import data
from dist_train import plugins


@keras.saving.register_keras_serializable(package="dist_train")
class ActivitySumLoss(keras.layers.Layer):
  """Adds `coefficient * sum(inputs)` with add_loss and returns its input.

  This is the reference example of an extra loss added with `add_loss`. The
  term is a *sum* over the batch, so it belongs with --add_loss_reduction=sum.
  """

  def __init__(self, coefficient, **kwargs):
    super().__init__(**kwargs)
    self.coefficient = coefficient

  def call(self, inputs):
    # Summed in float32: under mixed precision a float16 sum can overflow.
    self.add_loss(self.coefficient * keras.ops.sum(
        keras.ops.cast(inputs, "float32")))
    return inputs

  def get_config(self):
    return {**super().get_config(), "coefficient": self.coefficient}


def create_model(config: config_lib.Config) -> keras.Model:
  """The model named by `config.model`: a built-in or a user model_fn.

  Raises:
    plugins.PluginError: a user model_fn cannot be loaded or does not return
      a keras.Model.
  """
  if config.model == "mlp":
    return create_mlp(config)
  if config.model == "cnn":
    return create_cnn(config)
  model_fn = plugins.load_function("model", config.model)
  return plugins.check_returns("model", config.model, model_fn(config),
                               keras.Model, "a keras.Model")


def create_cnn(config: config_lib.Config) -> keras.Model:
  """A small convolutional net on 28x28x1 images, fed the same flat pixels."""
  regularizer = (keras.regularizers.L2(config.kernel_l2)
                 if config.kernel_l2 > 0 else None)
  inputs = keras.Input(shape=(data.NUM_FEATURES,), name="digits")
  x = keras.layers.Reshape(data.IMAGE_SHAPE + (1,))(inputs)
  for i, filters in enumerate((16, 32), start=1):
    x = keras.layers.Conv2D(filters, 3, activation="relu",
                            kernel_regularizer=regularizer, name=f"conv_{i}")(x)
    x = keras.layers.MaxPooling2D(2)(x)
  x = keras.layers.Flatten()(x)
  x = keras.layers.Dense(config.hidden_units, activation="relu",
                         kernel_regularizer=regularizer, name="dense_1")(x)
  # float32 under any mixed-precision policy: logits and loss stay float32.
  outputs = keras.layers.Dense(data.NUM_CLASSES, kernel_regularizer=regularizer,
                               dtype="float32", name="predictions")(x)
  return keras.Model(inputs=inputs, outputs=outputs, name="mnist_cnn")


def create_mlp(config: config_lib.Config) -> keras.Model:
  """The reference MLP: dense_1 -> [activity loss] -> dense_2 -> predictions.

  Returns logits; the loss applies the softmax.
  """
  regularizer = (keras.regularizers.L2(config.kernel_l2)
                 if config.kernel_l2 > 0 else None)
  inputs = keras.Input(shape=(data.NUM_FEATURES,), name="digits")
  x = keras.layers.Dense(config.hidden_units, activation="relu",
                         kernel_regularizer=regularizer, name="dense_1")(inputs)
  if config.activity_regularization > 0:
    x = ActivitySumLoss(config.activity_regularization, name="activity_loss")(x)
  x = keras.layers.Dense(config.hidden_units, activation="relu",
                         kernel_regularizer=regularizer, name="dense_2")(x)
  # float32 under any mixed-precision policy: logits and loss stay float32.
  outputs = keras.layers.Dense(data.NUM_CLASSES, kernel_regularizer=regularizer,
                               dtype="float32", name="predictions")(x)
  return keras.Model(inputs=inputs, outputs=outputs, name="mnist_mlp")
