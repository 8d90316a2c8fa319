"""Recovery from a loss spike (--loss_upper_bound, --recovery_max_trials): the
run rolls back to its latest checkpoint, skips the global batches from it to
the spike, and goes on; it ends exactly where a run on the data without
those batches ends.

The task (tests/helpers/spike_fixtures.py) is read in order in global
batches of 8, 12 steps an epoch, and the batch of step 7 of each epoch is
marked: its loss is 1000 times larger (or NaN). Loops run 2 steps and a
checkpoint is written every 4 steps, so the spike is seen at the boundary
after step 8 (the mean loss of steps 7-8 is far above the bound of 10) and
the run rolls back to step 4, skipping the batches of steps 5-8. Adam keeps
per-weight state, so a rollback that missed the optimizer would show. The
run that recovers twice holds its data in memory (random access: the batch
of a step is gathered by the indices of its data position, on the device);
the others read a stream.

The reference is the same task on the data without the batches of steps
5-8 of each epoch, trained by dist_train on the same topology without any
recovery: the recovered runs must end with its weights (1e-6: the same
operations on the same batches; 2 workers against its 1 replica within
the exactness contract's 1e-5), after Adam moved them by more than 1e-3
from the checkpoint rolled back to. A rollback that replayed the skipped
batches would meet the marked batch again and give up; one that skipped a
batch too many or too few would end elsewhere.

One run per case, made once for the module; the two workers run as
processes with their own TF_CONFIG, worker 1 alone with the bound that the
spike crosses, so that only the agreement makes worker 0 roll back too.
"""

import json
import os
import re
import resource

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import processes

TASK = "--task=tests.helpers.spike_fixtures:"
FLAGS = ["--global_batch_size=8", "--shuffle_buffer=1", "--steps_per_loop=2",
         "--log_every_steps=2", "--checkpoint_every_steps=4",
         "--optimizer=adam", "--learning_rate=0.01", "--seed=3",
         processes.NO_HEALTH]
TRAIN = "--mode=train"
BOUND = "--loss_upper_bound=10"
TOLERANCE = 1e-6
WORKERS_TOLERANCE = 1e-5  # The exactness contract: N workers vs one device.


def _run(model_dir, task, *flags, mode=TRAIN):
  return processes.run_cli(f"{TASK}{task}", *FLAGS, mode,
                           f"--model_dir={model_dir}", *flags)


def _run_two_workers(model_dir):
  """Worker 1 bounds the loss at 10, worker 0 at 1e6 (which the spike does
  not cross): the spike is worker 1's alone until they agree on it."""
  flags = [f"{TASK}spiking", *FLAGS, TRAIN, f"--model_dir={model_dir}",
           "--epochs=1", "--recovery_max_trials=1",
           f"--collective_timeout_s={processes.COLLECTIVE_TIMEOUT_S}"]
  bounds = ["--loss_upper_bound=100000", BOUND]

  started = processes.start_workers(
      [[*flags, bound] for bound in bounds],
      until=lambda ps: all(p.ended() for p in ps), timeout=300)
  return [p.process.returncode for p in started], [p.output for p in started]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("spikes")
  cpu_before = _cpu_seconds()
  dirs = {name: str(root / name) for name in (
      "recovered", "refused", "nan", "early", "reference", "two_workers")}
  results = {
      # Two epochs, two spikes (step 7 of each epoch's data). Validation
      # every 100 steps: only at the end, which the global step never
      # reaches.
      # The data in memory, gathered on the device by the indices of each
      # data position.
      "recovered": _run(dirs["recovered"], "spiking_in_memory", "--epochs=2",
                        BOUND, "--recovery_max_trials=2",
                        "--input_placement=device", "--eval_every_steps=100",
                        mode="--mode=train_and_evaluate"),
      "refused": _run(dirs["refused"], "spiking", "--epochs=1", BOUND),
      # No bound: a NaN loss is a spike by itself. Two epochs, two spikes,
      # one recovery.
      "nan": _run(dirs["nan"], "spiking_nan", "--epochs=2",
                  "--recovery_max_trials=1"),
      "early": _run(dirs["early"], "spiking_early", "--epochs=1", BOUND,
                    "--recovery_max_trials=1"),
      "reference": _run(dirs["reference"], "spiking_without_steps_5_to_8",
                        "--epochs=2"),
      "two_workers": _run_two_workers(dirs["two_workers"]),
  }
  assert processes.running_processes_mentioning(dirs["two_workers"]) == []
  print(f"spike recovery runs: {_cpu_seconds() - cpu_before:.1f} CPU-s")
  return dirs, results


