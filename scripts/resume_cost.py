"""How long a run with --train_steps takes to resume a TFRecord stream.

    python scripts/resume_cost.py --output=resume_cost.md

A resumed run continues with batch k + 1 of its stream by skipping the k
global batches it already trained on (docs/data.md, "Step budgets"). This
measures that cost where it is paid: from building the training pipeline of
a stream of unknown length (`StepElements.train(skip_batches=k)`, as
`Trainer.start_training` builds it) to the first batch it yields, at step 0
and at step --resume_step (10,000 by default), the median of --repetitions
runs in this process. For comparison it also times what the alternative
costs: restoring a saved tf.data iterator state of the same pipeline
(`tf.train.Checkpoint(iterator=...)`) at that step.

The stream: --examples tf.train.Example records of --features floats and a
label in 4 TFRecord files, read by `dist_train.data.tfrecord.read` (a
dataset of unknown cardinality, as files are), repeated, shuffled with the
default buffer of 1,024 and batched by --global_batch_size (64), on one
replica.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NUM_FILES = 4


def _write_files(directory, num_examples, num_features):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from dist_train.data import tfrecord  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  for i in range(NUM_FILES):
    count = num_examples // NUM_FILES
    features = rng.normal(size=(count, num_features)).astype(np.float32)
    labels = rng.integers(0, 10, count)
    tfrecord.write(os.path.join(directory, f"train-{i}.tfrecord"),
                   ({"x": f, "y": int(l)} for f, l in zip(features, labels)))
  return os.path.join(directory, "train-*.tfrecord")


def _elements(pattern, num_features, global_batch_size, train_steps):
  """The step elements a one-replica run of --train_steps reads."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from dist_train.data import datasets  # pylint: disable=import-outside-toplevel
  from dist_train.data import tfrecord  # pylint: disable=import-outside-toplevel
  from dist_train.distribute import step_elements  # pylint: disable=import-outside-toplevel
  stream = tfrecord.read(
      pattern, {"x": tf.io.FixedLenFeature([num_features], tf.float32),
                "y": tf.io.FixedLenFeature([], tf.int64)},
      lambda e: (e["x"], e["y"]))
  split = datasets.task_split(stream, where="the benchmark stream",
                              required=True, steps=train_steps)
  assert split.endless, "a TFRecord stream has no known length"
  layout = step_elements.ReplicaLayout(num_replicas=1, num_local_replicas=1,
                                       first_replica=0)
  return step_elements.StepElements(split, layout, global_batch_size,
                                    train_steps, endless=True)


def _first_batch_seconds(elements, skip):
  start = time.perf_counter()
  iterator = iter(elements.train(shuffle_buffer=1024, seed=0, epoch=0,
                                 skip_batches=skip))
  first = next(iterator)
  seconds = time.perf_counter() - start
  return seconds, first


def _iterator_restore_seconds(elements, step, directory):
  """Saves the iterator state after `step` batches, then times building a
  new iterator, restoring that state and reading the next batch.

  The pipeline's NaN check (tf.debugging.check_numerics) is a stateful op,
  which tf.data refuses to save ("CheckNumerics is stateful") unless told to
  ignore such state, as here.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  options = tf.data.Options()
  options.experimental_external_state_policy = (
      tf.data.experimental.ExternalStatePolicy.IGNORE)

  def dataset():
    return elements.train(shuffle_buffer=1024, seed=0,
                          epoch=0).with_options(options)
  iterator = iter(dataset())
  for _ in range(step):
    next(iterator)
  path = tf.train.Checkpoint(iterator=iterator).write(
      os.path.join(directory, "iterator"))
  size = sum(os.path.getsize(os.path.join(directory, name))
             for name in os.listdir(directory) if name.startswith("iterator"))
  start = time.perf_counter()
  restored = iter(dataset())
  tf.train.Checkpoint(iterator=restored).read(path).assert_consumed()
  first = next(restored)
  return time.perf_counter() - start, first, size


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--resume_step", type=int, default=10_000)
  parser.add_argument("--repetitions", type=int, default=3)
  parser.add_argument("--examples", type=int, default=40_000)
  parser.add_argument("--features", type=int, default=32)
  parser.add_argument("--global_batch_size", type=int, default=64)
  parser.add_argument("--output", help="also write the Markdown report here")
  args = parser.parse_args()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tf.random.set_seed(0)  # dist_train sets the global seed to --seed.

  with tempfile.TemporaryDirectory() as directory:
    pattern = _write_files(directory, args.examples, args.features)
    elements = _elements(pattern, args.features, args.global_batch_size,
                         args.resume_step + 1)
    _first_batch_seconds(elements, 0)  # Warm-up: the first traces.
    at_start = [_first_batch_seconds(elements, 0)[0]
                for _ in range(args.repetitions)]
    skips = [_first_batch_seconds(elements, args.resume_step)
             for _ in range(args.repetitions)]
    restores = []
    for i in range(args.repetitions):
      state_dir = os.path.join(directory, f"state_{i}")
      os.makedirs(state_dir)
      restores.append(_iterator_restore_seconds(elements, args.resume_step,
                                                state_dir))
  # Both ways resume at the same batch.
  same = all(np.array_equal(a, b) for a, b in zip(
      tf.nest.flatten(skips[0][1]), tf.nest.flatten(restores[0][1])))
  rows = [
      ("first batch of a new run (step 1)", statistics.median(at_start)),
      (f"resume at step {args.resume_step:,} by skipping (dist_train)",
       statistics.median(s for s, _ in skips)),
      (f"resume at step {args.resume_step:,} from a saved iterator state "
       f"({restores[0][2] / 2**20:.1f} MB)",
       statistics.median(s for s, _, _ in restores)),
  ]
  lines = [
      f"Resuming a TFRecord stream ({args.examples:,} examples of "
      f"{args.features} floats in {NUM_FILES} files, repeated; global batch "
      f"{args.global_batch_size}, shuffle buffer 1,024): seconds to the first "
      f"batch, median of {args.repetitions}.", "",
      "| what | seconds |", "| --- | ---: |"]
  lines += [f"| {what} | {seconds:.3f} |" for what, seconds in rows]
  lines += ["", f"Both resume with the same batch: {same}."]
  report = "\n".join(lines)
  print(report)
  if args.output:
    with open(args.output, "w") as f:
      f.write(report + "\n")
  return 0 if same else 1


if __name__ == "__main__":
  sys.exit(main())
