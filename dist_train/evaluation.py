"""Evaluation: the latest checkpoint once (`evaluate`), or each new
checkpoint of a training run beside it (`continuous_evaluate`, on top of
`tf.train.checkpoints_iterator`)."""

import json
import os
import time
from typing import Optional

from absl import logging
import tensorflow as tf

from dist_train import builder
from dist_train import config as config_lib
from dist_train import errors
from dist_train.loop import ema as ema_lib
from dist_train.loop import stop
from dist_train.outputs import best as best_lib
from dist_train.outputs import checkpoints
from dist_train.outputs import model_dir as model_dir_lib
from dist_train.tasks import loading as task_loading

# Written by the chief when training ends (at its last step or early): an
# evaluator beside the run stops after the checkpoint of that step.
TRAINING_DONE = model_dir_lib.TRAINING_DONE
# How often an evaluator without a new checkpoint looks for TRAINING_DONE.
_EVALUATOR_POLL_S = 2.0


class NoCheckpointError(errors.DistTrainError):
  """Evaluation was asked for, but model_dir holds no checkpoint."""


def evaluate(config: config_lib.Config, *, task=None,
             model_fn: Optional[task_loading.ModelFn] = None,
             strategy: Optional[tf.distribute.Strategy] = None) -> dict:
  """Evaluates the latest checkpoint on the validation split.

  Writes the metrics as JSON to <model_dir>/eval_results.json and returns
  them, with the checkpoint's path and global step.

  Raises:
    NoCheckpointError: model_dir holds no checkpoint.
  """
  stop.set_phase("while evaluating")  # Nothing to save: a stop exits at once.
  task, description = task_loading.load_task(config, task=task,
                                             model_fn=model_fn)
  run = builder.build_evaluation(config, task, description, strategy)
  try:
    with errors.phase("restoring the latest checkpoint"):
      position = run.checkpoint.restore_latest(model_only=True)
    if position is None:
      raise NoCheckpointError(
          f"no checkpoint to evaluate in {run.checkpoint.directory}")
    builder.require_validation(run.has_validation, config, "")
    metrics = run.validate()
  finally:
    run.summary_writers.close()
  results = {"checkpoint": position.path, "global_step": position.global_step,
             **metrics}
  if run.is_chief:
    _write_eval_results(config.model_dir, results)
  return results


def continuous_evaluate(config: config_lib.Config, *, task=None,
                        model_fn: Optional[task_loading.ModelFn] = None,
                        strategy: Optional[tf.distribute.Strategy] = None
                        ) -> dict:
  """Evaluates each new checkpoint of a training run beside it, once.

  Watches <model_dir>/checkpoints, writes each evaluation's metrics to
  TensorBoard under <model_dir>/eval/ (at the checkpoint's step) and to
  <model_dir>/eval_results.json, keeps <model_dir>/best/ when given
  --best_metric (give it to the trainers or to the evaluator, not both), and
  returns after the run's final checkpoint (its last step, or the step
  <model_dir>/training_done.json names when it stopped early) or after
  --eval_timeout_s without a new one.

  Returns:
    The results of the last evaluation ({} when there was none).
  """
  stop.set_phase("while evaluating")  # Nothing to save: a stop exits at once.
  task, description = task_loading.load_task(config, task=task,
                                             model_fn=model_fn)
  run = builder.build_evaluation(config, task, description, strategy)
  builder.require_validation(run.has_validation, config, "")
  best = (best_lib.BestModel(config.model_dir, metric=config.best_metric,
                             mode=config.best_mode, is_chief=run.is_chief)
          if config.best_metric else None)
  total_steps = run.total_steps
  results = {}
  last_new = time.monotonic()

  def training_ended():
    return bool(results) and (
        results["global_step"] >= _final_step(config, total_steps))

  def stop_waiting():
    # Called after each poll without a new checkpoint.
    return training_ended() or (
        time.monotonic() - last_new >= config.eval_timeout_s)

  try:
    for path in tf.train.checkpoints_iterator(
        run.checkpoint.directory, min_interval_secs=0.5,
        timeout=min(config.eval_timeout_s, _EVALUATOR_POLL_S),
        timeout_fn=stop_waiting):
      last_new = time.monotonic()
      results = _evaluate_checkpoint(run, path, best, config) or results
      if training_ended():
        break
  finally:
    run.summary_writers.close()
  if training_ended():
    logging.info("Evaluated the final checkpoint (step %d); done",
                 results["global_step"])
  else:
    logging.info("No new checkpoint for %gs; done", config.eval_timeout_s)
  return results


def _evaluate_checkpoint(run: builder.EvaluationRun, path: str, best,
                         config) -> dict:
  """Evaluates one checkpoint for continuous_evaluate and writes the results;
  {} when it is gone."""
  try:
    position = run.checkpoint.restore_model(path)
  except checkpoints.CheckpointError as e:
    # Deleted by --keep_checkpoints before it could be read: go on.
    logging.warning("Skipping %s: %s", path, e)
    return {}
  metrics = run.validate()
  results = {"checkpoint": path, "global_step": position.global_step,
             **metrics}
  run.summary_writers.write_scalars("eval", metrics, position.global_step)
  if best is not None:
    with ema_lib.evaluation_weights(run.parts.trainer.eval_average):
      best.update(global_step=position.global_step, metrics=metrics,
                  model=run.model)
  if run.is_chief:
    _write_eval_results(config.model_dir, results)
  logging.info("Evaluated %s | %s", path, " ".join(
      f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
  return results


def _write_eval_results(model_dir, results):
  path = model_dir_lib.eval_results_file(model_dir)
  with errors.phase(f"writing {model_dir_lib.EVAL_RESULTS}"):
    model_dir_lib.write_json(path, results)
  logging.info("Wrote %s", path)


def _final_step(config, default):
  """The last step of the training run in model_dir, once it has ended."""
  path = os.path.join(config.model_dir, TRAINING_DONE)
  if not tf.io.gfile.exists(path):
    return default
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)["global_step"]


