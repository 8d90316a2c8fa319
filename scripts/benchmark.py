"""Examples/second of dist_train's loop, Keras `model.fit` and an eager loop.

    python scripts/benchmark.py --output=benchmark.md

On the same machine, model (the reference MLP), data (synthetic, in memory),
strategy and global batch, for each replica count and global batch size:

  * loop:  this package's loop as the command line runs it
           (`train.train_and_evaluate`, default flags: SGD, steps_per_loop,
           log_every_steps), from its per-epoch training time;
  * fit:   `model.fit` of the same model under the same strategy, with the
           first `steps_per_execution` of --fit_steps_per_execution that works
           (a failure is reported in the notes under the table);
  * eager: the hand-written loop of the Keras guide, a GradientTape per step
           and no tf.function: on one replica without a strategy, on several
           through `strategy.run` called eagerly.

Every measurement runs in its own process (logical CPU devices can only be set
before TensorFlow starts), started once other processes leave the CPU idle
(waiting up to 2 minutes, else noted): one warm-up epoch, then --repetitions
epochs, whose median examples/second is reported. Time to first step is from process launch
to the end of the first compiled call (loop, fit) or step (eager); peak memory
is the process's maximum resident set size (of the loop: during training).
"input alone" is the examples/second of the input pipeline read by a compiled
loop without training: above the loop's rate, the loop never waits for a
batch. "loop slowdown from input" compares the loop's time on the real
pipeline with the same steps on one cached batch: the CPU the pipeline's
threads take from the step.

--sweep_steps_per_loop=1,10,100 adds a table of the loop's examples/second per
--steps_per_loop (batch 64), which is how the default was chosen.

The input table (--tables=input, on by default) runs the loop with each
--input_placement: device (the data copied once to every replica's device,
each step gathered there), prefetch (gathered on the host, copied to the
devices ahead of the step by a distributed iterator) and host (gathered on
the host, copied in the step), for the same replica counts and batches, with
its "input alone" and "slowdown from input" figures on that placement's
input. On a machine with GPUs it adds rows for all local GPUs.

The BatchNorm table (--tables=sync_batchnorm, not on by default) trains
the built-in CNN with --batch_norm on --sync_batchnorm_replicas replicas
(default 2) twice in the same run, with --sync_batchnorm=false (each
replica's own statistics) and true (the global batch's: two all-reduces per
BatchNormalization layer in the forward pass and two in the backward), and
reports both step times and their ratio: what synchronized BatchNorm costs.

The health table (--tables=health) is an A/B of --health_scalars (the
training-health scalars, docs/monitoring.md) at the default log interval
(--log_every_steps=200, --steps_per_loop=100): for the MLP and the CNN at
each replica count (global batch 64), one process runs log intervals of
the loop with them on and off, alternating (A B A B ...: --repetitions
samples of each, a sample being --health_intervals intervals, after two
intervals of each to warm up), on the same model and input, so that the
load of the machine falls on both arms alike. Each arm's examples/s is the
median of its samples; the change is the median over the pairs (a sample
with the scalars on, the next without) of each pair's own change, with the
quartiles of those changes beside it: the spread a reader should expect.

--quick (one repetition of 3,200 examples, no waiting for an idle CPU)
checks that the script runs; its figures are not worth keeping.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Examples per epoch (one repetition) of loop and fit; the eager loop, 10 to
# 60 times slower, uses epochs of EAGER_EXAMPLES.
EXAMPLES = 25_600
EAGER_EXAMPLES = 3_200


def _elapsed_since(launch_time):
  return time.time() - launch_time


def _peak_rss_mb():
  import resource  # pylint: disable=import-outside-toplevel
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _config(args, model_dir, **changes):
  from dist_train import config as config_lib  # pylint: disable=import-outside-toplevel
  devices = (dict(cpu_replicas=args.replicas) if args.device == "cpu"
             else dict(strategy="mirrored"))
  if args.input_placement:
    changes.setdefault("input_placement", args.input_placement)
  changes.setdefault("model", args.model)
  changes.setdefault("health_scalars", bool(args.health_scalars))
  return config_lib.Config(
      model_dir=model_dir, mode="train", dataset="synthetic",
      num_train_examples=args.examples, num_validation_examples=0,
      global_batch_size=args.global_batch_size, epochs=1 + args.repetitions,
      seed=0, **devices, **changes)


def run_loop(args):
  """This package's loop, through the API the command line calls."""
  from dist_train.distribute import inputs  # pylint: disable=import-outside-toplevel
  from dist_train import train  # pylint: disable=import-outside-toplevel
  from dist_train.loop import steps as steps_lib  # pylint: disable=import-outside-toplevel
  import keras  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  changes = {}
  if args.steps_per_loop:
    changes = dict(steps_per_loop=args.steps_per_loop,
                   log_every_steps=max(args.steps_per_loop,
                                       args.examples // args.global_batch_size))
  config = _config(args, tempfile.mkdtemp(prefix="benchmark_"), **changes)
  strategy = train.create_strategy(config)
  result = train.train_and_evaluate(config, strategy=strategy)
  peak_rss_mb = _peak_rss_mb()  # Training only: the checks below add to it.
  epoch_seconds = [h["train_seconds"] for h in result.history]
  first_step = result.first_loop_end_time - args.launch_time
  if not args.input_checks:
    return dict(epoch_seconds=epoch_seconds,
                examples=config.num_train_examples,
                first_step_seconds=first_step,
                steps_per_loop=config.steps_per_loop, peak_rss_mb=peak_rss_mb)

  # Input stall: the same number of steps from the real pipeline and from one
  # cached step, alternately, with a fresh optimizer on the trained model.
  splits = train.load_splits(config)
  train_input = inputs.ReplicaInput(
      splits.train, strategy=strategy, layout=inputs.replica_layout(strategy),
      global_batch_size=config.global_batch_size, placement=inputs.
      resolve_placement(config.input_placement, splits, strategy,
                        config.device_data_max_mb * 2**20))
  with strategy.scope():
    optimizer = keras.optimizers.SGD(learning_rate=1e-3)
    optimizer.build(result.model.trainable_variables)
  trainer = steps_lib.Trainer(
      strategy=strategy, task=train.create_task(config), model=result.model,
      optimizer=optimizer, add_loss_reduction="mean", train_input=train_input)
  steps = train_input.steps_per_epoch

  def pipeline(epoch):
    return train_input.train_dataset(
        shuffle_buffer=config.shuffle_buffer, seed=0, epoch=epoch)

  cached = train_input.placed(train_input.elements.train(
      shuffle_buffer=config.shuffle_buffer, seed=0, epoch=0).take(1).cache()
                              .repeat())
  trainer.train_steps(iter(cached), steps)  # Traces.
  real_seconds, cached_seconds = [], []
  for epoch in range(3):
    for dataset, times in ((pipeline(epoch), real_seconds),
                           (cached, cached_seconds)):
      iterator = iter(dataset)
      start = time.perf_counter()
      trainer.train_steps(iterator, steps)
      times.append(time.perf_counter() - start)
  stall = 1 - statistics.median(cached_seconds) / statistics.median(
      real_seconds)

  # The input alone: the same shares on the replicas' devices, no step (the
  # sum keeps the gathers from being pruned).
  @tf.function
  def read(iterator, num_steps):
    total = tf.constant(0.0)
    for _ in tf.range(num_steps):
      shares, _ = train_input.next_shares(iterator)
      for share in strategy.experimental_local_results(shares):
        total += tf.reduce_sum(tf.nest.flatten(share)[0])
    return total

  read(iter(cached), tf.constant(1))  # Traces.
  input_seconds = []
  for epoch in range(3):
    iterator = iter(pipeline(epoch))
    start = time.perf_counter()
    read(iterator, tf.constant(steps)).numpy()
    input_seconds.append(time.perf_counter() - start)
  return dict(epoch_seconds=epoch_seconds, examples=len(splits.train),
              first_step_seconds=first_step, input_stall=stall,
              input_examples_per_second=len(splits.train) / statistics.median(
                  input_seconds),
              placement=train_input.placement,
              steps_per_loop=config.steps_per_loop, peak_rss_mb=peak_rss_mb)


def run_fit(args):
  """`model.fit` of the same model and data under the same strategy."""
  from dist_train.data import pipelines  # pylint: disable=import-outside-toplevel
  from dist_train.loop import schedule  # pylint: disable=import-outside-toplevel
  from dist_train.models import mnist  # pylint: disable=import-outside-toplevel
  from dist_train import train  # pylint: disable=import-outside-toplevel
  import keras  # pylint: disable=import-outside-toplevel

  config = _config(args, tempfile.mkdtemp(prefix="benchmark_"))
  strategy = train.create_strategy(config)
  splits = train.load_splits(config)
  keras.utils.set_random_seed(0)
  with strategy.scope():
    model = mnist.create_model(config)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=config.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"], steps_per_execution=args.steps_per_execution)

  class Timer(keras.callbacks.Callback):

    def __init__(self):
      super().__init__()
      self.epoch_seconds, self.first_step_seconds = [], None

    def on_train_batch_end(self, batch, logs=None):
      if self.first_step_seconds is None:
        self.first_step_seconds = _elapsed_since(args.launch_time)

    def on_epoch_begin(self, epoch, logs=None):
      self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
      self.epoch_seconds.append(time.perf_counter() - self._start)

  # The loop's pipeline (epoch 0's order every epoch: the order does not
  # change the speed).
  dataset = pipelines.make_train_dataset(
      splits.train, global_batch_size=config.global_batch_size,
      shuffle_buffer=config.shuffle_buffer, seed=0, epoch=0)
  timer = Timer()
  model.fit(dataset, epochs=config.epochs, verbose=0, callbacks=[timer])
  return dict(epoch_seconds=timer.epoch_seconds, examples=len(splits.train),
              first_step_seconds=timer.first_step_seconds,
              steps_per_execution=args.steps_per_execution,
              jit_compile=bool(model.jit_compile))


def run_eager(args):
  """The Keras guide's loop: a GradientTape per step, no tf.function."""
  from dist_train.data import pipelines  # pylint: disable=import-outside-toplevel
  from dist_train.loop import schedule  # pylint: disable=import-outside-toplevel
  from dist_train.models import mnist  # pylint: disable=import-outside-toplevel
  from dist_train import train  # pylint: disable=import-outside-toplevel
  import keras  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  config = _config(args, tempfile.mkdtemp(prefix="benchmark_"))
  distributed = args.device != "cpu" or args.replicas > 1
  strategy = (train.create_strategy(config) if distributed
              else tf.distribute.get_strategy())
  splits = train.load_splits(config)
  keras.utils.set_random_seed(0)
  with strategy.scope():
    model = mnist.create_model(config)
    optimizer = keras.optimizers.SGD(learning_rate=config.learning_rate)
    accuracy = keras.metrics.SparseCategoricalAccuracy()
  loss_fn = keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction=None)

  def step(x, y):
    with tf.GradientTape() as tape:
      logits = model(x, training=True)
      loss = tf.nn.compute_average_loss(
          loss_fn(y, logits), global_batch_size=config.global_batch_size)
    gradients = tape.gradient(loss, model.trainable_weights)
    optimizer.apply_gradients(zip(gradients, model.trainable_weights))
    accuracy.update_state(y, logits)
    return loss

  epoch_seconds, first_step = [], None
  for epoch in range(config.epochs):
    dataset = pipelines.make_train_dataset(
        splits.train, global_batch_size=config.global_batch_size,
        shuffle_buffer=config.shuffle_buffer, seed=0, epoch=epoch)
    if distributed:
      dataset = strategy.experimental_distribute_dataset(dataset)
    start = time.perf_counter()
    for x, y in dataset:
      if distributed:
        strategy.run(step, args=(x, y))
      else:
        step(x, y)
      if first_step is None:
        first_step = _elapsed_since(args.launch_time)
    epoch_seconds.append(time.perf_counter() - start)
  return dict(epoch_seconds=epoch_seconds, examples=len(splits.train),
              first_step_seconds=first_step)


def run_bn_loop(args):
  """The loop on the built-in CNN with --batch_norm, with or without
  --sync_batchnorm: its per-epoch training times."""
  from dist_train import train  # pylint: disable=import-outside-toplevel
  config = _config(args, tempfile.mkdtemp(prefix="benchmark_"), model="cnn",
                   batch_norm=True,
                   sync_batchnorm=args.sync_batchnorm == "true")
  result = train.train_and_evaluate(config)
  return {"epoch_seconds": [h["train_seconds"] for h in result.history],
          "examples": args.examples}




def run_health_ab(args):
  """The loop's log intervals with and without the health scalars, in one
  process on one model and input, alternating: A B A B ..."""
  from dist_train import train  # pylint: disable=import-outside-toplevel
  from dist_train.distribute import inputs  # pylint: disable=import-outside-toplevel
  from dist_train.loop import health  # pylint: disable=import-outside-toplevel
  from dist_train.loop import health_report  # pylint: disable=import-outside-toplevel
  from dist_train.loop import steps as steps_lib  # pylint: disable=import-outside-toplevel
  import keras  # pylint: disable=import-outside-toplevel

  config = _config(args, tempfile.mkdtemp(prefix="benchmark_"))
  strategy = train.create_strategy(config)
  splits = train.load_splits(config)
  train_input = inputs.ReplicaInput(
      splits.train, strategy=strategy, layout=inputs.replica_layout(strategy),
      global_batch_size=config.global_batch_size, placement=inputs.
      resolve_placement(config.input_placement, splits, strategy,
                        config.device_data_max_mb * 2**20))
  task = train.create_task(config)
  with strategy.scope():
    model = task.build_model()
    optimizer = keras.optimizers.SGD(learning_rate=1e-3)
    optimizer.build(model.trainable_variables)
  step_health = health.StepHealth(strategy=strategy,
                                  variables=model.trainable_variables)
  report = health_report.HealthReport(
      health=step_health, strategy=strategy, num_workers=1,
      num_local_replicas=strategy.num_replicas_in_sync, optimizer=optimizer)
  trainers = {on: steps_lib.Trainer(
      strategy=strategy, task=task, model=model, optimizer=optimizer,
      add_loss_reduction="mean", train_input=train_input,
      health=step_health if on else None) for on in (True, False)}
  iterator = iter(train_input.train_dataset(
      shuffle_buffer=config.shuffle_buffer, seed=0, epoch=0, num_epochs=10**4))
  every, per_loop = config.log_every_steps, config.steps_per_loop

  def interval(on):
    """One log interval as the controller runs it; its seconds."""
    trainer = trainers[on]
    start = time.perf_counter()
    done = 0
    while done < every:
      num_steps = min(per_loop, every - done)
      done += num_steps
      trainer.train_steps(iterator, num_steps, measure=on and done == every)
      if on:
        report.loop_done(num_steps=num_steps,
                         timed_steps=trainer.last_timed_steps,
                         input_seconds=trainer.last_input_seconds)
    if on:
      report.take(done)
    return time.perf_counter() - start

  for on in (True, False, True, False):  # Traces, and warms up.
    interval(on)
  # A sample is --health_intervals intervals of one arm; the arms alternate
  # sample by sample, and each pair (on, off) is compared with itself.
  seconds = {True: [], False: []}
  for _ in range(args.repetitions):
    for on in (True, False):
      seconds[on].append(sum(interval(on)
                             for _ in range(args.health_intervals)))
  examples = every * config.global_batch_size * args.health_intervals
  return dict(examples=examples, health_on_seconds=seconds[True],
              health_off_seconds=seconds[False])


CHILDREN = {"loop": run_loop, "fit": run_fit, "eager": run_eager,
            "bn_loop": run_bn_loop, "health_ab": run_health_ab}


def child_main(args):
  """Runs one measurement; prints one RESULT line of JSON."""
  if args.device == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
  sys.path.insert(0, REPO_ROOT)
  try:
    result = CHILDREN[args.child](args)
  except Exception as e:  # Reported in the table; fit's failures are expected.
    lines = [line.strip() for line in str(e).strip().splitlines() if line]
    message = next((l for l in lines if "INVALID_ARGUMENT" in l),
                   lines[0] if lines else "")
    result = {"error": f"{type(e).__name__}: {message}"[:200]}
  result.setdefault("peak_rss_mb", _peak_rss_mb())
  print("RESULT " + json.dumps(result), flush=True)


# The parent: one process per measurement.


def _busy_share(seconds=1.0):
  """The share of CPU time used by anything over `seconds`; None off Linux."""
  def sample():
    with open("/proc/stat", encoding="utf-8") as f:
      values = [int(v) for v in f.readline().split()[1:]]
    return values[3] + values[4], sum(values)  # idle + iowait, total
  try:
    idle_before, total_before = sample()
    time.sleep(seconds)
    idle_after, total_after = sample()
  except OSError:
    return None
  return 1 - (idle_after - idle_before) / max(1, total_after - total_before)


def _wait_for_idle_cpu(notes, max_wait_seconds=120):
  """Waits until other processes leave the CPU idle, so that they do not
  slow the next measurement; notes it if they never do."""
  deadline = time.monotonic() + max_wait_seconds
  busy = _busy_share()
  while busy is not None and busy > 0.2:
    if time.monotonic() > deadline:
      notes.append(f"other processes kept the CPU {busy:.0%} busy before a "
                   "measurement; its figures may be low")
      return
    time.sleep(5)
    busy = _busy_share()


def _measure(method, device, replicas, global_batch_size, args, **extra):
  examples = EAGER_EXAMPLES if method == "eager" else args.examples
  repetitions = (args.eager_repetitions if method == "eager"
                 else args.repetitions)
  if not args.quick and args.idle_wait_s > 0:
    _wait_for_idle_cpu(args.notes, args.idle_wait_s)
  command = [sys.executable, os.path.abspath(__file__), f"--child={method}",
             f"--device={device}", f"--replicas={replicas}",
             f"--global_batch_size={global_batch_size}",
             f"--examples={examples}", f"--repetitions={repetitions}",
             f"--launch_time={time.time()!r}"]
  command += [f"--{name}={value}" for name, value in extra.items()]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  completed = subprocess.run(command, capture_output=True, text=True,
                             env=env, check=False)
  lines = [l for l in completed.stdout.splitlines() if l.startswith("RESULT ")]
  if not lines:
    raise RuntimeError(
        f"{' '.join(command)} exited {completed.returncode} without a "
        f"result:\n{completed.stderr[-3000:]}")
  result = json.loads(lines[-1][len("RESULT "):])
  if "epoch_seconds" in result:
    measured = result["epoch_seconds"][1:]  # The first epoch warms up.
    result["examples_per_second"] = result["examples"] / statistics.median(
        measured)
    result["spread"] = (max(measured) - min(measured)) / statistics.median(
        measured)
  return result


def _fit_with_fallback(device, replicas, global_batch_size, args):
  """fit with the first steps_per_execution that works; notes the failures."""
  failures = []
  for steps in args.fit_steps_per_execution:
    result = _measure("fit", device, replicas, global_batch_size, args,
                      steps_per_execution=steps)
    if "error" not in result:
      return result, failures
    failures.append(f"steps_per_execution={steps} failed: {result['error']}")
  return result, failures


def _devices(args):
  """(device, replicas) pairs: logical CPU replicas, and all local GPUs."""
  pairs = [("cpu", r) for r in args.replicas]
  probe = subprocess.run(
      [sys.executable, "-c", "import tensorflow as tf; "
       "print(len(tf.config.list_physical_devices('GPU')))"],
      capture_output=True, text=True, check=False,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  num_gpus = int((probe.stdout.strip().splitlines() or ["0"])[-1])
  if num_gpus:
    pairs.append(("gpu", num_gpus))
  return pairs


def _rate(result):
  return (f"{result['examples_per_second']:,.0f}"
          if "examples_per_second" in result else "failed")


def _ratio(a, b):
  if "examples_per_second" not in a or "examples_per_second" not in b:
    return "n/a"
  return f"{a['examples_per_second'] / b['examples_per_second']:.1f}x"


def _seconds(*results):
  return " / ".join(f"{r['first_step_seconds']:.1f}"
                    if r.get("first_step_seconds") else "n/a" for r in results)


def _megabytes(*results):
  return " / ".join(f"{r['peak_rss_mb']:.0f}" for r in results)


def comparison_table(rows, notes):
  lines = [
      "| replicas | global batch | loop ex/s | fit ex/s (steps/execution) "
      "| eager ex/s | loop/fit | loop/eager | time to first step, s "
      "(loop / fit / eager) | peak RSS, MB (loop / fit / eager) "
      "| input alone ex/s | loop slowdown from input |",
      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
      "| ---: |"]
  for (device, replicas, batch), (loop, fit, eager) in rows:
    name = f"{replicas} {'CPU' if device == 'cpu' else 'GPU'}"
    fit_rate = f"{_rate(fit)} ({fit.get('steps_per_execution', '-')})"
    lines.append(
        f"| {name} | {batch} | {_rate(loop)} | {fit_rate} | {_rate(eager)} "
        f"| {_ratio(loop, fit)} | {_ratio(loop, eager)} "
        f"| {_seconds(loop, fit, eager)} | {_megabytes(loop, fit, eager)} "
        f"| {loop.get('input_examples_per_second', 0):,.0f} "
        f"| {loop.get('input_stall', 0):.0%} |")
  if notes:
    lines += [""] + [f"- {note}" for note in notes]
  return "\n".join(lines)


def sweep_table(results):
  lines = ["| replicas | steps_per_loop | loop ex/s |", "| --- | ---: | ---: |"]
  for (replicas, steps), result in results:
    lines.append(f"| {replicas} CPU | {steps} | {_rate(result)} |")
  return "\n".join(lines)


def _machine():
  model = "unknown CPU"
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      model = next(l.split(":", 1)[1].strip() for l in f
                   if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return f"{model}, {os.cpu_count()} cores"


def input_table(rows):
  lines = ["| replicas | global batch | input placement | loop ex/s "
           "| input alone ex/s | loop slowdown from input |",
           "| --- | ---: | --- | ---: | ---: | ---: |"]
  for (device, replicas, batch, placement), loop in rows:
    name = f"{replicas} {'CPU' if device == 'cpu' else 'GPU'}"
    lines.append(
        f"| {name} | {batch} | {placement} | {_rate(loop)} "
        f"| {loop.get('input_examples_per_second', 0):,.0f} "
        f"| {loop.get('input_stall', 0):.0%} |")
  return "\n".join(lines)


def _sync_batchnorm_rows(args, notes):
  """[(batch, per-replica statistics, synchronized)] of the CNN with
  --batch_norm on --sync_batchnorm_replicas CPU replicas."""
  rows = []
  replicas = args.sync_batchnorm_replicas
  for batch in args.global_batch_sizes:
    results = [_measure("bn_loop", "cpu", replicas, batch, args,
                        sync_batchnorm=synchronized)
               for synchronized in ("false", "true")]
    for result, synchronized in zip(results, ("false", "true")):
      if "error" in result:
        notes.append(f"{replicas} cpu, batch {batch}, --sync_batchnorm="
                     f"{synchronized}: {result['error']}")
    rows.append((batch, *results))
    print(f"measured CNN with BatchNorm on {replicas} cpu, batch {batch}: "
          f"{_rate(results[0])} and {_rate(results[1])} (synchronized) "
          "examples/s", file=sys.stderr, flush=True)
  return rows


def sync_batchnorm_table(rows, replicas):
  lines = ["| replicas | global batch | per-replica statistics ms/step "
           "| synchronized ms/step | synchronized / per-replica |",
           "| --- | ---: | ---: | ---: | ---: |"]
  for batch, local, synchronized in rows:
    times = [1000 * batch / r["examples_per_second"]
             if "examples_per_second" in r else None
             for r in (local, synchronized)]
    shown = ["failed" if t is None else f"{t:.1f}" for t in times]
    ratio = (f"{times[1] / times[0]:.2f}x" if None not in times else "")
    lines.append(f"| {replicas} CPU | {batch} | {shown[0]} | {shown[1]} "
                 f"| {ratio} |")
  return "\n".join(lines)


def _health_rows(args, notes):
  """[((model, replicas), (on, off))]: each arm's median examples/second
  over --repetitions alternating log intervals, in one process."""
  rows = []
  for model in ("mlp", "cnn"):
    for replicas in args.replicas:
      result = _measure("health_ab", "cpu", replicas, 64, args, model=model,
                        health_intervals=args.health_intervals)
      if "error" in result:
        notes.append(f"{model}, {replicas} cpu: health A/B failed: "
                     f"{result['error']}")
        rows.append(((model, replicas), ({}, {})))
        continue
      arms = tuple({"examples_per_second": result["examples"] /
                    statistics.median(result[f"health_{arm}_seconds"])}
                   for arm in ("on", "off"))
      # Each pair's change in examples/s (off's seconds over on's): the
      # machine's drift falls on both of a pair alike.
      changes = [off / on - 1 for on, off in zip(
          result["health_on_seconds"], result["health_off_seconds"])]
      arms[0]["change"] = statistics.median(changes)
      arms[0]["change_quartiles"] = (
          statistics.quantiles(changes, n=4)[::2] if len(changes) > 1
          else (changes[0], changes[0]))
      rows.append(((model, replicas), arms))
      print(f"measured health A/B {model} {replicas} cpu: on "
            f"{_rate(arms[0])}, off {_rate(arms[1])} examples/s, paired "
            f"change {arms[0]['change']:+.1%}", file=sys.stderr, flush=True)
  return rows


def health_table(rows):
  lines = ["| model | replicas | health scalars on, ex/s | off, ex/s "
           "| change (median of pairs) | quartiles of the pairs |",
           "| --- | --- | ---: | ---: | ---: | ---: |"]
  for (model, replicas), (on, off) in rows:
    if not on or not off:
      change = quartiles = "n/a"
    else:
      change = f"{on['change']:+.1%}"
      low, high = on["change_quartiles"]
      quartiles = f"{low:+.1%} to {high:+.1%}"
    lines.append(f"| {model} | {replicas} CPU | {_rate(on)} | {_rate(off)} "
                 f"| {change} | {quartiles} |")
  return "\n".join(lines)


def _comparison_rows(args, notes):
  rows = []
  for device, replicas in _devices(args):
    for batch in args.global_batch_sizes:
      loop = _measure("loop", device, replicas, batch, args)
      fit, failures = _fit_with_fallback(device, replicas, batch, args)
      eager = _measure("eager", device, replicas, batch, args)
      for result, method in ((loop, "loop"), (eager, "eager")):
        if "error" in result:
          notes.append(f"{replicas} {device}, batch {batch}: {method} failed: "
                       f"{result['error']}")
      notes += [f"{replicas} {device}, batch {batch}: fit {f}"
                for f in failures]
      if fit.get("jit_compile"):
        notes.append(f"{replicas} {device}, batch {batch}: fit compiled with "
                     "XLA (jit_compile='auto')")
      rows.append(((device, replicas, batch), (loop, fit, eager)))
      print(f"measured {replicas} {device} batch {batch}: loop {_rate(loop)}, "
            f"fit {_rate(fit)}, eager {_rate(eager)} examples/s",
            file=sys.stderr, flush=True)
  return rows


def _input_rows(args, notes):
  rows = []
  for device, replicas in _devices(args):
    for batch in args.global_batch_sizes:
      for placement in args.input_placements:
        loop = _measure("loop", device, replicas, batch, args,
                        input_placement=placement)
        if "error" in loop:
          notes.append(f"{replicas} {device}, batch {batch}, {placement}: "
                       f"loop failed: {loop['error']}")
        rows.append(((device, replicas, batch, placement), loop))
        print(f"measured {replicas} {device} batch {batch} input "
              f"{placement}: loop {_rate(loop)} examples/s",
              file=sys.stderr, flush=True)
  return rows


def parent_main(args):
  start = time.perf_counter()
  notes = []
  args.notes = notes
  if args.quick:
    args.examples, args.repetitions, args.eager_repetitions = 3_200, 1, 1
    args.health_intervals = 1
  rows = _comparison_rows(args, notes) if "comparison" in args.tables else []
  input_rows = _input_rows(args, notes) if "input" in args.tables else []
  bn_rows = (_sync_batchnorm_rows(args, notes)
             if "sync_batchnorm" in args.tables else [])
  health_rows = _health_rows(args, notes) if "health" in args.tables else []
  sweep = []
  for replicas in args.replicas if args.sweep_steps_per_loop else []:
    for steps in args.sweep_steps_per_loop:
      sweep.append(((replicas, steps),
                    _measure("loop", "cpu", replicas, 64, args,
                             steps_per_loop=steps)))
  sections = [
      f"Machine: {_machine()}. TensorFlow/Keras as installed; reference MLP "
      f"(784-64-64-10), SGD, synthetic data in memory. Median of "
      f"{args.repetitions} epochs of {args.examples:,} examples (eager: "
      f"{args.eager_repetitions} of {EAGER_EXAMPLES:,}) after one warm-up "
      "epoch, each configuration in its own process"
      + (" (--quick: not waiting for an idle CPU)." if args.quick else ".")]
  if rows:
    sections.append(comparison_table(rows, notes if not input_rows else []))
  if input_rows:
    sections.append("examples/second of the loop by --input_placement:\n\n"
                    + input_table(input_rows) +
                    ("\n\n" + "\n".join(f"- {n}" for n in notes)
                     if notes else ""))
  if bn_rows:
    sections.append(
        "Step time of the built-in CNN with --batch_norm (synthetic data), "
        "without and with --sync_batchnorm:\n\n" +
        sync_batchnorm_table(bn_rows, args.sync_batchnorm_replicas))
  if health_rows:
    sections.append(
        "examples/second of the loop with --health_scalars on and off "
        f"(global batch 64, default log interval; {args.repetitions} "
        f"samples of {args.health_intervals} log intervals per arm, the "
        "arms alternating in one process; the change is the median of "
        "each pair's own):\n\n" +
        health_table(health_rows) +
        ("\n\n" + "\n".join(f"- {n}" for n in notes)
         if notes and not input_rows and not rows else ""))
  if sweep:
    sections.append("examples/second of the loop by --steps_per_loop (global "
                    "batch 64; one log line per epoch):\n\n" +
                    sweep_table(sweep))
  sections.append(f"Benchmark wall time: {time.perf_counter() - start:.0f} s.")
  report = "\n\n".join(sections) + "\n"
  print(report)
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      f.write(report)


def _ints(text):
  return [int(v) for v in text.split(",") if v]


def _names(text):
  return [v for v in text.split(",") if v]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--output", help="also write the Markdown report here")
  parser.add_argument("--replicas", type=_ints, default=[1, 2],
                      help="logical CPU replica counts")
  parser.add_argument("--global_batch_sizes", type=_ints, default=[64, 256])
  parser.add_argument("--repetitions", type=int, default=5)
  parser.add_argument("--eager_repetitions", type=int, default=3)
  parser.add_argument("--fit_steps_per_execution", type=_ints,
                      default=[100, 10, 1],
                      help="tried in order; the first that works is used")
  parser.add_argument("--sweep_steps_per_loop", type=_ints, default=[])
  parser.add_argument("--tables", type=_names, default=["comparison", "input"],
                      help="comparison (loop, fit, eager), input (the "
                      "loop by --input_placements), sync_batchnorm "
                      "(the CNN with BatchNorm without and with "
                      "--sync_batchnorm) and/or health (an A/B of "
                      "--health_scalars)")
  parser.add_argument("--sync_batchnorm_replicas", type=int, default=2,
                      help="replicas of the sync_batchnorm table")
  parser.add_argument("--idle_wait_s", type=float, default=120,
                      help="wait up to this long for an idle CPU before "
                      "each measurement (0: do not wait)")
  parser.add_argument("--input_placements", type=_names,
                      default=["device", "prefetch", "host"])
  parser.add_argument("--examples", type=int, default=EXAMPLES,
                      help="examples per epoch of loop and fit")
  parser.add_argument("--quick", action="store_true",
                      help="one repetition of 3,200 examples, no waiting for "
                      "an idle CPU: checks that the script runs")
  # Set by the parent for its child processes.
  parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
  parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
  parser.add_argument("--global_batch_size", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--launch_time", type=float, help=argparse.SUPPRESS)
  parser.add_argument("--model", default="mlp", help=argparse.SUPPRESS)
  parser.add_argument("--health_intervals", type=int, default=5,
                      help="health table: log intervals in each sample of "
                      "an arm (samples of 200-step intervals of the small "
                      "models last 0.05-0.7 s alone)")
  parser.add_argument("--health_scalars", type=int, default=1,
                      help=argparse.SUPPRESS)
  parser.add_argument("--input_checks", type=int, default=1,
                      help=argparse.SUPPRESS)
  parser.add_argument("--steps_per_execution", type=int, default=1,
                      help=argparse.SUPPRESS)
  parser.add_argument("--steps_per_loop", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--input_placement", help=argparse.SUPPRESS)
  parser.add_argument("--sync_batchnorm", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    args.replicas = args.replicas[0]
    child_main(args)
  else:
    parent_main(args)


if __name__ == "__main__":
  main()
