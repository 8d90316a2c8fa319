"""What each replica reads for a step, and where: this worker's part of the
data, placed on its devices, and how many examples it read.

The compiled loop calls `next_shares(iterator)` once a step (in cross-replica
context) and gets, per replica, `(share, info)`: the replica's rows of the
step and the loss divisors of the whole global batch in `info`, or an empty
`info` when only an all-reduce in the step can know them (a stream each
worker reads its own shard of; `divisors_in_batch` is then False).

Placements of the shares (`--input_placement`):
  * device: an in-memory split is copied once to each replica's device and
    each step gathers the replica's rows there from a batch of indices: a
    step moves a few indices, no examples, from the host;
  * prefetch: the worker's pipeline gathers or reads each replica's rows on
    the host and a distributed iterator copies them to the replica's device
    ahead of the step (`tf.distribute.InputOptions(
    experimental_fetch_to_device=True)`);
  * host: as prefetch, but the copy happens in the step (on CPU replicas
    there is nothing to copy, and this has the least per-step machinery).
"""

import functools
from typing import Optional

from absl import logging
import numpy as np
import tensorflow as tf

from dist_train.data import datasets
from dist_train.data import pipelines
from dist_train.distribute import step_elements

PLACEMENTS = ("device", "prefetch", "host")


def replica_layout(strategy: tf.distribute.Strategy
                   ) -> step_elements.ReplicaLayout:
  """This worker's replicas: their global ids are consecutive (MultiWorker
  MirroredStrategy numbers worker i's L replicas i*L .. i*L + L - 1)."""
  ids = strategy.experimental_local_results(
      strategy.experimental_distribute_values_from_function(
          lambda context: context.replica_id_in_sync_group))
  return step_elements.ReplicaLayout(
      num_replicas=strategy.num_replicas_in_sync,
      num_local_replicas=len(ids), first_replica=int(ids[0]))


def input_context(layout: step_elements.ReplicaLayout
                  ) -> tf.distribute.InputContext:
  """The tf.distribute.InputContext a task's build_dataset gets: one input
  pipeline per worker."""
  return tf.distribute.InputContext(
      num_input_pipelines=layout.num_workers,
      input_pipeline_id=layout.worker_index,
      num_replicas_in_sync=layout.num_replicas)


def worker_values(strategy, layout: step_elements.ReplicaLayout,
                  value: float) -> np.ndarray:
  """Every worker's `value`, by worker index, on every worker: one SUM
  all-reduce of one-hot vectors (tf.distribute reduces by SUM or MEAN only).
  float64 keeps counts exact up to 2**53."""
  if layout.num_workers == 1:
    return np.array([value], np.float64)

  def one_hot(context):
    replica = context.replica_id_in_sync_group
    first_of_worker = replica % layout.num_local_replicas == 0
    return tf.one_hot(replica // layout.num_local_replicas,
                      layout.num_workers, dtype=tf.float64) * (
                          value if first_of_worker else 0.0)
  values = strategy.experimental_distribute_values_from_function(one_hot)

  @tf.function  # An eager collective costs a collective instance and a warning.
  def all_reduce(values):
    # On the replicas' devices (through strategy.run), as NCCL needs.
    per_replica = strategy.run(tf.identity, args=(values,))
    return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
  return all_reduce(values).numpy()


def resolve_placement(placement: str, splits: datasets.Splits,
                      strategy: tf.distribute.Strategy,
                      device_data_max_bytes: int) -> str:
  """`--input_placement` with `auto` decided: host on CPU replicas (their
  device memory is the host's: there is nothing to copy, and the host
  pipeline gathers ahead of the step in its own threads); on accelerators,
  device when the in-memory splits fit in `device_data_max_bytes` (per
  replica), else prefetch."""
  if placement != "auto":
    return placement
  if all(tf.DeviceSpec.from_string(d).device_type.upper() == "CPU"
         for d in strategy.extended.worker_devices):
    return "host"
  in_memory = [s for s in (splits.train, splits.validation)
               if isinstance(s, datasets.InMemory)]
  if in_memory and sum(s.num_bytes for s in in_memory) <= (
      device_data_max_bytes):
    return "device"
  return "prefetch"


