"""Whole global batches as a Trainer's input, for tests that build their own
batches and run `Trainer.train_steps` on an iterator of them."""

import tensorflow as tf

from dist_train.data import pipelines


class GlobalBatches:
  """An iterator of whole global batches, each split across the replicas
  (every worker reads every batch)."""

  divisors_in_batch = True

  def __init__(self, strategy: tf.distribute.Strategy):
    self._strategy = strategy

  def next_shares(self, iterator):
    batch = next(iterator)
    info = pipelines.global_info(batch)
    num_replicas = self._strategy.num_replicas_in_sync
    return self._strategy.experimental_distribute_values_from_function(
        lambda context: (pipelines.split_rows(
            batch, context.replica_id_in_sync_group, num_replicas), info))
