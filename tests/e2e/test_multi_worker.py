"""MultiWorkerMirroredStrategy with real worker processes on loopback.

On CPU each worker is one replica. The parity runs train the reference_sum
case of `parity_run.py`: 65-example global batches split 32/33 over 2 workers
and 21/22/22 over 3, and the last batch of each epoch holds 2 examples, split
1/1 and 0/1/1, so a worker gets an empty slice. Every global step must still
consume exactly the single-device batch. The single-device reference runs
through `parity_run.py`, which records its initial weights: the compared
weights must have moved from them by far more than the tolerance.

Workers listen on ports found free beforehand (TensorFlow binds the port of
its TF_CONFIG itself): a worker whose port another process took in between
fails with "Could not start gRPC server", and the cluster is started again.
Every test checks that no process is left behind.
"""

import os
import re
import shlex
import signal
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from dist_train.outputs import summaries
from tests.helpers import parity
from tests.helpers import processes

PARITY_CASE = parity.PARITY_CASE
PARITY_FLAGS = parity.PARITY_FLAGS
COLLECTIVE_TIMEOUT_S = processes.COLLECTIVE_TIMEOUT_S
# The single-device reference: trained once for the session.
PARITY_RUNS = {1: [PARITY_CASE]}


def run_reference(parity_runs):
  """The single-device run of PARITY_CASE, from the session's parity runs.

  Returns:
    (its model_dir, the result parity_run.py saved).
  """
  output_dir, results = parity_runs
  return (os.path.join(output_dir, f"{PARITY_CASE}_1"),
          results[(PARITY_CASE, 1)])


def recorded_hparams(model_dir):
  """{name: value} of the run description the chief wrote to TensorBoard."""
  accumulator = event_accumulator.EventAccumulator(
      os.path.join(model_dir, "train"),
      size_guidance={event_accumulator.TENSORS: 0})
  accumulator.Reload()
  content = accumulator.PluginTagToContent("hparams")
  data = plugin_data_pb2.HParamsPluginData.FromString(
      content["_hparams_/session_start_info"])
  return {name: getattr(value, value.WhichOneof("kind"))
          for name, value in data.session_start_info.hparams.items()}


def _computed(tags):
  """The tags of what the run computed: not its speed, its memory or its
  workers' times, which depend on the machine."""
  return sorted(tag for tag in tags
                if tag not in ("examples_per_second", "steps_per_second")
                and not tag.startswith(("memory/", "worker_")))


def assert_same_scalars(a_dir, b_dir):
  """The two runs wrote the same training and validation scalars (but
  throughput, memory and worker times), at the same steps: the gradient and
  weight norms too."""
  for split in ("train", "validation"):
    a = summaries.read_scalars(os.path.join(a_dir, split))
    b = summaries.read_scalars(os.path.join(b_dir, split))
    tags = _computed(a)
    assert tags and tags == _computed(b)
    for tag in tags:
      assert [step for step, _ in a[tag]] == [step for step, _ in b[tag]]
      np.testing.assert_allclose([v for _, v in a[tag]],
                                 [v for _, v in b[tag]], atol=1e-5,
                                 err_msg=f"{split}/{tag}")


def _run_two_workers_with_launcher(model_dir, temp_dir):
  """Through `launch.local`, with the ring all-reduce asked for by name (the
  SLURM step leaves it at auto); the workers' temporary files go to
  temp_dir."""
  # --traceback also keeps TensorFlow's INFO lines, among them the one
  # saying which collective the strategy uses.
  launch = processes.Launch(
      2, [*PARITY_FLAGS, f"--model_dir={model_dir}", "--collective=ring",
          "--traceback", f"--collective_timeout_s={COLLECTIVE_TIMEOUT_S}"],
      # The event files are named by the chief's pid, which the launcher
      # prints: the workers are its own children.
      env_overrides={"TMPDIR": temp_dir}, prewarmed=False)
  launch.wait(timeout=300)
  return launch