def _cpu_seconds():
  """CPU seconds of the runs: forked ones and child processes."""
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return (processes.prewarmed_cpu_seconds() + children.ru_utime +
          children.ru_stime)


def _checkpoint(model_dir, step):
  return tf.train.load_checkpoint(
      os.path.join(model_dir, "checkpoints", f"ckpt-{step}"))


def _float_tensors(model_dir, step):
  """The floating-point tensors of a checkpoint (weights and Adam's
  moments), by name."""
  reader = _checkpoint(model_dir, step)
  dtypes = reader.get_variable_to_dtype_map()
  return {name: reader.get_tensor(name) for name in dtypes
          if dtypes[name].is_floating}


def _int_value(model_dir, step, name):
  return int(_checkpoint(model_dir, step).get_tensor(
      f"{name}/.ATTRIBUTES/VARIABLE_VALUE"))


def _max_difference(a, b):
  assert sorted(a) == sorted(b)
  return max(float(np.max(np.abs(a[name] - b[name]))) for name in a)


def _checkpoint_steps(model_dir):
  names = os.listdir(os.path.join(model_dir, "checkpoints"))
  return sorted(int(m.group(1)) for m in (
      re.fullmatch(r"ckpt-(\d+)\.index", name) for name in names) if m)


def _recoveries(model_dir):
  with open(os.path.join(model_dir, "run.json")) as f:
    return json.load(f)["recoveries"]


def _window(record):
  return {key: record[key] for key in (
      "spike_step", "rolled_back_to_step", "batches_skipped",
      "first_skipped", "last_skipped")}


def test_spikes_are_rolled_back_and_their_batches_skipped(runs):
  dirs, results = runs
  result = results["recovered"]
  assert result.returncode == 0, result.stderr[-6000:]
  recoveries = _recoveries(dirs["recovered"])
  assert [_window(r) for r in recoveries] == [
      {"spike_step": 8, "rolled_back_to_step": 4, "batches_skipped": 4,
       "first_skipped": [1, 5], "last_skipped": [1, 8]},
      # Epoch 2: global steps trail the data by the 4 batches skipped.
      {"spike_step": 16, "rolled_back_to_step": 12, "batches_skipped": 4,
       "first_skipped": [2, 5], "last_skipped": [2, 8]}]
  for record in recoveries:
    assert record["loss"] > 10, record
    assert record["reason"] == (
        f"loss {record['loss']:.6g} above --loss_upper_bound=10")
  lines = [line for line in result.stderr.splitlines()
           if "Loss spike at step" in line]
  assert [line.split(" ", 1)[1] for line in lines] == [
      "Loss spike at step 8 (loss {:.6g} above --loss_upper_bound=10): "
      "rolled back to step 4 and skipped 4 global batches (epoch 1 step 5 to "
      "epoch 1 step 8); recovery 1 of 2".format(recoveries[0]["loss"]),
      "Loss spike at step 16 (loss {:.6g} above --loss_upper_bound=10): "
      "rolled back to step 12 and skipped 4 global batches (epoch 2 step 5 "
      "to epoch 2 step 8); recovery 2 of 2".format(recoveries[1]["loss"])]
  # The run ends after the last batch, 8 global steps short of 2 epochs,
  # and validates there.
  assert "epoch 2/2 done at step 16 " in result.stderr
  assert len(re.findall(r" validation at step \d+ ", result.stderr)) == 1
  assert " validation at step 16 | " in result.stderr
  assert _checkpoint_steps(dirs["recovered"])[-1] == 16


def test_the_recovered_run_ends_as_the_run_without_the_skipped_batches(runs):
  dirs, results = runs
  assert results["reference"].returncode == 0, (
      results["reference"].stderr[-6000:])
  for step in (8, 16):  # Each epoch's end.
    recovered = _float_tensors(dirs["recovered"], step)
    reference = _float_tensors(dirs["reference"], step)
    difference = _max_difference(recovered, reference)
    moved = _max_difference(recovered, _float_tensors(dirs["recovered"],
                                                      step - 4))
    print(f"step {step}: recovered vs reference {difference:.2e}, moved "
          f"{moved:.2e} since step {step - 4}")
    assert difference <= TOLERANCE, step
    assert moved > 1e-3, step


def test_the_checkpoint_rolled_back_to_is_saved_again_past_the_skip(runs):
  """ckpt-12, rewritten at the second recovery: the weights it had, and the
  data position past the skipped batches, so that a resume skips them too."""
  dirs, _ = runs
  assert (_int_value(dirs["recovered"], 12, "epoch"),
          _int_value(dirs["recovered"], 12, "step_in_epoch")) == (1, 8)
  assert (_int_value(dirs["reference"], 12, "epoch"),
          _int_value(dirs["reference"], 12, "step_in_epoch")) == (1, 4)
  assert _max_difference(_float_tensors(dirs["recovered"], 12),
                         _float_tensors(dirs["reference"], 12)) <= TOLERANCE


