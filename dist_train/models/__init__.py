"""Built-in Keras models; nothing here knows about distribution."""
