"""TensorFlow, Keras and absl internals dist_train relies on, in one place.

Each use below says what it reaches into and the version it was checked
against (`CHECKED_ON`); tests/unit/test_compat.py has a test per use that
fails naming the use and that version when an upgrade changes it.

TensorFlow is imported inside the functions that need it: `main` uses this
module (the absl flagfile helper) before TensorFlow loads, under the start-up
filter of `logs.py`.
"""

import functools
import re
import zipfile

CHECKED_ON = {"tensorflow": "2.21.0", "keras": "3.15.1", "absl-py": "2.5.1"}

_MAX_SEED = 2**31 - 1  # random_seed._MAXINT32: seeds are taken modulo it.


# tf.data: a shuffle whose seed is a tensor. Checked on TensorFlow 2.21.0:
# tensorflow/python/data/ops/shuffle_op.py (_ShuffleDataset) and
# tensorflow/python/framework/random_seed.py (get_seed).


def _seed_pair(seed):
  """(seed, seed2) tensors that `Dataset.shuffle(seed=int)` would use.

  Mirrors tensorflow/python/framework/random_seed.get_seed and its tf.data
  wrapper for an operation seed that is a tensor. `Dataset.shuffle` itself
  accepts a seed tensor, but with TensorFlow's global seed at 0 (dist_train's
  default --seed, set by keras.utils.set_random_seed) its Python check for
  the seed pair (0, 0) asks a graph tensor for a Python bool, and fails.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=g-direct-tensorflow-import,import-outside-toplevel
  from tensorflow.python.eager import context
  # pylint: disable-next=g-direct-tensorflow-import,import-outside-toplevel
  from tensorflow.python.framework import random_seed as framework_seed
  global_seed = (context.global_seed() if tf.executing_eagerly()
                 else tf.compat.v1.get_default_graph().seed)
  first = (framework_seed.DEFAULT_GRAPH_SEED if global_seed is None
           else global_seed % _MAX_SEED)
  first = tf.constant(first, tf.int64)
  second = tf.cast(seed, tf.int64) % _MAX_SEED
  second = tf.where((first == 0) & (second == 0),
                    tf.constant(_MAX_SEED, tf.int64), second)
  return first, second


@functools.cache
def _shuffle_dataset_class():
  """`Dataset.shuffle(..., reshuffle_each_iteration=False)` with given seeds
  (what tf.data's own _ShuffleDataset builds, less the seed computation)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=g-direct-tensorflow-import,import-outside-toplevel
  from tensorflow.python.data.ops import dataset_ops
  # pylint: disable-next=g-direct-tensorflow-import,import-outside-toplevel
  from tensorflow.python.ops import gen_dataset_ops

  class ShuffleDataset(dataset_ops.UnaryUnchangedStructureDataset):

    def __init__(self, input_dataset, buffer_size, seed, seed2):
      self._input_dataset = input_dataset
      self._name = None
      variant_tensor = gen_dataset_ops.shuffle_dataset_v3(
          input_dataset._variant_tensor,  # pylint: disable=protected-access
          buffer_size=tf.cast(buffer_size, tf.int64), seed=seed, seed2=seed2,
          seed_generator=gen_dataset_ops.dummy_seed_generator(),
          reshuffle_each_iteration=False, **self._common_args)
      super().__init__(input_dataset, variant_tensor)

  return ShuffleDataset


def shuffle(dataset, buffer_size: int, seed):
  """`dataset.shuffle(buffer_size, seed=seed, reshuffle_each_iteration=False)`
  in the same order, for a Python int or a scalar int64 tensor `seed`.

  A seed tensor lets one traced function build every epoch's shuffle
  (`Dataset.range(epochs).flat_map(...)`), instead of one dataset per epoch.
  """
  return _shuffle_dataset_class()(dataset, buffer_size, *_seed_pair(seed))


# tf.data: the datasets a dataset reads. Checked on TensorFlow 2.21.0:
# DatasetV2._inputs() (private) lists them, and the batching datasets'
# classes are named _BatchDataset (also under ragged_batch),
# _PaddedBatchDataset and _UnbatchDataset.


def is_batched(dataset) -> bool:
  """Whether `dataset` or one it reads batches examples (a batch, padded
  batch or ragged batch anywhere upstream; unbatch undoes it)."""
  seen = [dataset]
  while seen:
    current = seen.pop()
    name = type(current).__name__.lower()
    if "unbatch" in name:
      return False
    if "batch" in name:
      return True
    inputs = getattr(current, "_inputs", None)
    seen.extend(inputs() if callable(inputs) else [])
  return False


# Collectives: abort every pending one. Checked on TensorFlow 2.21.0:
# tensorflow/python/eager/context.py, Context.abort_collective_ops, which
# TensorFlow's own collective health check calls when a peer dies.


def abort_collectives(message: str) -> None:
  """Makes every pending and later collective of this process fail with
  `message` (what TensorFlow's own health check calls when a peer dies)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=g-direct-tensorflow-import,import-outside-toplevel
  from tensorflow.python.eager import context
  context.context().abort_collective_ops(
      tf.errors.DEADLINE_EXCEEDED, f"Collective has timed out: {message}")


# Keras: the `.keras` file layout and where it files each layer. Checked on
# Keras 3.15.1: keras/src/saving/saving_lib.py (a zip holding
# model.weights.h5 (_VARS_FNAME_H5), whose layers are `layers/<snake_case
# class name>[_<n>]`, numbered in model order by _save_container_state) and
# keras/src/utils/naming.py (to_snake_case).

KERAS_WEIGHTS_ENTRY = "model.weights.h5"


def read_keras_weights(keras_file: str) -> bytes:
  """The HDF5 weights file inside a `.keras` file.

  Raises:
    OSError, zipfile.BadZipFile, KeyError: the file is unreadable, not a
      zip, or has no weights entry.
  """
  with zipfile.ZipFile(keras_file) as archive:
    return archive.read(KERAS_WEIGHTS_ENTRY)


def _snake_case(name: str) -> str:
  """Keras' naming.to_snake_case: "InputLayer" -> "input_layer"."""
  name = re.sub(r"\W+", "", name)
  name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
  return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def keras_layer_paths(model) -> dict:
  """{"layers/dense_2": "predictions", ...}: where a Keras weights file keeps
  each layer of `model`. Keras files a layer under its class name, numbered
  in model order, which may be the name of another layer of the model."""
  names, used = {}, {}
  for layer in model.layers:
    path = _snake_case(type(layer).__name__)
    used[path] = used.get(path, -1) + 1
    names["layers/" + (f"{path}_{used[path]}" if used[path] else path)] = (
        layer.name)
  return names


# Keras layers: every layer nested in a model, and BatchNormalization's
# moments. Checked on Keras 3.15.1: keras/src/layers/layer.py
# (Layer._flatten_layers(include_self, recursive) walks tracked sublayers,
# including those of custom layers and nested models) and
# keras/src/layers/normalization/batch_normalization.py (call() computes its
# training statistics as `mean, variance = self._moments(inputs, mask)`).


def sublayers(model) -> list:
  """Every layer inside `model`, however deeply nested, once each."""
  return list(model._flatten_layers(include_self=False, recursive=True))  # pylint: disable=protected-access


def replace_batch_norm_moments(layer, moments_fn) -> None:
  """Makes the BatchNormalization `layer` compute its training statistics
  as `moments_fn(inputs, mask) -> (mean, variance)` per channel; set on the
  instance before the layer's first traced call, nothing else changes."""
  layer._moments = moments_fn  # pylint: disable=protected-access


# absl: the flagfile being read when parsing fails. Checked on absl-py 2.5.1:
# absl/flags/_flagvalues.py, FlagValues._get_flag_file_lines(self, filename,
# parsed_file_stack=None) reads each --flagfile.


def flagfile_being_read(error: BaseException):
  """The flagfile absl was reading when `error` was raised, if it says (the
  innermost one of nested flagfiles)."""
  name = None
  frame = error.__traceback__
  while frame is not None:
    if frame.tb_frame.f_code.co_name == "_get_flag_file_lines":
      name = frame.tb_frame.f_locals.get("filename", name)
    frame = frame.tb_next
  return name


# TensorFlow's error text. Checked on TensorFlow 2.21.0 and Keras 3.15.1.

# An op error raised in several places of one call (one per replica): "N root
# error(s) found. (0) INVALID_ARGUMENT: <message> [[{{node ...}}]]".
_ROOT_ERROR = re.compile(r"\(0\) [A-Z_]+:\s*(.+)")
# The op an error names: "[[{{node replica_1/Assert/Assert}}]]", and the
# replica in its name scope under MirroredStrategy ("replica_<local id>/").
_ERROR_NODE = re.compile(r"\{\{node ([^}]+)\}\}")
_NODE_REPLICA = re.compile(r"(?:^|/)replica_(\d+)/")
# Keras' shape check when a checkpoint restores a variable created under a
# strategy (keras/src/backend/common/variables.py, Variable.assign): "...
# variable.shape=(3, 2), Received: value.shape=(4, 2). Target variable:
# <Variable path=dense/kernel, ...>".
CHECKPOINT_SHAPE_MISMATCH = re.compile(
    r"variable\.shape=(?P<model>\([^)]*\)), Received: "
    r"value\.shape=(?P<checkpoint>\([^)]*\)).*?path=(?P<name>[^,>]+)", re.S)


def op_error_summary(message: str) -> str:
  """The part of a TensorFlow op error that says what went wrong.

  Errors from inside a tf.function wrap the op's own message in the op's
  stack and, with several replicas, in "N root error(s) found. (0) ...".
  """
  root = _ROOT_ERROR.search(message)
  if root:
    line = root.group(1)
  else:
    skip = ("Graph execution error", "Detected at", "File ", "[[", "<stack")
    lines = [l.strip() for l in message.splitlines()]
    line = next((l for l in lines if l and not l.startswith(skip)),
                message.strip())
  # Ops run by a tf.function name it first: "{{function_node ...}} message".
  line = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", line)
  # tf.data prefixes the message of an op inside a map with where it ran.
  line = re.sub(r"^Error in user-defined function passed to (\w+?)(:\d+)? "
                r"transformation with iterator: \w*Iterator::\S+: ",
                r"in the input pipeline (\1): ", line)
  return re.split(r"\s+Label values:|\s*\[\[|\s*\[Op:", line)[0].strip()


def error_node(message: str):
  """The op an op error's message names, or None."""
  match = _ERROR_NODE.search(message)
  return match.group(1) if match else None


def node_replica(node) -> int:
  """The local replica id in a MirroredStrategy op name (0 when it has none:
  the first replica's ops carry no replica scope)."""
  match = _NODE_REPLICA.search(node or "")
  return int(match.group(1)) if match else 0


# The coordination service's barrier. Checked on TensorFlow 2.21.0:
# tensorflow/python/eager/context.py, Context.wait_at_barrier (no public
# API waits for every worker without a collective between the peers).


def wait_at_barrier(barrier_id: str, timeout_s: float) -> None:
  """Returns once every task of the cluster has called this with
  `barrier_id`; raises a tf.errors.OpError after `timeout_s` or when a task
  fails."""
  # pylint: disable-next=g-direct-tensorflow-import,import-outside-toplevel
  from tensorflow.python.eager import context
  context.context().wait_at_barrier(barrier_id, int(timeout_s * 1000))


# Keras: the cross-replica sum of the gradients an optimizer applies.
# Checked on Keras 3.15.1: keras/src/backend/tensorflow/optimizer.py
# (TFOptimizer._backend_update_step sums the gradients over the replicas with
# _all_reduce_sum_gradients, in replica context, after the loss scale is
# divided out; TFOptimizer._var_key names a variable). No public API hands
# out that sum, and a second all-reduce of the same gradients would cost a
# collective per step.


def observe_summed_gradients(optimizer, variables, observer) -> None:
  """Calls `observer(summed)` in replica context each time `optimizer`
  (or, under loss scaling, its inner optimizer) has summed the gradients
  over the replicas: `summed[i]` is the sum for `variables[i]` (None where
  there is none), unscaled, as the update uses it."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  inner = getattr(optimizer, "inner_optimizer", optimizer)
  original = inner._all_reduce_sum_gradients  # pylint: disable=protected-access
  index = {inner._var_key(v): i  # pylint: disable=protected-access
           for i, v in enumerate(variables)}

  def all_reduce_sum_gradients(grads_and_vars):
    reduced = original(grads_and_vars)
    if tf.distribute.get_replica_context() is not None:
      summed = [None] * len(variables)
      for gradient, variable in reduced:
        position = index.get(inner._var_key(variable))  # pylint: disable=protected-access
        if gradient is not None and position is not None:
          summed[position] = gradient
      observer(summed)
    return reduced

  inner._all_reduce_sum_gradients = all_reduce_sum_gradients  # pylint: disable=protected-access
