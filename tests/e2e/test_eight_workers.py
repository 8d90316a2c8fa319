"""Eight workers on this machine, one CPU replica each: the agreements that
hold two workers together hold eight.

- A run stopped by the time limit (`--max_runtime_s=1` has passed by the
  first loop boundary) stops all 8 at one step with the resumable exit code,
  and resumed it ends with the one-device weights. The parity case splits
  its 65-example batches 8 x 8 + 9, and the last batch of each epoch (2
  examples) leaves six workers empty.
- SIGTERM to one worker (as when a scheduler preempts one node) stops all
  8 at one agreed step, saved, exit 75.
- A SIGKILLed worker, with no launcher to stop the others, is noticed by
  each of the other 7 within --collective_timeout_s (and a margin).

The seconds from each signal to each worker's exit are printed.
"""

import os
import signal
import time

from dist_train import errors
from tests.helpers import parity
from tests.helpers import processes

NUM_WORKERS = 8
PARITY_RUNS = {1: [parity.PARITY_CASE]}  # The one-device reference.
# Generous: 8 workers share 2 cores.
TIMEOUT_FLAG = f"--collective_timeout_s={processes.COLLECTIVE_TIMEOUT_S}"


def _long_run_flags(model_dir, collective_timeout_s):
  """A run far longer than the tests wait: stopped mid-way."""
  return ["--dataset=synthetic", "--num_train_examples=4000",
          "--num_validation_examples=64", "--global_batch_size=64",
          "--epochs=1000", "--log_every_steps=5", "--steps_per_loop=5",
          "--learning_rate=0.01", f"--model_dir={model_dir}",
          f"--collective_timeout_s={collective_timeout_s}",
          processes.NO_HEALTH]


def _exited(pid):
  """True once `pid` ended (a zombie not yet reaped counts as ended)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
  except FileNotFoundError:
    return True


def _seconds_to_exit(pids, since, timeout):
  """{pid: seconds from `since` to its exit}, polling every 10 ms."""
  seconds = {}
  deadline = time.monotonic() + timeout
  while len(seconds) < len(pids) and time.monotonic() < deadline:
    for pid in pids:
      if pid not in seconds and _exited(pid):
        seconds[pid] = time.monotonic() - since
    time.sleep(0.01)
  return seconds


def test_time_limit_stops_all_eight_and_the_resumed_run_is_one_devices(
    tmp_path, parity_runs):
  output_dir, results = parity_runs
  reference_dir = os.path.join(output_dir, f"{parity.PARITY_CASE}_1")
  reference = results[(parity.PARITY_CASE, 1)]
  model_dir = tmp_path / "run"
  flags = [*parity.PARITY_FLAGS, TIMEOUT_FLAG, f"--model_dir={model_dir}",
           processes.NO_HEALTH]

  limited = processes.Launch(NUM_WORKERS, [*flags, "--max_runtime_s=1"])
  assert limited.wait(timeout=600) == errors.EXIT_PREEMPTED, (
      limited.output[-6000:])
  step = limited.stop_step("after the time limit of 1 s",
                           num_workers=NUM_WORKERS)
  assert 0 < step < parity.STEPS

  resumed = processes.Launch(NUM_WORKERS, [*flags, "--max_runtime_s=3600"])
  assert resumed.wait(timeout=600) == 0, resumed.output[-6000:]
  assert f"Resuming at step {step} " in "".join(resumed.worker_lines(0))
  assert "with 8 replica(s) on 8 worker(s)" in resumed.output
  difference = parity.max_checkpoint_difference(str(model_dir), reference_dir,
                                                reference)
  print(f"8 workers, time limit at step {step}, resumed: max difference "
        f"from 1 device {difference:.2e}")
  assert difference < parity.TOLERANCE


def test_sigterm_to_one_of_eight_stops_all_at_one_step(tmp_path):
  model_dir = tmp_path / "run"
  launch = processes.Launch(
      NUM_WORKERS, _long_run_flags(model_dir, processes.COLLECTIVE_TIMEOUT_S))
  try:
    launch.wait_for_line(r"^\[worker 0\] .*step 10 \| epoch 1/1000", 600)
    pids = launch.worker_pids()
    assert len(pids) == NUM_WORKERS
    os.kill(pids[5], signal.SIGTERM)
    sent = time.monotonic()
    seconds = _seconds_to_exit(list(pids.values()), sent, timeout=180)
    returncode = launch.wait(timeout=120)
  finally:
    if launch.process.poll() is None:
      launch.process.kill()
      launch.wait(timeout=60)
  print("SIGTERM to worker 5 of 8: seconds to each worker's exit: " +
        ", ".join(f"worker {i} {seconds.get(pid, float('nan')):.1f}"
                  for i, pid in sorted(pids.items())))
  assert returncode == errors.EXIT_PREEMPTED, launch.output[-6000:]
  assert len(seconds) == NUM_WORKERS
  step = launch.stop_step("preempted by SIGTERM", num_workers=NUM_WORKERS)
  assert os.path.exists(model_dir / "checkpoints" / f"ckpt-{step}.index")
  assert processes.running_processes_mentioning(str(model_dir)) == []


def test_a_killed_worker_is_noticed_by_the_other_seven(tmp_path):
  """No launcher: each of the other 7 must end by itself, with one error
  line, within the collective timeout and a margin."""
  model_dir = str(tmp_path / "run")
  collective_timeout_s = 30
  flags = _long_run_flags(model_dir, collective_timeout_s)

  def chief_at_step_10(started):
    assert not any(p.ended() for p in started), "\n".join(
        p.output[-3000:] for p in started)
    return started[0].find_line(r"step 10 \| epoch 1/1000")

  started = processes.start_workers([flags] * NUM_WORKERS,
                                    until=chief_at_step_10,
                                    timeout=600)
  others = [p for i, p in enumerate(started) if i != 3]
  bound = collective_timeout_s + 30
  try:
    started[3].process.kill()
    killed = time.monotonic()
    seconds = _seconds_to_exit([p.process.pid for p in others], killed,
                               timeout=bound + 60)
    returncodes = [p.wait(timeout=60) for p in others]
  finally:
    for process in started:
      process.stop()
  print("SIGKILL to worker 3 of 8: seconds to each other worker's exit: " +
        ", ".join(f"{s:.1f}" for s in seconds.values()))
  assert returncodes == [1] * (NUM_WORKERS - 1), [
      p.output[-2000:] for p in others]
  assert len(seconds) == NUM_WORKERS - 1
  assert max(seconds.values()) < bound
  for process in others:
    errors_seen = [line for line in process.lines
                   if line.startswith("dist_train: error: ")]
    assert len(errors_seen) == 1, process.output[-3000:]
  assert processes.running_processes_mentioning(model_dir) == []