def test_the_run_exits_3_after_max_trials_recoveries(runs):
  """The NaN run recovers from its first spike and gives up at the second."""
  dirs, results = runs
  result = results["nan"]
  assert result.returncode == 3, result.stderr[-6000:]
  assert processes.error_line(result) == (
      "dist_train: error: loss spike in steps 15-16: loss=nan, "
      "task_loss=nan; gave up after 1 recovery (--recovery_max_trials=1); "
      "no checkpoint of these steps was written")
  assert [r["spike_step"] for r in _recoveries(dirs["nan"])] == [8]
  assert _checkpoint_steps(dirs["nan"]) == [4, 8, 12]


def test_without_recovery_a_spike_exits_3(runs):
  dirs, results = runs
  result = results["refused"]
  assert result.returncode == 3, result.stderr[-6000:]
  assert re.fullmatch(
      r"dist_train: error: loss spike in steps 7-8: loss \S+ above "
      r"--loss_upper_bound=10; no checkpoint of these steps was written "
      r"\(--recovery_max_trials recovers from it\)",
      processes.error_line(result))
  assert _recoveries(dirs["refused"]) == []
  assert _checkpoint_steps(dirs["refused"]) == [4]


def test_a_nan_spike_is_recovered_and_no_nan_is_saved(runs):
  """The NaN batch turns the weights NaN; the rollback comes before any
  save, so every checkpoint holds finite numbers only: those of the first
  epoch, recovered, and of step 12, the last before the spike the run gave
  up on."""
  dirs, _ = runs
  [recovery] = _recoveries(dirs["nan"])
  assert _window(recovery) == {
      "spike_step": 8, "rolled_back_to_step": 4, "batches_skipped": 4,
      "first_skipped": [1, 5], "last_skipped": [1, 8]}
  assert (recovery["loss"], recovery["reason"]) == (
      "nan", "loss=nan, task_loss=nan")
  for step in (4, 8, 12):
    for name, value in _float_tensors(dirs["nan"], step).items():
      assert np.all(np.isfinite(value)), (step, name)
  assert _max_difference(_float_tensors(dirs["nan"], 8),
                         _float_tensors(dirs["reference"], 8)) <= TOLERANCE


def test_a_spike_before_the_first_checkpoint_exits_3(runs):
  """The initial weights are not kept: with no checkpoint to roll back to,
  the run stops as without recovery, saying why."""
  dirs, results = runs
  result = results["early"]
  assert result.returncode == 3, result.stderr[-6000:]
  assert re.fullmatch(
      r"dist_train: error: loss spike in steps 1-2: loss \S+ above "
      r"--loss_upper_bound=10; no checkpoint to roll back to \(the spike "
      r"came before the first one; --checkpoint_every_steps saves sooner\)",
      processes.error_line(result))
  assert not os.path.exists(os.path.join(dirs["early"], "checkpoints",
                                         "checkpoint"))


def test_two_workers_agree_on_a_spike_only_one_of_them_saw(runs):
  dirs, results = runs
  returncodes, outputs = results["two_workers"]
  assert returncodes == [0, 0], "\n".join(o[-4000:] for o in outputs)
  model_dir = dirs["two_workers"]
  # Each worker restored the checkpoint of step 4 in the middle of the run.
  for output in outputs:
    assert re.search(r"Restored from \S+/ckpt-4 \(epoch 0, step in epoch 4\)",
                     output), output[-4000:]
  # The chief's own bound was not crossed: it rolled back on the agreement.
  assert ("Loss spike at step 8 (seen by another worker): rolled back to "
          "step 4 and skipped 4 global batches (epoch 1 step 5 to epoch 1 "
          "step 8); recovery 1 of 1") in outputs[0]
  [recovery] = _recoveries(model_dir)
  assert _window(recovery) == {
      "spike_step": 8, "rolled_back_to_step": 4, "batches_skipped": 4,
      "first_skipped": [1, 5], "last_skipped": [1, 8]}
  assert recovery["reason"] == "seen by another worker"
  difference = _max_difference(_float_tensors(model_dir, 8),
                               _float_tensors(dirs["reference"], 8))
  print(f"2 workers vs the 1-replica reference: {difference:.2e}")
  assert difference <= WORKERS_TOLERANCE