def _run_three_workers_as_a_slurm_step(model_dir):
  """Three `dist_train.main` tasks of a fake srun step on this host."""
  def make_workers():
    port_base = processes.consecutive_free_ports(3)
    return [processes.Streamed(
        [*processes.python_command(), "-m", "dist_train.main", *PARITY_FLAGS,
         f"--model_dir={model_dir}", f"--slurm_port_base={port_base}",
         f"--collective_timeout_s={COLLECTIVE_TIMEOUT_S}"],
        processes.subprocess_env({
            "SLURM_PROCID": str(proc_id), "SLURM_STEP_NUM_TASKS": "3",
            "SLURM_STEP_NODELIST": "127.0.0.1",
            "SLURM_STEP_TASKS_PER_NODE": "3"})) for proc_id in range(3)]

  tasks = processes.start_cluster(make_workers, until=lambda ps: all(
      p.ended() for p in ps), timeout=300)
  return [t.process.returncode for t in tasks], [t.output for t in tasks]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, parity_runs):
  """The 2-worker run, then the 3 workers, beside the session's reference."""
  root = tmp_path_factory.mktemp("multi_worker")
  dirs = {name: str(root / name) for name in
          ("two_workers", "three_workers", "worker_tmp")}
  os.makedirs(dirs["worker_tmp"])
  results = {"reference": run_reference(parity_runs),
             "two_workers": _run_two_workers_with_launcher(
                 dirs["two_workers"], dirs["worker_tmp"])}
  results["three_workers"] = _run_three_workers_as_a_slurm_step(
      dirs["three_workers"])
  for name in ("two_workers", "three_workers"):
    assert processes.running_processes_mentioning(dirs[name]) == [], name
  return dirs, results


def _assert_matches_one_device(runs, name, num_workers):
  dirs, results = runs
  reference_dir, reference = results["reference"]
  assert (int(reference["num_replicas"]), int(reference["num_workers"])) == (
      1, 1)
  recorded = recorded_hparams(dirs[name])
  assert (recorded["num_replicas"], recorded["num_workers"]) == (
      num_workers, num_workers)
  difference = parity.max_checkpoint_difference(reference_dir, dirs[name],
                                                reference)
  print(f"{num_workers} workers vs 1 device: max weight difference "
        f"{difference:.2e}")
  assert difference < parity.TOLERANCE
  # Metrics are aggregated over the workers, as over local replicas.
  assert_same_scalars(reference_dir, dirs[name])


def test_two_workers_on_the_ring_collective_match_one_device(runs):
  launch = runs[1]["two_workers"]
  assert launch.process.returncode == 0, launch.output[-6000:]
  for index in (0, 1):
    log = "".join(launch.worker_lines(index))
    assert re.search(r"MultiWorkerMirroredStrategy with 2 replica\(s\) on 2 "
                     rf"worker\(s\); this is task worker:{index}.*; "
                     r"collective ring,", log), log[-3000:]
    # What TensorFlow's strategy says it uses.
    assert "communication = CommunicationImplementation.RING" in log
  _assert_matches_one_device(runs, "two_workers", 2)


def test_three_workers_of_a_slurm_step_match_one_device(runs):
  returncodes, logs = runs[1]["three_workers"]
  assert returncodes == [0, 0, 0], logs[0][-6000:]
  for proc_id, log in enumerate(logs):
    assert re.search(
        rf"with 3 replica\(s\) on 3 worker\(s\); this is task worker:{proc_id}"
        r".*; collective auto,", log), log[-3000:]
  _assert_matches_one_device(runs, "three_workers", 3)


def _event_files(model_dir):
  return sorted(os.path.join(d, f) for d, _, files in os.walk(model_dir)
                for f in files if ".tfevents." in f)


def _scalar_steps(directory, tag):
  accumulator = event_accumulator.EventAccumulator(
      directory, size_guidance={event_accumulator.TENSORS: 0})
  accumulator.Reload()
  return [event.step for event in accumulator.Tensors(tag)]


