"""The built-in MNIST models, plain Keras: nothing here knows about distribution."""

import keras

from dist_train import config as config_lib
from dist_train import user_code
from dist_train.data import mnist as mnist_data


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

  This is the default model_fn, so it takes the whole Config as a user's
  model_fn does.

  Raises:
    user_code.UserCodeError: a user model_fn cannot be loaded, raises, or
      does not return a keras.Model.
  """
  if config.model == "cnn":
    return create_cnn(hidden_units=config.hidden_units,
                      kernel_l2=config.kernel_l2,
                      activity_regularization=config.activity_regularization,
                      batch_norm=config.batch_norm)
  if config.model == "mlp":
    return create_mlp(hidden_units=config.hidden_units,
                      kernel_l2=config.kernel_l2,
                      activity_regularization=config.activity_regularization)
  model_fn = user_code.load_function("model", config.model)
  return user_code.check_returns(
      "model", config.model,
      user_code.call("model", config.model, model_fn, config), keras.Model,
      "a keras.Model")


def _l2(kernel_l2):
  return keras.regularizers.L2(kernel_l2) if kernel_l2 > 0 else None


def _classifier_head(x, *, hidden_name, hidden_units, regularizer):
  """A hidden Dense layer, then float32 logits: how both built-in models end."""
  x = keras.layers.Dense(hidden_units, activation="relu",
                         kernel_regularizer=regularizer, name=hidden_name)(x)
  # float32 under any mixed-precision policy: logits and loss stay float32.
  return keras.layers.Dense(mnist_data.NUM_CLASSES,
                            kernel_regularizer=regularizer, dtype="float32",
                            name="predictions")(x)


def create_cnn(*, hidden_units: int, kernel_l2: float = 0.0,
               activity_regularization: float = 0.0,
               batch_norm: bool = False) -> keras.Model:
  """A small convolutional net on 28x28x1 images, fed the same flat pixels.

  `activity_regularization` is accepted for a uniform signature and must be 0.
  `batch_norm` puts BatchNormalization between each convolution and its
  ReLU (the convolution then has no bias: the normalisation's offset
  replaces it).
  """
  if activity_regularization:
    raise ValueError("the cnn model has no activity loss layer, got "
                     f"activity_regularization={activity_regularization}")
  regularizer = _l2(kernel_l2)
  inputs = keras.Input(shape=(mnist_data.NUM_FEATURES,), name="digits")
  x = keras.layers.Reshape(mnist_data.IMAGE_SHAPE + (1,))(inputs)
  for i, filters in enumerate((16, 32), start=1):
    if batch_norm:
      x = keras.layers.Conv2D(filters, 3, use_bias=False,
                              kernel_regularizer=regularizer,
                              name=f"conv_{i}")(x)
      x = keras.layers.BatchNormalization(name=f"batch_norm_{i}")(x)
      x = keras.layers.ReLU()(x)
    else:
      x = keras.layers.Conv2D(filters, 3, activation="relu",
                              kernel_regularizer=regularizer,
                              name=f"conv_{i}")(x)
    x = keras.layers.MaxPooling2D(2)(x)
  x = keras.layers.Flatten()(x)
  outputs = _classifier_head(x, hidden_name="dense_1",
                             hidden_units=hidden_units, regularizer=regularizer)
  return keras.Model(inputs=inputs, outputs=outputs, name="mnist_cnn")


def create_mlp(*, hidden_units: int, kernel_l2: float = 0.0,
               activity_regularization: float = 0.0) -> keras.Model:
  """The reference MLP: dense_1 -> [activity loss] -> dense_2 -> predictions.

  Returns logits; the loss applies the softmax.
  """
  regularizer = _l2(kernel_l2)
  inputs = keras.Input(shape=(mnist_data.NUM_FEATURES,), name="digits")
  x = keras.layers.Dense(hidden_units, activation="relu",
                         kernel_regularizer=regularizer, name="dense_1")(inputs)
  if activity_regularization > 0:
    x = ActivitySumLoss(activity_regularization, name="activity_loss")(x)
  outputs = _classifier_head(x, hidden_name="dense_2",
                             hidden_units=hidden_units, regularizer=regularizer)
  return keras.Model(inputs=inputs, outputs=outputs, name="mnist_mlp")
