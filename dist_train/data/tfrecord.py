"""Reading TFRecord files of tf.train.Example, sharded by file across workers.

A task's build_dataset calls `read` with the feature spec of its files:

    def build_dataset(self, split, input_context=None):
      return tfrecord.read(
          f"/data/{split}-*.tfrecord",
          {"image": tf.io.FixedLenFeature([784], tf.float32),
           "label": tf.io.FixedLenFeature([], tf.int64)},
          lambda example: (example["image"], example["label"]),
          input_context)

With an input context of N pipelines (one per worker), worker i reads the
files i, i + N, i + 2N, ... of the sorted file list: each example is read by
one worker, and each worker reads about 1/N of the data (as even as the file
sizes are; dist_train pads shorter shards, docs/data.md, "Several
workers").
"""

from typing import Callable, Mapping, Optional

import tensorflow as tf

from dist_train.data import datasets

# Records parsed together: tf.io.parse_example is vectorised.
_PARSE_BATCH = 256


def shard_files(pattern: str,
                input_context: Optional[tf.distribute.InputContext] = None
                ) -> list:
  """The files matching `pattern` (a glob, or several separated by commas),
  sorted, and of those this input pipeline's: every num_input_pipelines-th
  from input_pipeline_id on.

  Raises:
    datasets.DataError: no file matches.
  """
  files = sorted({path for glob in pattern.split(",") if glob
                  for path in tf.io.gfile.glob(glob)})
  if not files:
    raise datasets.DataError(f"no file matches {pattern!r}")
  if input_context is None:
    return files
  return files[input_context.input_pipeline_id::
               input_context.num_input_pipelines]


def read(pattern: str, feature_spec: Mapping[str, object],
         parse_fn: Optional[Callable] = None,
         input_context: Optional[tf.distribute.InputContext] = None, *,
         compression_type: Optional[str] = None,
         cycle_length: int = 4) -> tf.data.Dataset:
  """Unbatched examples of the tf.train.Example records in `pattern`'s
  files (this worker's files only, given an input context).

  Files are read `cycle_length` at a time, interleaved, and parsed in
  parallel, in a deterministic order (the same files give the same order).

  Args:
    pattern: a glob such as "/data/train-*.tfrecord" (several: comma
      separated).
    feature_spec: {name: tf.io.FixedLenFeature | VarLenFeature | ...}, as
      tf.io.parse_example takes it.
    parse_fn: maps one parsed example (a dict of tensors by feature name) to
      (features, labels) or (features, labels, sample_weight); default: the
      dict itself (then a task's loss reads it).
    input_context: from build_dataset(split, input_context): shard by file.
    compression_type: "GZIP", "ZLIB" or None.
    cycle_length: files read at once.

  Returns:
    A tf.data.Dataset of unbatched examples; one pass over the files.
  """
  files = shard_files(pattern, input_context)
  # A worker may have no file (fewer files than workers): an empty shard.
  records = tf.data.Dataset.from_tensor_slices(
      tf.constant(files, tf.string)).interleave(
      lambda path: tf.data.TFRecordDataset(path, compression_type),
      cycle_length=min(cycle_length, len(files)) or 1,
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  examples = records.batch(_PARSE_BATCH).map(
      lambda serialized: tf.io.parse_example(serialized, feature_spec),
      num_parallel_calls=tf.data.AUTOTUNE).unbatch()
  if parse_fn is not None:
    examples = examples.map(parse_fn, num_parallel_calls=tf.data.AUTOTUNE)
  return examples


def write(path: str, examples, compression_type: Optional[str] = None) -> int:
  """Writes `examples`, an iterable of {name: value} (float or int lists,
  or bytes), to a TFRecord file of tf.train.Example; returns how many."""
  def feature(value):
    if isinstance(value, bytes):
      return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    values = tf.nest.flatten(tf.convert_to_tensor(value).numpy().tolist())
    if all(isinstance(v, int) for v in values):
      return tf.train.Feature(int64_list=tf.train.Int64List(value=values))
    return tf.train.Feature(float_list=tf.train.FloatList(value=values))

  count = 0
  with tf.io.TFRecordWriter(path, compression_type) as writer:
    for example in examples:
      writer.write(tf.train.Example(features=tf.train.Features(feature={
          name: feature(value) for name, value in example.items()}))
                   .SerializeToString())
      count += 1
  return count
