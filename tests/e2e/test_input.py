"""Input that scales with the cluster: each worker reads only its replicas'
rows of in-memory data, and N workers still make the single-device update;
each worker reads its own shard of TFRecord files, and uneven shards neither
hang nor drop an example.

The in-memory runs train `parity_run.py`'s reference case on 641 examples
(10 global batches of 64, then 1): 2 workers through the launcher with the
data on the devices, 3 workers with batches prefetched to the devices, and 2
local replicas in each placement, against one device reading on the host.

The sharded run reads five training files of 90, 10, 70, 30 and 50 examples
with 3 workers: files {0, 3}, {1, 4} and {2}, that is 120, 60 and 70
examples, in batches of 10, 11 and 11 (a global batch of 32): 12, 6 and 7
batches. All run 12 steps an epoch, the shorter shards padded with empty
shares. The two validation files leave worker 2 with no file at all.
"""

import concurrent.futures
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from dist_train.data import datasets
from dist_train.data import pipelines
from dist_train.distribute import step_elements
from tests.helpers import input_fixtures
from tests.helpers import parity
from tests.helpers import parity_run
from tests.helpers import processes

NUM_EXAMPLES = 641  # 10 full global batches of 64, then 1 example.
STEPS = 22  # 11 an epoch, 2 epochs.
FLAGS = [*parity_run.cli_flags("reference_sum",
                               num_train_examples=NUM_EXAMPLES,
                               global_batch_size=64), processes.NO_HEALTH]
TIMEOUT_FLAG = (
    f"--collective_timeout_s={processes.COLLECTIVE_TIMEOUT_S}")


def _layout(num_workers, worker, local_replicas=1):
  return step_elements.ReplicaLayout(
      num_replicas=num_workers * local_replicas,
      num_local_replicas=local_replicas, first_replica=worker * local_replicas)


def _split(num_examples, weights=False):
  ids = np.arange(num_examples, dtype=np.int32)
  examples = (ids.astype(np.float32)[:, None], ids)
  if weights:
    examples += ((ids % 3).astype(np.float32),)
  return datasets.InMemory(examples)


