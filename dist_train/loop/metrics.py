"""A task's metrics and the mean of each loss, for training or validation.

Updated in each replica's context, read across replicas: the values are
those of the global batches, whatever the number of replicas.
"""

import keras
import tensorflow as tf

from dist_train.loop import losses
from dist_train.tasks import base


def weight_for(weights, name):
  """The sample weights of output `name`: a dict by output, or one for all."""
  if weights is None or name is None or not isinstance(weights, dict):
    return weights
  return weights.get(name)


def float32(structure):
  """Outputs in float32 whatever the model computes in (mixed precision):
  losses and metrics stay float32."""
  return tf.nest.map_structure(
      lambda t: tf.cast(t, tf.float32) if t.dtype.is_floating else t,
      structure)


class TaskMetrics:
  """A task's metrics and the mean of each loss, for training or validation.

  Created under the strategy's scope; updated in replica context and read in
  cross-replica context, which aggregates all replicas.
  """

  def __init__(self, description: base.TaskDescription, metrics,
               loss_names: dict):
    """Creates the metrics.

    Args:
      description: the task's description (its loss weights).
      metrics: what the task's `metrics()` returned (a list, or a dict of
        lists by output name).
      loss_names: {output name or None: the name of its mean loss}.
    """
    self.loss_means = {name: keras.metrics.Mean(name=name)
                       for name in loss_names.values()}
    self._loss_names = loss_names  # output name or None -> metric name.
    self._description = description
    self.task_metrics = {}  # metric name -> (output name or None, metric)
    if isinstance(metrics, dict):
      for output, output_metrics in metrics.items():
        for metric in output_metrics:
          self.task_metrics[f"{output}_{metric.name}"] = (output, metric)
    else:
      for metric in metrics or []:
        self.task_metrics[metric.name] = (None, metric)
    # Read in one compiled call: the variables are aggregated across
    # replicas on read, which under MultiWorkerMirroredStrategy is a
    # collective per variable when run eagerly.
    self._result_tensors = tf.function(self._results_fn)

  def _results_fn(self):
    return ({name: m.result() for name, m in self.loss_means.items()},
            {name: metric.result()
             for name, (_, metric) in self.task_metrics.items()})

  def update_losses(self, per_element_losses: dict, weights) -> None:
    """Each loss's weighted mean over every element seen: flattened, so that
    every token of a padded batch counts once (Keras' Mean would average
    each example's elements first)."""
    for output, loss in per_element_losses.items():
      weight = weight_for(weights, output)
      self.loss_means[self._loss_names[output]].update_state(
          tf.reshape(loss, [-1]),
          sample_weight=None if weight is None else tf.reshape(
              tf.cast(weight, loss.dtype), [-1]))

  def update(self, labels, outputs, weights) -> None:
    for output, metric in self.task_metrics.values():
      if output is None:
        metric.update_state(labels, outputs, sample_weight=weights)
      else:
        metric.update_state(labels[output], outputs[output],
                            sample_weight=weight_for(weights, output))

  def reset(self) -> None:
    for metric in self._all():
      metric.reset_state()

  def _all(self):
    return list(self.loss_means.values()) + [
        m for _, m in self.task_metrics.values()]

  def results(self) -> dict:
    """{name: float}: `loss`, each output's `<output>_loss` when there are
    several, and every task metric."""
    loss_results, metric_results = self._result_tensors()
    results = {name: float(value) for name, value in loss_results.items()}
    if self._loss_names and None not in self._loss_names:
      results[losses.TOTAL] = sum(
          self._description.loss_weight(output) * results[name]
          for output, name in self._loss_names.items())
    for name, result in metric_results.items():
      if isinstance(result, dict):  # A metric of several values.
        results.update({f"{name}_{k}": float(v) for k, v in result.items()})
      else:
        results[name] = float(result)
    return results
