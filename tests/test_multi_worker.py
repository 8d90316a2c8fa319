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

import concurrent.futures
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from launch import workers
from dist_train.outputs import summaries
from tests import conftest
from tests import parity_run
from tests import test_parity

PARITY_CASE = "reference_sum"
STEPS = 22  # 11 an epoch, 2 epochs.
NUM_WEIGHTS = 6  # 3 Dense layers: kernels and biases.
# Generous: on 2 busy cores one worker may trace for seconds while the others
# wait in a collective.
COLLECTIVE_TIMEOUT_S = 120
PARITY_FLAGS = parity_run.cli_flags(PARITY_CASE)


# What a worker prints when it cannot bind the port its TF_CONFIG gives it.
PORT_CLASH = "Could not start gRPC server"
# How often a cluster is started again on other ports after a port clash.
PORT_CLASH_RESTARTS = 2


class Streamed:
  """A process whose output (stdout and stderr) is collected as it comes."""

  def __init__(self, command, env):
    self.process = subprocess.Popen(
        command, cwd=conftest.REPO_ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    self.lines = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.process.stdout:
      self.lines.append(line)

  @property
  def output(self):
    return "".join(self.lines)

  def find_line(self, pattern):
    """The first output line so far matching `pattern`, or None."""
    return next((line for line in list(self.lines)
                 if re.search(pattern, line)), None)

  def ended(self):
    """True once the process exited and all its output was read."""
    if self.process.poll() is None:
      return False
    self._reader.join(timeout=10)
    return True

  def port_clash(self):
    """True if the process ended because a port was taken."""
    return self.ended() and PORT_CLASH in self.output

  def wait_for_line(self, pattern, timeout):
    """The first output line matching `pattern`, waiting up to `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      line = self.find_line(pattern)
      if line:
        return line
      if self.ended():
        line = self.find_line(pattern)
        if line:
          return line
        break
      time.sleep(0.1)
    raise AssertionError(f"no line matches {pattern!r}:\n{self.output[-6000:]}")

  def stop(self):
    """Kills the process unless it ended, and waits for it."""
    if self.process.poll() is None:
      self.process.kill()
    self.process.wait(timeout=60)
    self._reader.join(timeout=10)

  def wait(self, timeout):
    try:
      self.process.wait(timeout=timeout)
    finally:
      if self.process.poll() is None:
        self.process.terminate()
        self.process.wait(timeout=60)
      self._reader.join(timeout=10)
    return self.process.returncode


class Launch(Streamed):
  """A `python -m launch.local` process, its output collected as it comes.

  When a worker could not bind its port, the launcher fails at once; it is
  started again (it picks other ports) instead of failing the test.
  """

  def __init__(self, num_workers, args, env_overrides=None):
    """Runs `launch.local --num_workers=N -- ARGS`, or with ARGS alone."""
    if num_workers is not None:
      args = [f"--num_workers={num_workers}", "--", *args]
    self._command = [sys.executable, "-m", "launch.local", *args]
    self._env = conftest.subprocess_env(env_overrides)
    self._restarts = PORT_CLASH_RESTARTS
    super().__init__(self._command, self._env)

  def _restarted(self):
    """Starts the launcher again if it ended on a port clash."""
    if self._restarts == 0 or not self.port_clash():
      return False
    self._restarts -= 1
    super().__init__(self._command, self._env)
    return True

  def wait_for_line(self, pattern, timeout):
    deadline = time.monotonic() + timeout
    while True:
      try:
        return super().wait_for_line(
            pattern, max(0.0, deadline - time.monotonic()))
      except AssertionError:
        if not self._restarted():
          raise

  def wait(self, timeout):
    deadline = time.monotonic() + timeout
    while True:
      returncode = super().wait(max(0.0, deadline - time.monotonic()))
      if not self._restarted():
        return returncode

  def worker_pids(self):
    """{worker index: pid} from the launcher's `started worker` lines."""
    return {int(i): int(pid) for i, pid in re.findall(
        r"\[launcher\] started worker (\d+) \(pid (\d+)\)", self.output)}

  def worker_lines(self, index):
    prefix = f"[worker {index}] "
    return [line[len(prefix):] for line in self.lines
            if line.startswith(prefix)]


def start_cluster(make_workers, until, timeout):
  """Starts the `dist_train.main` workers of one cluster, without a launcher.

  Args:
    make_workers: () -> [Streamed], each worker with its TF_CONFIG (or SLURM
      step) on ports found free now.
    until: [Streamed] -> bool, what to wait for.
    timeout: seconds to wait for it.

  Returns:
    The workers, once `until` holds. On a port clash they are stopped and
    made again, on other ports.
  """
  for _ in range(1 + PORT_CLASH_RESTARTS):
    processes = make_workers()
    deadline = time.monotonic() + timeout
    try:
      while not any(p.port_clash() for p in processes):
        if until(processes):
          return processes
        assert time.monotonic() < deadline, "\n".join(
            p.output[-3000:] for p in processes)
        time.sleep(0.1)
    except BaseException:
      for process in processes:
        process.stop()
      raise
    for process in processes:
      process.stop()
  raise AssertionError(f"{PORT_CLASH} on {1 + PORT_CLASH_RESTARTS} tries")


def _running_processes_mentioning(text):
  """Pids of the running processes whose command line contains `text`."""
  pids = []
  for entry in os.listdir("/proc"):
    if not entry.isdigit() or int(entry) == os.getpid():
      continue
    try:
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        cmdline = f.read().decode(errors="replace")
      with open(f"/proc/{entry}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
      continue
    if text in cmdline and state != "Z":
      pids.append(int(entry))
  return pids


def _checkpoint_values(model_dir):
  """(step, {name: array}) of the latest checkpoint in model_dir."""
  path = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
  assert path is not None, f"no checkpoint in {model_dir}"
  reader = tf.train.load_checkpoint(path)
  values = {name: reader.get_tensor(name)
            for name in reader.get_variable_to_shape_map()
            if name != "_CHECKPOINTABLE_OBJECT_GRAPH"}
  return int(path.rsplit("-", 1)[1]), values


def checkpoint_weights(values):
  """The model's trainable variables in model order, from checkpoint values
  (the checkpoint reaches them through the optimizer, which lists them)."""
  return [values[f"optimizer/_trainable_variables/{i}/.ATTRIBUTES/"
                 "VARIABLE_VALUE"] for i in range(NUM_WEIGHTS)]


def max_checkpoint_difference(a_dir, b_dir, reference):
  """The largest difference between the values of the latest checkpoints in
  a_dir and b_dir (weights, global step, epoch, step in epoch), after
  checking that both ran STEPS steps and moved far from `reference`'s
  initial weights (a parity_run.py result)."""
  (a_step, a), (b_step, b) = _checkpoint_values(a_dir), _checkpoint_values(
      b_dir)
  assert a_step == b_step == STEPS
  assert sorted(a) == sorted(b)
  initial = test_parity.initial_weights(reference)
  for values in (a, b):
    moved = test_parity.max_difference(checkpoint_weights(values), initial)
    print(f"moved {moved:.2e} from the initial weights")
    assert moved > test_parity.MIN_MOVED
  # save_counter counts saves, which --checkpoint_every_steps changes.
  return max(float(np.max(np.abs(a[name] - b[name]))) for name in a
             if not name.startswith("save_counter/"))


def run_reference(output_dir):
  """The single-device run of PARITY_CASE through parity_run.py.

  Returns:
    (its model_dir, the result parity_run.py saved).
  """
  results = test_parity.train(output_dir, [PARITY_CASE], 1)
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


def assert_same_scalars(a_dir, b_dir):
  """The two runs wrote the same training and validation scalars (but
  throughput), at the same steps."""
  for split in ("train", "validation"):
    a = summaries.read_scalars(os.path.join(a_dir, split))
    b = summaries.read_scalars(os.path.join(b_dir, split))
    tags = sorted(set(a) - {"examples_per_second", "steps_per_second"})
    assert tags and tags == sorted(
        set(b) - {"examples_per_second", "steps_per_second"})
    for tag in tags:
      assert [step for step, _ in a[tag]] == [step for step, _ in b[tag]]
      np.testing.assert_allclose([v for _, v in a[tag]],
                                 [v for _, v in b[tag]], atol=1e-5,
                                 err_msg=f"{split}/{tag}")


def _final_metrics(log, epochs=2):
  """What follows the step in the last epoch's `done` line: `train loss ...`."""
  lines = re.findall(rf"epoch {epochs}/{epochs} done at step \d+ \| (.*)", log)
  assert lines, log[-6000:]
  return lines[-1].strip()


def _consecutive_free_ports(count):
  """A first port such that it and the next count - 1 are free on loopback."""
  for _ in range(100):
    with socket.socket() as probe:
      probe.bind(("127.0.0.1", 0))
      first = probe.getsockname()[1]
    if first + count > 65535:
      continue
    sockets = []
    try:
      for port in range(first, first + count):
        s = socket.socket()
        sockets.append(s)
        s.bind(("127.0.0.1", port))
      return first
    except OSError:
      continue
    finally:
      for s in sockets:
        s.close()
  raise RuntimeError(f"found no {count} consecutive free ports")


def _run_two_workers_with_launcher(model_dir, temp_dir):
  """Through `launch.local`, with the ring all-reduce asked for by name (the
  SLURM step leaves it at auto); the workers' temporary files go to
  temp_dir."""
  # --traceback also keeps TensorFlow's INFO lines, among them the one
  # saying which collective the strategy uses.
  launch = Launch(2, [*PARITY_FLAGS, f"--model_dir={model_dir}",
                      "--collective=ring", "--traceback",
                      f"--collective_timeout_s={COLLECTIVE_TIMEOUT_S}"],
                  env_overrides={"TMPDIR": temp_dir})
  launch.wait(timeout=300)
  return launch


def _run_three_workers_as_a_slurm_step(model_dir):
  """Three `dist_train.main` tasks of a fake srun step on this host."""
  def make_workers():
    port_base = _consecutive_free_ports(3)
    return [Streamed(
        [sys.executable, "-m", "dist_train.main", *PARITY_FLAGS,
         f"--model_dir={model_dir}", f"--slurm_port_base={port_base}",
         f"--collective_timeout_s={COLLECTIVE_TIMEOUT_S}"],
        conftest.subprocess_env({
            "SLURM_PROCID": str(proc_id), "SLURM_STEP_NUM_TASKS": "3",
            "SLURM_STEP_NODELIST": "127.0.0.1",
            "SLURM_STEP_TASKS_PER_NODE": "3"})) for proc_id in range(3)]

  tasks = start_cluster(make_workers, until=lambda ps: all(
      p.ended() for p in ps), timeout=300)
  return [t.process.returncode for t in tasks], [t.output for t in tasks]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The reference and the 2-worker run side by side, then the 3 workers."""
  root = tmp_path_factory.mktemp("multi_worker")
  dirs = {name: str(root / name) for name in
          ("reference", "two_workers", "three_workers", "worker_tmp")}
  os.makedirs(dirs["worker_tmp"])
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    reference = pool.submit(run_reference, dirs["reference"])
    two = pool.submit(_run_two_workers_with_launcher, dirs["two_workers"],
                      dirs["worker_tmp"])
    results = {"reference": reference.result(), "two_workers": two.result()}
  results["three_workers"] = _run_three_workers_as_a_slurm_step(
      dirs["three_workers"])
  for name in ("two_workers", "three_workers"):
    assert _running_processes_mentioning(dirs[name]) == [], name
  return dirs, results


def _assert_matches_one_device(runs, name, num_workers):
  dirs, results = runs
  reference_dir, reference = results["reference"]
  assert (int(reference["num_replicas"]), int(reference["num_workers"])) == (
      1, 1)
  recorded = recorded_hparams(dirs[name])
  assert (recorded["num_replicas"], recorded["num_workers"]) == (
      num_workers, num_workers)
  difference = max_checkpoint_difference(reference_dir, dirs[name], reference)
  print(f"{num_workers} workers vs 1 device: max weight difference "
        f"{difference:.2e}")
  assert difference < test_parity.TOLERANCE
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
          f"--collective_timeout_s={collective_timeout_s}"]


@pytest.mark.parametrize("stop_signal, collective_timeout_s", [
    # A dead worker: the launcher sees it exit.
    (signal.SIGKILL, COLLECTIVE_TIMEOUT_S),
    # A stuck worker: the launcher sees nothing; its peer must fail the run.
    (signal.SIGSTOP, 20),
], ids=["dead_worker", "stuck_worker"])
def test_a_failed_worker_ends_the_run_within_the_bound(tmp_path, stop_signal,
                                                       collective_timeout_s):
  model_dir = str(tmp_path / "run")
  launch = Launch(2, _long_run_flags(model_dir, collective_timeout_s))
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
  assert _running_processes_mentioning(model_dir) == []
  assert not any(os.path.exists(f"/proc/{pid}") for pid in pids.values())


def test_a_dead_worker_is_noticed_by_its_peer_without_a_launcher(tmp_path):
  """Two `dist_train.main` processes with their own TF_CONFIG and no launcher
  to stop them: SIGKILL to worker 1 must end worker 0 by itself, with one
  error line, within the collective timeout and a margin."""
  model_dir = str(tmp_path / "run")
  collective_timeout_s = 20
  flags = _long_run_flags(model_dir, collective_timeout_s)

  def make_workers():
    envs = workers.local_worker_envs(2, base_env=conftest.subprocess_env())
    return [Streamed(workers.worker_command(flags), env) for env in envs]

  def chief_at_step_10(processes):
    assert not any(p.ended() for p in processes), "\n".join(
        p.output[-3000:] for p in processes)
    return processes[0].find_line(r"step 10 \| epoch 1/1000")

  chief, worker = start_cluster(make_workers, until=chief_at_step_10,
                                timeout=240)
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
  assert re.search(r"unhealthy|Collective has timed out|Connection reset",
                   errors[0]), errors[0]
  assert _running_processes_mentioning(model_dir) == []


def test_docs_two_worker_example_runs(tmp_path):
  """The local example of docs/scaling-out.md, as printed."""
  with open(os.path.join(conftest.REPO_ROOT, "docs", "scaling-out.md")) as f:
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
  launch = Launch(None, args)
  assert launch.wait(timeout=300) == 0, launch.output[-6000:]
  final = _final_metrics("".join(launch.worker_lines(0)), epochs=10)
  accuracy = float(re.search(r"validation loss \S+ accuracy (\S+)",
                             final).group(1))
  assert accuracy >= 0.9, final
  assert _running_processes_mentioning(model_dir) == []