def _train_elements(split, layout, batch=64, **kwargs):
  elements = step_elements.StepElements(split, layout, batch,
                                    -(-len(split) // batch), **kwargs)
  return list(elements.train(shuffle_buffer=1000, seed=4, epoch=2)
              .as_numpy_iterator())


@pytest.mark.parametrize("num_workers, local_replicas", [(2, 1), (3, 1),
                                                         (2, 2)])
def test_workers_gather_their_rows_of_the_global_batch(num_workers,
                                                       local_replicas):
  split = _split(NUM_EXAMPLES, weights=True)
  global_batches = list(pipelines.make_train_dataset(
      split, global_batch_size=64, shuffle_buffer=1000, seed=4, epoch=2)
                        .as_numpy_iterator())
  per_worker = [_train_elements(split, _layout(num_workers, w,
                                               local_replicas))
                for w in range(num_workers)]
  num_replicas = num_workers * local_replicas
  read = [0] * num_workers
  for step, batch in enumerate(global_batches):
    shares = [share for elements in per_worker
              for share in elements[step][0]]
    assert len(shares) == num_replicas
    for replica, share in enumerate(shares):
      begin, end = pipelines.share_bounds(len(batch[1]), replica,
                                          num_replicas)
      for got, expected in zip(share, batch):
        np.testing.assert_array_equal(got, expected[begin:end])
    for worker, elements in enumerate(per_worker):
      info = elements[step][1]
      # The divisors of the whole global batch, on every worker.
      assert info["num_examples"] == len(batch[1])
      assert info["weight_sums"] == np.float32(batch[2].sum())
      read[worker] += info["rows_read"]
  assert sum(read) == NUM_EXAMPLES
  assert max(read) - min(read) <= len(global_batches)


def test_data_on_device_steps_carry_indices():
  split = _split(100)
  elements = _train_elements(split, _layout(2, 1), batch=32,
                             gather_on_device=True)
  (indices,), info = elements[-1]
  assert indices.dtype == np.int64 and len(indices) == 2  # Rows 2-3 of 4.
  assert info["rows_read"] == 2


def test_sharded_streams_pad_shorter_shards_with_empty_shares():
  layout = _layout(3, 2, local_replicas=2)  # Worker 2: replicas 4 and 5.
  shard = datasets.StreamSplit(
      tf.data.Dataset.range(15).map(lambda i: (tf.cast(i, tf.float32), i)),
      15, sharded=True)
  # A global batch of 32 gives worker 2 batches of 11; 5 steps an epoch.
  elements = step_elements.StepElements(shard, layout, 32, steps_per_epoch=5)
  steps = list(elements.evaluation().as_numpy_iterator())
  assert [[len(s[1]) for s in shares] for shares, _ in steps] == [
      [5, 6], [2, 2], [0, 0], [0, 0], [0, 0]]
  assert [info["rows_read"] for _, info in steps] == [11, 4, 0, 0, 0]
  assert "num_examples" not in steps[0][1]  # An all-reduce in the step.


def test_a_resumed_shard_skips_exactly_the_steps_run():
  """Resuming at step 3 of an epoch gives the rest of that epoch and the next
  ones, padding included, as an uninterrupted run reads them."""
  layout = _layout(3, 1)
  shard = datasets.StreamSplit(
      tf.data.Dataset.range(40).map(lambda i: (tf.cast(i, tf.float32), i)),
      40, sharded=True)
  elements = step_elements.StepElements(shard, layout, 32, steps_per_epoch=6)

  def labels(**kwargs):
    return [shares[0][1].tolist() for shares, _ in elements.train(
        shuffle_buffer=64, seed=2, **kwargs).as_numpy_iterator()]

  whole = labels(epoch=1, num_epochs=2)
  assert len(whole) == 12 and whole[4:6] == [[], []]  # 40 in batches of 10.
  assert labels(epoch=1, num_epochs=2, skip_batches=3) == whole[3:]
  assert sorted(sum(whole[:6], [])) == list(range(40))


def _run_one_process(model_dir, *flags):
  return processes.run_cli(*FLAGS, f"--model_dir={model_dir}", *flags,
                          check=True)


def _launch(num_workers, args):
  launch = processes.Launch(num_workers, [*args, TIMEOUT_FLAG])
  launch.wait(timeout=300)
  return launch


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Every run of this module, three processes or launches at a time (the
  workers of a launch wait on each other much of the time)."""
  root = tmp_path_factory.mktemp("input")
  dirs = {name: str(root / name) for name in (
      "reference", "two_workers", "three_workers", "device", "prefetch",
      "sharded", "records")}
  os.makedirs(dirs["records"])
  input_fixtures.write_run_records(dirs["records"])
  jobs = {
      "three_workers": (_launch, 3, [*FLAGS, "--input_placement=prefetch",
                                     f"--model_dir={dirs['three_workers']}"]),
      "sharded": (_launch, 3, [
          "--task=tests.helpers.input_fixtures:sharded_records",
          f"--data_dir={dirs['records']}", f"--model_dir={dirs['sharded']}",
          "--global_batch_size=32", "--epochs=2", "--learning_rate=0.1",
          "--log_every_steps=6", "--steps_per_loop=6"]),
      "two_workers": (_launch, 2, [*FLAGS, "--input_placement=device",
                                   f"--model_dir={dirs['two_workers']}"]),
      "reference": (_run_one_process, dirs["reference"], "--cpu_replicas=1",
                    "--input_placement=host"),
      "device": (_run_one_process, dirs["device"], "--cpu_replicas=2",
                 "--input_placement=device"),
      "prefetch": (_run_one_process, dirs["prefetch"], "--cpu_replicas=2",
                   "--input_placement=prefetch"),
  }
  with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
    futures = {name: pool.submit(*job) for name, job in jobs.items()}
    return dirs, {name: future.result() for name, future in futures.items()}


def _max_weight_difference(a_dir, b_dir):
  """The largest difference of a float weight between the latest checkpoints
  of two runs of STEPS steps (every variable compared)."""
  # pylint: disable=protected-access
  (a_step, a), (b_step, b) = (parity.checkpoint_values(a_dir),
                              parity.checkpoint_values(b_dir))
  # pylint: enable=protected-access
  assert a_step == b_step == STEPS
  assert sorted(a) == sorted(b)
  weights = [name for name in a
             if np.asarray(a[name]).dtype.kind == "f" and np.ndim(a[name]) >= 1]
  assert len(weights) >= 6, sorted(a)  # 3 Dense layers: kernels, biases.
  return max(float(np.max(np.abs(a[n] - b[n]))) for n in weights)


def _reads(log):
  return [int(n) for n in re.findall(
      r"worker \d+ read (\d+) training examples", log)]


@pytest.mark.parametrize("name, num_workers, reads", [
    # 32/32 of each full batch; the last batch's one example is worker 1's.
    ("two_workers", 2, [320, 321]),
    # 21/21/22 of each full batch; the last example is worker 2's.
    ("three_workers", 3, [210, 210, 221]),
])
def test_workers_read_their_share_and_match_one_device(runs, name,
                                                       num_workers, reads):
  dirs, results = runs
  launch = results[name]
  assert launch.process.returncode == 0, launch.output[-6000:]
  for worker in range(num_workers):
    # One line an epoch, 2 epochs.
    assert _reads("".join(launch.worker_lines(worker))) == [reads[worker]] * 2
  reference_log = results["reference"].stderr
  assert _reads(reference_log) == [NUM_EXAMPLES] * 2
  difference = _max_weight_difference(
      dirs["reference"], dirs[name])
  print(f"{name} vs 1 device: max weight difference {difference:.2e}")
  assert difference < parity.TOLERANCE
  assert processes.final_metrics(
      "".join(launch.worker_lines(0))) == processes.final_metrics(
          reference_log)


@pytest.mark.parametrize("placement", ["device", "prefetch"])
def test_two_replicas_match_one_device_in_each_placement(runs, placement):
  dirs, results = runs
  assert f"input placement: {placement}" in results[placement].stderr
  assert _reads(results[placement].stderr) == [NUM_EXAMPLES] * 2
  difference = _max_weight_difference(
      dirs["reference"], dirs[placement])
  print(f"2 replicas, {placement} vs 1 device: max weight difference "
        f"{difference:.2e}")
  assert difference < parity.TOLERANCE


def _epoch_metrics(line):
  """{split: {name: value}} of what follows the step in an `epoch N/M done`
  line: `train loss 0.6 id_count 250.0 ... | validation ...`."""
  metrics = {}
  for part in line.split(" | "):
    split, *words = part.split()
    metrics[split] = {name: float(value)
                      for name, value in zip(words[::2], words[1::2])}
  return metrics


def test_three_workers_on_uneven_shards_read_every_example_once(runs):
  dirs, results = runs
  launch = results["sharded"]
  assert launch.process.returncode == 0, launch.output[-6000:]
  for worker, expected in enumerate([120, 60, 70]):
    lines = "".join(launch.worker_lines(worker))
    assert re.findall(r"worker \d+ read (\d+) training examples",
                      lines) == [str(expected)] * 2, lines[-3000:]
  chief = "".join(launch.worker_lines(0))
  assert "Training 250 examples, validating 33, in global batches of 32 " \
         "(12 steps per epoch) on 3 replica(s)" in chief
  done = re.findall(r"epoch \d/2 done at step (\d+) \| (.*)", chief)
  assert [int(step) for step, _ in done] == [12, 24]
  num_train = input_fixtures.NUM_RECORDS
  ids = np.arange(num_train + sum(input_fixtures.VALIDATION_FILES))
  train_ids, validation_ids = ids[:num_train], ids[num_train:]
  for _, line in done:
    metrics = _epoch_metrics(line)
    for split, split_ids in (("train", train_ids),
                             ("validation", validation_ids)):
      # Every id once: their count, sum and sum of squares.
      assert metrics[split]["id_count"] == len(split_ids), line
      assert metrics[split]["id_sum"] == split_ids.sum(), line
      assert metrics[split]["id_squares"] == (split_ids ** 2).sum(), line
  assert metrics["train"]["loss"] < 1.0  # It learns.
  assert processes.running_processes_mentioning(
      dirs["sharded"]) == []