def test_only_the_chief_writes_events_and_checkpoints(runs):
  dirs, results = runs
  launch = results["two_workers"]
  model_dir = dirs["two_workers"]
  pids = launch.worker_pids()
  event_files = _event_files(model_dir)
  # One writer per split, each named by the chief's pid.
  assert [os.path.relpath(os.path.dirname(f), model_dir)
          for f in event_files] == ["train", "validation"]
  assert all(f".{pids[0]}." in os.path.basename(f) for f in event_files)
  assert _scalar_steps(os.path.join(model_dir, "train"),
                       "loss") == [4, 8, 12, 16, 20]
  assert _scalar_steps(os.path.join(model_dir, "validation"),
                       "accuracy") == [11, 22]

  checkpoint_dir = os.path.join(model_dir, "checkpoints")
  assert sorted(os.listdir(checkpoint_dir)) == [
      "checkpoint", "ckpt-11.data-00000-of-00001", "ckpt-11.index",
      "ckpt-22.data-00000-of-00001", "ckpt-22.index"]
  # Worker 1 saved too (collectives need every worker), into temporary
  # directories it removed.
  removed = [line for line in launch.worker_lines(1)
             if "Saved this worker's copy of the checkpoint" in line]
  assert len(removed) == 2, launch.output[-6000:]
  assert os.listdir(dirs["worker_tmp"]) == []

  # The console summary is the chief's; worker 1 only says who it is.
  assert any("step 20 | epoch 2/2 | loss" in line
             for line in launch.worker_lines(0))
  assert not any(re.search(r"\| loss|done at step", line)
                 for line in launch.worker_lines(1))
  assert any("this is task worker:1 (not the chief" in line
             for line in launch.worker_lines(1))


def _long_run_flags(model_dir, collective_timeout_s):
  """A run far longer than the tests wait: killed or stopped mid-way."""
  return ["--dataset=synthetic", "--num_train_examples=2000",
          "--num_validation_examples=100", "--global_batch_size=64",
          "--epochs=1000", "--log_every_steps=5", "--steps_per_loop=5",
          "--learning_rate=0.01", f"--model_dir={model_dir}",
          f"--collective_timeout_s={collective_timeout_s}",
          processes.NO_HEALTH]


@pytest.mark.parametrize("stop_signal, collective_timeout_s", [
    # A dead worker: the launcher sees it exit.
    (signal.SIGKILL, COLLECTIVE_TIMEOUT_S),
    # A stuck worker: the launcher sees nothing; its peer must fail the run.
    (signal.SIGSTOP, 20),
], ids=["dead_worker", "stuck_worker"])
def test_a_failed_worker_ends_the_run_within_the_bound(tmp_path, stop_signal,
                                                       collective_timeout_s):
  model_dir = str(tmp_path / "run")
  # SIGSTOP must stop the worker itself, not a stand-in for it.
  launch = processes.Launch(
      2, _long_run_flags(model_dir, collective_timeout_s),
      prewarmed=stop_signal != signal.SIGSTOP)
  try:
    launch.wait_for_line(r"^\[worker 0\] .*step 10 \| epoch 1/1000", 240)
    pids = launch.worker_pids()
    os.kill(pids[1], stop_signal)
    stopped = time.monotonic()
    bound = collective_timeout_s + 30
    returncode = launch.wait(timeout=bound + 60)
    seconds = time.monotonic() - stopped
  finally:
    if launch.process.poll() is None:
      launch.process.kill()
      launch.wait(timeout=60)
  print(f"{stop_signal.name} to worker 1: the launcher exited {returncode} "
        f"after {seconds:.1f}s (bound {bound}s)")
  assert returncode == 1, launch.output[-6000:]
  assert seconds < bound, launch.output[-6000:]
  if stop_signal == signal.SIGKILL:
    assert (f"[launcher] worker 1 (pid {pids[1]}) failed: it was killed by "
            "SIGKILL; stopping the other 1 worker(s)") in launch.output
  else:
    assert (f"[launcher] worker 0 (pid {pids[0]}) failed: it exited with code "
            "1") in launch.output
    # Whichever comes first: the collective timeout, or the coordination
    # service missing worker 1's heartbeats.
    assert re.search(r"Collective has timed out|tasks are unhealthy",
                     "".join(launch.worker_lines(0))), launch.output[-6000:]
    # Worker 1, resumed, either dies of the SIGTERM or, handling it as a
    # preemption request, fails on its lost peer first.
    assert re.search(
        rf"\[launcher\] stopped worker 1 \(pid {pids[1]}\): it (was killed "
        r"by SIGTERM|exited with code 1)", launch.output), launch.output[-6000:]
  assert processes.running_processes_mentioning(model_dir) == []
  assert not any(os.path.exists(f"/proc/{pid}") for pid in pids.values())


