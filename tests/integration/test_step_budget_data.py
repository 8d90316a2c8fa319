"""Endless streams: which data sets a step budget lets through, the order
they are read in, and a resumed stream's next batch."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from dist_train import user_code
from dist_train.data import datasets
from dist_train.data import pipelines
from dist_train.distribute import step_elements


def _examples(count):
  return tf.data.Dataset.from_tensor_slices(
      (np.arange(count, dtype=np.float32)[:, None],
       np.arange(count, dtype=np.int32)))


def _generator(limit):
  """An endless-looking generator of unknown cardinality that fails after
  `limit` examples (so that counting it fails instead of hanging)."""
  def examples():
    for i in itertools.count():
      if i >= limit:
        raise RuntimeError("counted past the examples a run reads")
      yield np.float32([i]), np.int32(i)
  return tf.data.Dataset.from_generator(examples, output_signature=(
      tf.TensorSpec([1], tf.float32), tf.TensorSpec([], tf.int32)))


@pytest.mark.parametrize("split, flag", [("train", "--train_steps"),
                                         ("validation", "--validation_steps")])
def test_an_infinite_split_without_its_step_budget_is_refused(split, flag):
  where = f"--task=m:f ({split})"
  with pytest.raises(user_code.UserCodeError) as raised:
    datasets.task_split(_examples(5).repeat(), where=where, required=True,
                        steps_flag=flag)
  assert str(raised.value) == (
      f"{where} is infinite: give {flag} to read that many global batches "
      "of it, or return one pass over the data")


def test_a_step_budget_lets_through_streams_of_unknown_length_uncounted():
  endless = datasets.task_split(_examples(5).repeat(), where="w",
                                required=True, steps=10)
  assert endless.endless and endless.num_examples is None
  generated = datasets.task_split(_generator(limit=100), where="w",
                                  required=True, steps=10)
  assert generated.endless  # Not counted: counting would raise.
  known = datasets.task_split(_examples(5), where="w", required=True,
                              steps=10)
  assert not known.endless and len(known) == 5
  assert len(datasets.task_split(_examples(5).filter(lambda x, y: y < 3),
                                 where="w", required=True)) == 3


def _values(batches, count):
  return [b[1].numpy().tolist() for b in itertools.islice(batches, count)]


def test_an_endless_stream_is_read_in_the_documented_order():
  """repeat(), one shuffle with epoch 0's seed, global batches: batches
  run across the passes of a finite stream."""
  tf.random.set_seed(3)
  split = datasets.task_split(_generator(limit=10**6).take(7), where="w",
                              required=True, steps=5)
  batches = pipelines.make_train_dataset(
      split, global_batch_size=4, shuffle_buffer=5, seed=3, epoch=0)
  tf.random.set_seed(3)
  expected = _examples(7).repeat().shuffle(
      5, seed=3 * 1_000_003, reshuffle_each_iteration=False).batch(4)
  assert _values(batches, 6) == _values(expected, 6)


@pytest.mark.parametrize("sharded", [False, True])
def test_a_resumed_stream_continues_with_the_next_batch(sharded):
  """The step elements of worker 1 of 2 (2 replicas each) skipped by k equal
  those from step k + 1 on of an unskipped pipeline."""
  split = datasets.StreamSplit(_examples(23).repeat(), None, "w",
                               sharded=sharded)
  layout = step_elements.ReplicaLayout(num_replicas=4, num_local_replicas=2,
                                       first_replica=2)
  elements = step_elements.StepElements(split, layout, 10, 50, endless=True)

  def steps(skip, count):
    tf.random.set_seed(0)
    dataset = elements.train(shuffle_buffer=8, seed=0, epoch=0,
                             skip_batches=skip)
    return [[share[1].numpy().tolist() for share in shares]
            for shares, _ in itertools.islice(dataset, count)]
  whole = steps(0, 12)
  assert steps(7, 5) == whole[7:]
  assert whole[7] != whole[6]
  # Worker 1 keeps rows of the global batch (whole) or batches 5 of its
  # shard (sharded), 2 + 3 per replica either way here.
  assert [len(share) for share in whole[0]] == [2, 3]
