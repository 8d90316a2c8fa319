"""Errors as the one line a user reads."""


def first_line(error: BaseException) -> str:
  """The first line of an error's message, or its type when it has none.

  Library errors (TensorFlow's, numpy's) often run to many lines; dist_train
  reports each failure on one.
  """
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__