def test_a_dead_worker_is_noticed_by_its_peer_without_a_launcher(tmp_path):
  """Two `dist_train.main` processes with their own TF_CONFIG and no launcher
  to stop them: SIGKILL to worker 1 must end worker 0 by itself, with one
  error line, within the collective timeout and a margin."""
  model_dir = str(tmp_path / "run")
  collective_timeout_s = 20
  flags = _long_run_flags(model_dir, collective_timeout_s)

  def chief_at_step_10(started):
    assert not any(p.ended() for p in started), "\n".join(
        p.output[-3000:] for p in started)
    return started[0].find_line(r"step 10 \| epoch 1/1000")

  chief, worker = processes.start_workers(
      [flags] * 2, until=chief_at_step_10, timeout=240)
  try:
    worker.process.kill()
    killed = time.monotonic()
    bound = collective_timeout_s + 30
    returncode = chief.wait(timeout=bound + 60)
    seconds = time.monotonic() - killed
  finally:
    chief.stop()
    worker.stop()
  print(f"SIGKILL to worker 1: worker 0 exited {returncode} after "
        f"{seconds:.1f}s (bound {bound}s)")
  assert returncode == 1, chief.output[-6000:]
  assert seconds < bound, chief.output[-6000:]
  errors = [line for line in chief.lines
            if line.startswith("dist_train: error: ")]
  assert len(errors) == 1, chief.output[-6000:]
  # The coordination service missing worker 1's heartbeats, or a collective
  # timing out or losing its connection: whichever comes first.
  assert re.search(
      r"unhealthy|Collective has timed out|Connection reset|Socket closed",
      errors[0]), errors[0]
  assert processes.running_processes_mentioning(model_dir) == []


def test_docs_two_worker_example_runs(tmp_path):
  """The local example of docs/scaling-out.md, as printed."""
  with open(os.path.join(processes.REPO_ROOT, "docs", "scaling-out.md")) as f:
    page = f.read()
  section = page[page.index("## Several workers on one machine"):]
  command = next(block for block in re.findall(r"```sh\n(.*?)```", section,
                                               re.S)
                 if "launch.local" in block)
  args = shlex.split(command.replace("\\\n", " "))
  assert args[:3] == ["python", "-m", "launch.local"], args
  model_dir = str(tmp_path / "two_workers")
  args = [re.sub(r"^--model_dir=.*", f"--model_dir={model_dir}", a)
          for a in args[3:]]
  assert f"--model_dir={model_dir}" in args
  launch = processes.Launch(None, args)
  assert launch.wait(timeout=300) == 0, launch.output[-6000:]
  final = processes.final_metrics("".join(launch.worker_lines(0)), epochs=10)
  accuracy = float(re.search(r"validation loss \S+ accuracy (\S+)",
                             final).group(1))
  assert accuracy >= 0.9, final
  assert processes.running_processes_mentioning(model_dir) == []
