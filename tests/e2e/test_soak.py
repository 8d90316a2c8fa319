"""A long multi-worker run holds its threads and memory flat.

Two workers (launch.local) run many short epochs, each with a validation
pass, an agreement at every loop boundary and a checkpoint, which is where
resources leaked before: every collective with a TensorFlow timeout held a
thread for the whole timeout. The test samples each worker's /proc status
when the chief reports epoch 20 and again when it reports the last epoch.

A second test stalls one worker's input on purpose: its peer, waiting in the
step's all-reduce, fails the run after --collective_timeout_s with one line
that says so.
"""

import re

from tests.helpers import processes

# 40 epochs after the baseline: the leak this guards against added about 110
# threads per epoch (thousands over this span); scripts/soak.py runs longer.
EPOCHS = 60
BASELINE_EPOCH = 20
# Examples per epoch in global batches of 64: two steps, one partial.
SOAK_FLAGS = ["--dataset=synthetic", "--num_train_examples=100",
              "--num_validation_examples=64", "--global_batch_size=64",
              f"--epochs={EPOCHS}", "--log_every_steps=1000",
              "--steps_per_loop=1"]


def _usage(pid):
  """(threads, resident kB) of a running process."""
  with open(f"/proc/{pid}/status") as f:
    fields = dict(line.split(":", 1) for line in f)
  return int(fields["Threads"]), int(fields["VmRSS"].split()[0])


def test_threads_and_memory_stay_flat_over_many_epochs(tmp_path):
  model_dir = str(tmp_path / "run")
  # Real interpreters: their own /proc is what is sampled.
  launch = processes.Launch(2, [*SOAK_FLAGS, f"--model_dir={model_dir}"],
                            prewarmed=False)
  try:
    launch.wait_for_line(rf"epoch {BASELINE_EPOCH}/{EPOCHS} done", 240)
    pids = sorted(launch.worker_pids().values())
    assert len(pids) == 2, pids
    baseline = {pid: _usage(pid) for pid in pids}
    launch.wait_for_line(rf"epoch {EPOCHS}/{EPOCHS} done", 300)
    last = {pid: _usage(pid) for pid in pids}
  finally:
    returncode = launch.wait(timeout=120)
  report = "; ".join(
      f"worker pid {pid}: threads {baseline[pid][0]} -> {last[pid][0]}, "
      f"RSS {baseline[pid][1] // 1024} -> {last[pid][1] // 1024} MB"
      for pid in pids)
  print(f"epoch {BASELINE_EPOCH} -> epoch {EPOCHS}: {report}")
  assert returncode == 0, launch.output[-6000:]
  for pid in pids:
    threads_before, rss_before = baseline[pid]
    threads_after, rss_after = last[pid]
    assert threads_after <= 1.1 * threads_before, report
    assert rss_after <= 1.1 * rss_before, report
  # No collective runs eagerly at a boundary (an agreement, a metric read).
  assert "eagerly" not in launch.output, launch.output[-6000:]


def test_a_stalled_worker_fails_the_run_after_the_collective_timeout(
    tmp_path):
  """Worker 1 stops in its input check for minutes while its heartbeats go
  on: worker 0 waits in the step's all-reduce until --collective_timeout_s,
  then fails with one line naming the steps it was running."""
  timeout_s = 10
  model_dir = str(tmp_path / "run")
  launch = processes.Launch(2, [
      "--task=tests.helpers.task_fixtures:stalled_worker", "--global_batch_size=16",
      "--epochs=100", "--steps_per_loop=5", "--log_every_steps=5",
      f"--collective_timeout_s={timeout_s}", f"--model_dir={model_dir}",
      processes.NO_HEALTH])
  try:
    line = launch.wait_for_line(r"^\[worker 0\] dist_train: error:", 240)
  finally:
    returncode = launch.wait(timeout=120)
  assert returncode == 1, launch.output[-6000:]
  assert re.search(r"training steps \d+-\d+: .*Collective has timed out: "
                   rf"training steps \d+-\d+ waited more than "
                   rf"--collective_timeout_s={timeout_s}s for a peer worker",
                   line), line
