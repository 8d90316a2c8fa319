"""Reading TFRecord files sharded by file (dist_train/data/tfrecord.py), on
the files of tests/e2e/test_input.py's sharded run; that module trains 3
workers on them."""

import pytest
import tensorflow as tf

from dist_train.data import datasets
from dist_train.data import tfrecord
from tests.helpers import input_fixtures

NUM_TRAIN = input_fixtures.NUM_RECORDS


@pytest.fixture(scope="module")
def records(tmp_path_factory):
  directory = tmp_path_factory.mktemp("records")
  input_fixtures.write_run_records(str(directory))
  return directory


def _ids(dataset):
  return [int(label) for _, label in dataset.as_numpy_iterator()]


def _read(records, split, input_context=None):
  return tfrecord.read(
      str(records / f"{split}-*.tfrecord"), input_fixtures.FEATURE_SPEC,
      lambda example: (example["features"], example["id"]), input_context)


def test_read_parses_every_example_in_a_fixed_order(records):
  ids = _ids(_read(records, "train"))
  assert sorted(ids) == list(range(NUM_TRAIN))
  assert _ids(_read(records, "train")) == ids
  features, _ = next(iter(_read(records, "train")))
  assert features.shape == (input_fixtures.NUM_FEATURES,)
  assert features.dtype == tf.float32


def test_shards_are_files_and_cover_every_example_once(records):
  shards = []
  for worker in range(3):
    context = tf.distribute.InputContext(num_input_pipelines=3,
                                         input_pipeline_id=worker)
    files = tfrecord.shard_files(str(records / "train-*.tfrecord"), context)
    assert [f.rsplit("-", 1)[1] for f in files] == [
        ["0.tfrecord", "3.tfrecord"], ["1.tfrecord", "4.tfrecord"],
        ["2.tfrecord"]][worker]
    shards.append(_ids(_read(records, "train", context)))
  assert [len(s) for s in shards] == [120, 60, 70]
  assert sorted(sum(shards, [])) == list(range(NUM_TRAIN))
  # More workers than files: the last worker's shard is empty.
  context = tf.distribute.InputContext(num_input_pipelines=3,
                                       input_pipeline_id=2)
  assert _ids(_read(records, "validation", context)) == []


def test_no_matching_file_is_named(tmp_path):
  with pytest.raises(datasets.DataError, match="no file matches"):
    tfrecord.shard_files(str(tmp_path / "missing-*.tfrecord"))