class ReplicaInput:
  """One split as this worker's replicas read it (see the module docstring).

  Attributes:
    num_examples: examples of one pass, over all workers; None for a stream
      of unknown length (`endless`).
    steps_per_epoch: global steps of one pass (with a sharded stream, the
      most any worker needs: the workers agreed on it), at most `max_steps`;
      `endless_steps` for a stream of unknown length.
    endless: whether the split is a stream of unknown length on some worker
      (then on every worker: they agreed).
    placement: device, prefetch or host (device applies to in-memory splits
      only; a stream is prefetched instead).
    divisors_in_batch: whether `info` holds the global batch's divisors.
    elements: the split's `step_elements.StepElements` on this worker.
  """

  def __init__(self, split, *, strategy: tf.distribute.Strategy,
               layout: step_elements.ReplicaLayout, global_batch_size: int,
               placement: str, where: str = "the data",
               endless_steps: Optional[int] = None,
               max_steps: Optional[int] = None):
    """Args beside the attributes' (see the class docstring): `where` names
    the split in messages; `endless_steps` are the steps of a pass over a
    stream of unknown length (--train_steps, --validation_steps), and
    `max_steps` caps a pass (--validation_steps)."""
    if placement not in PLACEMENTS:
      raise ValueError(f"placement must be one of {PLACEMENTS}, got "
                       f"{placement!r}")
    in_memory = isinstance(split, datasets.InMemory)
    if placement == "device" and not in_memory:
      placement = "prefetch"
    self.placement = placement
    self._strategy = strategy
    self._layout = layout
    sharded = getattr(split, "sharded", False)
    self.divisors_in_batch = not sharded
    local_examples = (None if getattr(split, "endless", False)
                      else len(split))
    if sharded:
      self.num_examples, self.steps_per_epoch = _agree_on_shards(
          strategy, layout, local_examples, global_batch_size, where)
    elif local_examples is None:
      self.num_examples, self.steps_per_epoch = None, None
    else:
      self.num_examples = local_examples
      self.steps_per_epoch = pipelines.num_batches(local_examples,
                                                   global_batch_size)
    self.endless = self.num_examples is None
    if self.endless:
      if endless_steps is None:  # datasets.task_split refuses it before.
        raise datasets.DataError(f"{where} is a stream of unknown length "
                                 "and no step budget was given")
      self.steps_per_epoch = endless_steps
    if max_steps is not None:
      self.steps_per_epoch = min(self.steps_per_epoch, max_steps)
    self.elements = step_elements.StepElements(
        split, layout, global_batch_size, self.steps_per_epoch,
        gather_on_device=placement == "device", endless=self.endless)
    self._devices = strategy.extended.worker_devices
    if placement == "device":
      # Once, for the whole run: later steps gather from these copies.
      self._device_tensors = []
      for device in self._devices:
        with tf.device(device):
          self._device_tensors.append(
              tf.nest.map_structure(tf.identity, split.tensors))
    host = tf.DeviceSpec.from_string(self._devices[0]).replace(
        device_type="CPU", device_index=0)
    with tf.device(host.to_string()):
      self._rows_read = tf.Variable(0, dtype=tf.int64, trainable=False,
                                    name="rows_read")

  def train_dataset(self, *, shuffle_buffer: int, seed: int, epoch: int,
                    num_epochs: int = 1, skip_batches: int = 0):
    """The step elements of epochs epoch .. epoch + num_epochs - 1 less the
    first `skip_batches` steps, to iterate with `iter()` (a tf.data.Dataset,
    or a distributed dataset when prefetching)."""
    return self.placed(self.elements.train(
        shuffle_buffer=shuffle_buffer, seed=seed, epoch=epoch,
        num_epochs=num_epochs, skip_batches=skip_batches))

  def eval_dataset(self):
    """One pass over the split, in `steps_per_epoch` steps."""
    return self.placed(self.elements.evaluation())

  def placed(self, elements: tf.data.Dataset):
    """A dataset of `self.elements`' step elements (possibly transformed:
    scripts/benchmark.py caches one) as `next_shares` reads it."""
    if self.placement != "prefetch":
      return elements

    def per_replica(shares, info):
      # One element per local replica: the distributed iterator hands the
      # worker's elements to its devices in turn.
      return functools.reduce(tf.data.Dataset.concatenate, [
          tf.data.Dataset.from_tensors((share, info)) for share in shares])
    flat = elements.flat_map(per_replica)
    # Endless (the loop reads only the steps it runs): a distributed dataset
    # of unknown length would all-reduce at every step whether any worker
    # still has data.
    flat = flat.concatenate(
        step_elements.empty_elements(flat.element_spec)).apply(
        tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
    options = tf.distribute.InputOptions(
        experimental_fetch_to_device=True,
        experimental_replication_mode=(
            tf.distribute.InputReplicationMode.PER_WORKER),
        experimental_per_replica_buffer_size=2)
    return self._strategy.distribute_datasets_from_function(
        lambda _: flat, options)

  def next_shares(self, iterator):
    """Inside the compiled loop: the next step's per-replica (share, info),
    and the rows the worker read for it counted."""
    shares, info = next(iterator)
    rows = info["rows_read"]
    if self.placement == "prefetch":  # Every local replica's has the count.
      rows = self._strategy.experimental_local_results(rows)[0]
    self._rows_read.assign_add(tf.cast(rows, tf.int64))
    info = {k: v for k, v in info.items() if k != "rows_read"}
    if self.placement == "prefetch":
      return shares, info
    first = self._layout.first_replica

    def value_fn(context):
      local = context.replica_id_in_sync_group - first
      if self.placement == "host":
        return shares[local], info
      with tf.device(self._devices[local]):
        return tf.nest.map_structure(
            lambda t: tf.gather(t, shares[local]),
            self._device_tensors[local]), info
    return self._strategy.experimental_distribute_values_from_function(
        value_fn)

  def take_read_count(self) -> int:
    """Examples this worker's pipeline read since the last call."""
    count = int(self._rows_read.numpy())
    self._rows_read.assign(0)
    return count


def _agree_on_shards(strategy, layout, num_local_examples, global_batch_size,
                     where):
  """(examples over all workers, steps per epoch) of a split each worker
  reads its own shard of: every worker runs the steps of the longest shard,
  so all take part in every step's collectives. (None, None) when some
  worker's shard is a stream of unknown length (`num_local_examples` None):
  every worker then reads its shard as one."""
  if global_batch_size < layout.num_workers:
    raise datasets.DataError(
        f"{where}: --global_batch_size={global_batch_size} is smaller than "
        f"the {layout.num_workers} workers that each batch their own shard")
  counts = worker_values(strategy, layout, -1.0 if num_local_examples is None
                         else float(num_local_examples))
  if min(counts) < 0:
    logging.info("%s: a stream of unknown length on worker(s) %s: every "
                 "worker reads its shard without epochs", where, ", ".join(
                     str(w) for w, c in enumerate(counts) if c < 0))
    return None, None
  steps = 0
  for worker, count in enumerate(counts):
    begin, end = pipelines.share_bounds(global_batch_size, worker,
                                        layout.num_workers)
    steps = max(steps, pipelines.num_batches(int(count), end - begin))
  logging.info("%s: this worker's shard holds %d examples (all: %s); %d "
               "steps per epoch", where, num_local_examples,
               ", ".join(str(int(c)) for c in counts), steps)
  return int(sum(counts)), steps
