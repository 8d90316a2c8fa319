"""Splits of any data set, and the one rule a user's data set is checked by.

A split is either in memory (`InMemory`: arrays, random access) or a stream
(`StreamSplit`: a tf.data.Dataset of unbatched examples). `task_split` turns
what user code returns (a task's `build_dataset`, a `--dataset` function)
into one, checked. The built-in data sets are in `mnist.py`; `pipelines.py`
turns a split into global batches.
"""

import dataclasses
import functools
from typing import Optional

import numpy as np
import tensorflow as tf

from dist_train import compat
from dist_train import errors
from dist_train import user_code


class DataError(errors.DistTrainError):
  """The data set cannot be loaded or is unusable; the message says why."""


class InMemory:
  """A split held in memory as arrays: random access, so each epoch's batches
  are gathered by shuffled indices instead of through a shuffle buffer.

  `examples` is (features, labels) or (features, labels, sample_weight), each
  any nested structure of arrays with the same first dimension (examples).
  """

  def __init__(self, examples, name: str = "the data set"):
    self.examples = examples
    self.name = name
    sizes = {len(a) for a in tf.nest.flatten(examples)}
    if len(sizes) != 1:
      raise DataError(
          f"{name}: arrays of different lengths {sorted(sizes)}; every "
          "array holds one row per example")
    self._size = sizes.pop()

  def __len__(self):
    return self._size

  @property
  def feature_shape(self):
    return tuple(np.shape(self.examples[0])[1:])

  @property
  def num_bytes(self) -> int:
    """The size of the arrays: what a copy on a device takes."""
    return sum(np.asarray(a).nbytes for a in tf.nest.flatten(self.examples))

  @functools.cached_property
  def tensors(self):
    """The examples as host tensors, created once: every epoch's pipeline
    gathers its batches from them."""
    with tf.device("/cpu:0"):
      return tf.nest.map_structure(tf.constant, self.examples)

  def take(self, num_examples: int) -> "InMemory":
    """The first `num_examples` examples."""
    return InMemory(tf.nest.map_structure(lambda a: a[:num_examples],
                                          self.examples), self.name)


@dataclasses.dataclass(frozen=True)
class StreamSplit:
  """A split read as a stream: a tf.data.Dataset of unbatched examples.

  `sharded`: the dataset is this worker's shard only (a task's build_dataset
  given a tf.distribute.InputContext), and `num_examples` counts the shard.
  `num_examples` is None for a stream of unknown length (endless, or not
  counted under a step budget): it has no epochs, see `pipelines.endless`.
  """

  dataset: tf.data.Dataset
  num_examples: Optional[int]
  name: str = "the user dataset"
  sharded: bool = False

  def __len__(self):
    if self.num_examples is None:
      raise TypeError(f"{self.name} is a stream of unknown length")
    return self.num_examples

  @property
  def endless(self) -> bool:
    return self.num_examples is None

  @property
  def feature_shape(self):
    return tuple(self.dataset.element_spec[0].shape)

  def preprocess_batch(self, *batch):
    """Stops the run with the data set's name when a floating feature holds
    NaN or Inf, instead of surfacing later as a NaN loss."""
    def check(tensor):
      if not tensor.dtype.is_floating:
        return tensor
      return tf.debugging.check_numerics(
          tensor, f"NaN or Inf in the features of {self.name}")
    return (tf.nest.map_structure(check, batch[0]),) + tuple(batch[1:])


@dataclasses.dataclass(frozen=True)
class Splits:
  train: InMemory | StreamSplit
  validation: InMemory | StreamSplit


def _count(dataset, where, steps, steps_flag):
  """The number of examples: known to tf.data, else counted in one pass; None
  (a stream of unknown length, never counted) for an endless or uncounted
  data set when `steps` (of `steps_flag`) were given."""
  cardinality = int(dataset.cardinality())
  if cardinality >= 0:
    return cardinality
  if steps is not None:
    # A counting pass over files of unknown length can take as long as the
    # run: a step budget reads them as a stream instead.
    return None
  if cardinality == tf.data.INFINITE_CARDINALITY:
    raise user_code.UserCodeError(
        f"{where} is infinite: give {steps_flag} to read that many global "
        "batches of it, or return one pass over the data")
  return int(dataset.reduce(np.int64(0), lambda count, _: count + 1))


def task_split(value, *, where: str, required: bool, sharded: bool = False,
               steps: Optional[int] = None,
               steps_flag: str = "--train_steps"):
  """What user code returned for a split, as an InMemory or StreamSplit: the
  one rule every user data set is checked by (a task's `build_dataset(split)`
  and a `--dataset` function alike).

  Args:
    value: what user code returned: a tf.data.Dataset of unbatched
      examples, an InMemory, or None (no such split).
    where: how messages name the split, e.g. "--task=m:f (train)".
    required: the split must exist and hold examples.
    sharded: a dataset is this worker's shard (an InMemory is always the
      whole split: dist_train reads only this worker's rows of it); an empty
      shard is allowed, the caller checks the total.
    steps: the value of `steps_flag` (--train_steps or --validation_steps),
      which lets the split be endless: a dataset of infinite or unknown
      cardinality is then a stream of unknown length
      (`StreamSplit.num_examples` None), read for that many steps.

  Raises:
    DataError: the split is missing or empty but required.
    user_code.UserCodeError: the value cannot be trained on (not a dataset,
      not (features, labels[, weights]) examples, batched, or infinite).
  """
  if value is None:
    if required:
      raise DataError(f"{where}: build_dataset returned None")
    return None
  if isinstance(value, (InMemory, StreamSplit)):
    split = value
  elif isinstance(value, tf.data.Dataset):
    spec = value.element_spec
    if not (isinstance(spec, tuple) and len(spec) in (2, 3)):
      raise user_code.UserCodeError(
          f"{where} must yield (features, labels) pairs or (features, labels, "
          f"sample_weight) triples, got {spec}")
    if compat.is_batched(value):
      raise user_code.UserCodeError(
          f"{where} is batched: return unbatched examples, dist_train "
          "batches them by the global batch size")
    split = StreamSplit(value, _count(value, where, steps, steps_flag), where,
                        sharded=sharded)
  else:
    raise user_code.UserCodeError(
        f"{where}: build_dataset must return a tf.data.Dataset, got "
        f"{type(value).__name__}")
  empty = (split.num_examples == 0 if isinstance(split, StreamSplit)
           else not len(split))
  if required and empty and not getattr(split, "sharded", False):
    raise DataError(f"{where} is empty")
  return split
