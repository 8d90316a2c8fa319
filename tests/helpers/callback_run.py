"""Keras callbacks through the Python API, as a worker process would use them.

    python tests/helpers/callback_run.py OUTPUT_DIR [--csv] [--stop_at_step=N]
        [--stop_on_worker=I] [--reduce_lr] -- DIST_TRAIN_FLAGS

DIST_TRAIN_FLAGS give the Config. With --csv, a run with a
keras.callbacks.CSVLogger writes OUTPUT_DIR/csv/history.csv (validating
after each epoch, as Keras' fit does, whatever --eval_every_steps says). With
--stop_at_step, a run in OUTPUT_DIR/stop has a callback that sets
`model.stop_training` at the first loop boundary at or after step N, on
every worker or only on worker --stop_on_worker (the task index of
TF_CONFIG; 0 without one). With --reduce_lr, a run in OUTPUT_DIR/reduce_lr
has keras.callbacks.ReduceLROnPlateau on the validation loss in `max` mode
(every falling loss is "no improvement", so it cuts). Prints one JSON line:
this task's index and, per run, its global step, why it stopped early, the
steps its callbacks saw (on_train_batch_end, on_test_end), the step the stop
was asked at, `model.optimizer.learning_rate` after each loop and the
final weights' sum.
"""

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from absl import flags
from absl import logging
import keras

from dist_train import flags as flags_lib
from dist_train import logs
from dist_train import train


class Recorder(keras.callbacks.Callback):
  """The global steps of loop ends and of evaluations."""

  def __init__(self):
    super().__init__()
    self.batch_ends, self.evaluations, self.rates = [], [], []

  def on_train_batch_end(self, batch, logs=None):
    self.batch_ends.append(batch)
    self.rates.append(float(self.model.optimizer.learning_rate))

  def on_test_end(self, logs=None):
    # Evaluations run between loops, after the last loop's end.
    self.evaluations.append(self.batch_ends[-1])


class StopAtStep(keras.callbacks.Callback):
  """Asks training to stop at the first loop end at or after `step`."""

  def __init__(self, step):
    super().__init__()
    self._step = step
    self.asked_at = None

  def on_train_batch_end(self, batch, logs=None):
    if batch >= self._step and self.asked_at is None:
      self.asked_at = batch
      self.model.stop_training = True


def _task_index():
  tf_config = json.loads(os.environ.get("TF_CONFIG", "{}"))
  return tf_config.get("task", {}).get("index", 0)


def main():
  argv = sys.argv[1:]
  separator = argv.index("--")
  parser = argparse.ArgumentParser()
  parser.add_argument("output_dir")
  parser.add_argument("--csv", action="store_true")
  parser.add_argument("--stop_at_step", type=int)
  parser.add_argument("--stop_on_worker", type=int)
  parser.add_argument("--reduce_lr", action="store_true")
  args = parser.parse_args(argv[:separator])
  flags.FLAGS(["callback_run", f"--model_dir={args.output_dir}",
               *argv[separator + 1:]])
  base = flags_lib.config_from_flags()
  logs.configure_logging()
  logging.set_verbosity(logging.INFO)
  strategy = train.create_strategy(base)
  task = _task_index()

  runs = []
  if args.csv:
    path = os.path.join(args.output_dir, "csv", "history.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    runs.append(("csv", [keras.callbacks.CSVLogger(path)],
                 dict(eval_every_steps=None)))
  if args.stop_at_step:
    stop = StopAtStep(args.stop_at_step)
    asks = args.stop_on_worker is None or args.stop_on_worker == task
    runs.append(("stop", [stop] if asks else [], {}))
  if args.reduce_lr:
    runs.append(("reduce_lr", [keras.callbacks.ReduceLROnPlateau(
        monitor="val_loss", mode="max", factor=0.5, patience=1,
        min_delta=0.0)], dict(eval_every_steps=None)))
  results = {"task": task}
  for name, callbacks, changes in runs:
    recorder = Recorder()
    config = dataclasses.replace(
        base, model_dir=os.path.join(args.output_dir, name), **changes)
    result = train.train_and_evaluate(config, strategy=strategy,
                                      callbacks=[*callbacks, recorder])
    results[name] = {
        "global_step": result.global_step,
        "stopped_early": result.stopped_early,
        "batch_ends": recorder.batch_ends,
        "evaluations": recorder.evaluations,
        "asked_at": next((c.asked_at for c in callbacks
                          if isinstance(c, StopAtStep)), None),
        "rates": recorder.rates,
        "weight_sum": float(sum(
            v.numpy().sum() for v in result.model.trainable_variables))}
  print(json.dumps(results))


if __name__ == "__main__":
  main()
