"""dist_train: a hand-written Keras training loop on one or many GPUs with tf.distribute."""

__version__ = "0.1.0"
