"""Real processes for the tests: the CLI, helper scripts, launchers, clusters.

Tests of whole runs start `python -m dist_train.main` (or a script of
tests/helpers) as a real process; these are the one place that says how:
from the repository root, without a cluster of the surrounding environment,
with output collected as it comes.
"""

import atexit
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from launch import workers
from tests.helpers import prewarmed as prewarmed_lib


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
FLAGS_DIR = os.path.join(REPO_ROOT, "launch", "flags")

# TensorFlow's C++ start-up banner hides the lines tests assert on; errors
# (level 3) still print.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def subprocess_env(overrides=None):
  # A cluster around the test run (TF_CONFIG, a SLURM job step) would make
  # --strategy=auto multi_worker; tests that want one set their own.
  env = {name: value for name, value in os.environ.items()
         if name != "TF_CONFIG" and not name.startswith("SLURM_")}
  env.update(overrides or {})
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return env


def run_python(args, *, timeout=300, check=False, env_overrides=None,
               prewarmed=None):
  """Runs `python ARGS` from the repository root; returns CompletedProcess.

  `python -m dist_train.main ...` and scripts (`python FILE.py ...`) are
  forked from an interpreter that has imported TensorFlow already
  (tests/helpers/prewarmed.py), unless `prewarmed=False` or the environment
  changes what the imports read; `-c CODE` is forked only with
  `prewarmed=True`. A test of how the interpreter starts (what is imported,
  what TensorFlow prints at start-up) passes `prewarmed=False`.
  """
  env = subprocess_env(env_overrides)
  request = _prewarmed_request(args, env, prewarmed)
  if request is not None:
    result = _prewarmed_server().run(request, timeout)
  else:
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=env,
        capture_output=True, text=True, timeout=timeout)
  if check and result.returncode != 0:
    raise AssertionError(
        f"python {' '.join(args)} exited {result.returncode}:\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
  return result


# Set to 1 to start every test process fresh.
FRESH_PROCESSES = os.environ.get("DIST_TRAIN_TEST_FRESH_PROCESSES") == "1"


def _prewarmed_request(args, env, prewarmed):
  """The request for tests/helpers/prewarmed.py, or None to start fresh."""
  if prewarmed is False or FRESH_PROCESSES or not args:
    return None
  if prewarmed_lib.starts_fresh(env):
    return None
  if args[0] == "-m" and len(args) > 1 and args[1] == "dist_train.main":
    kind, target, rest = "module", args[1], args[2:]
  elif args[0].endswith(".py"):
    # A script of tests/helpers or scripts/, or one a test wrote.
    kind, target, rest = "script", os.path.join(REPO_ROOT, args[0]), args[1:]
  elif args[0] == "-c" and prewarmed and len(args) > 1:
    kind, target, rest = "code", args[1], args[2:]
  else:
    return None
  return {"kind": kind, "target": target, "args": list(rest), "env": env,
          "cwd": REPO_ROOT}


class _PrewarmedServer:
  """This test process's tests/helpers/prewarmed.py server."""

  def __init__(self):
    self._dir = tempfile.mkdtemp(prefix="prewarmed-")
    self.socket_path = os.path.join(self._dir, "socket")
    self._log = open(os.path.join(self._dir, "server.err"), "w")  # pylint: disable=consider-using-with
    self.process = subprocess.Popen(
        [sys.executable, os.path.join(REPO_ROOT, "tests", "helpers",
                                      "prewarmed.py"), self.socket_path],
        cwd=REPO_ROOT, env=subprocess_env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=self._log, text=True)
    ready = self.process.stdout.readline()
    if ready.strip() != "ready":
      raise RuntimeError(f"tests/helpers/prewarmed.py did not start "
                         f"(exit {self.process.poll()}): "
                         f"{_read(os.path.join(self._dir, 'server.err'))}")
    self._count = 0
    self._lock = threading.Lock()
    self.cpu_seconds = 0.0  # Of the runs that ended (not of this server).
    atexit.register(self.close)

  def run(self, request, timeout):
    """Runs `request` in a forked process; a CompletedProcess."""
    with self._lock:
      self._count += 1
      name = os.path.join(self._dir, str(self._count))
    request = {**request, "stdout": name + ".out", "stderr": name + ".err"}
    command = [sys.executable, request["target"] if request["kind"] != "code"
               else "-c", *request["args"]]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
      conn.connect(self.socket_path)
      conn.sendall(json.dumps(request).encode() + b"\n")
      reader = conn.makefile("r")
      pid = json.loads(reader.readline())["pid"]
      conn.settimeout(timeout)
      try:
        line = reader.readline()
      except (socket.timeout, TimeoutError):
        _kill(pid)
        raise subprocess.TimeoutExpired(command, timeout,
                                        output=_read(request["stdout"]),
                                        stderr=_read(request["stderr"]))
    if not line:
      raise RuntimeError(f"tests/helpers/prewarmed.py lost the run {command}")
    reply = json.loads(line)
    returncode = reply["exit"]
    with self._lock:
      self.cpu_seconds += reply["cpu_s"]
    result = subprocess.CompletedProcess(command, returncode,
                                         _read(request["stdout"]),
                                         _read(request["stderr"]))
    for path in (request["stdout"], request["stderr"]):
      os.remove(path)
    return result

  def close(self):
    if self.process.poll() is None:
      self.process.kill()
      self.process.wait()
    self._log.close()
    shutil.rmtree(self._dir, ignore_errors=True)


def _kill(pid):
  try:
    os.kill(pid, signal.SIGKILL)
  except ProcessLookupError:
    pass


def _read(path):
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read()


_SERVER = []
_SERVER_LOCK = threading.Lock()


def prewarmed_cpu_seconds():
  """CPU seconds used by the forked runs of this process so far (those of
  prewarmed_exec.py as well, once they ended)."""
  if not _SERVER:
    return 0.0
  path = os.path.join(os.path.dirname(_SERVER[0].socket_path), "exec_cpu_s")
  try:
    with open(path, encoding="utf-8") as f:
      exec_cpu_s = sum(float(line) for line in f)
  except FileNotFoundError:
    exec_cpu_s = 0.0
  return _SERVER[0].cpu_seconds + exec_cpu_s


def _prewarmed_server():
  with _SERVER_LOCK:
    if not _SERVER or _SERVER[0].process.poll() is not None:
      _SERVER[:] = [_PrewarmedServer()]
    return _SERVER[0]


PREWARMED_EXEC = os.path.join(REPO_ROOT, "tests", "helpers",
                              "prewarmed_exec.py")


def python_command(prewarmed=True):
  """What stands for `python` in a command that another program starts (a
  launcher's workers): the prewarmed stand-in (tests/helpers/prewarmed_exec.py),
  or the interpreter itself with `prewarmed=False`."""
  if not prewarmed or FRESH_PROCESSES:
    return [sys.executable]
  return [sys.executable, PREWARMED_EXEC, _prewarmed_server().socket_path]


def run_cli(*flags, timeout=300, check=False, env_overrides=None):
  """Runs `python -m dist_train.main FLAGS`."""
  return run_python(["-m", "dist_train.main", *flags], timeout=timeout,
                    check=check, env_overrides=env_overrides)


def copy_run(model_dir, destination):
  """A copy of a finished run's model_dir at `destination`, to train on: a
  run made once for the session stays as it was for the other tests."""
  shutil.copytree(model_dir, destination)
  return str(destination)


def error_line(result):
  """The one `dist_train: error:` line a failed run printed."""
  lines = [line for line in result.stderr.splitlines()
           if line.startswith("dist_train: error:")]
  assert len(lines) == 1, result.stderr[-3000:]
  return lines[0]


# Generous: on 2 busy cores one worker may trace for seconds while the others
# wait in a collective.
COLLECTIVE_TIMEOUT_S = 120

# The training-health report (--health_scalars, on by default) off. Runs
# whose subject is neither the report nor the update it must not change
# (proven by the parity runs and the multi-worker parity tests, which keep
# it on) pass this flag: their weights, compared with references trained
# with the report, then also show that it changes no update.
NO_HEALTH = "--health_scalars=false"

# What a worker prints when it cannot bind the port its TF_CONFIG gives it.
PORT_CLASH = "Could not start gRPC server"
# How often a cluster is started again on other ports after a port clash.
PORT_CLASH_RESTARTS = 2


class Streamed:
  """A process whose output (stdout and stderr) is collected as it comes."""

  def __init__(self, command, env):
    self.process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
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

  def __init__(self, num_workers, args, env_overrides=None, prewarmed=True):
    """Runs `launch.local --num_workers=N -- ARGS`, or with ARGS alone.

    The workers are forked from the prewarmed server (`python_command`)
    unless `prewarmed=False`: a test that reads a worker's own process (its
    pid in file names, /proc, SIGSTOP) wants the real interpreter.
    """
    if num_workers is not None:
      args = [f"--num_workers={num_workers}", "--", *args]
    python = python_command(prewarmed)
    if len(python) > 1:
      args = [f"--python={shlex.join(python)}", *args]
    self._command = [sys.executable, "-m", "launch.local", *args]
    self._env = subprocess_env(env_overrides)
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

  def stop_step(self, marker, num_workers=2):
    """The one step at which every worker says it stopped: each worker's
    line containing `marker` names it (`... at step S ...`)."""
    steps = set()
    for worker in range(num_workers):
      [line] = [l for l in self.worker_lines(worker) if marker in l]
      steps.add(int(re.search(r" at step (\d+)", line).group(1)))
    assert len(steps) == 1, steps  # Every worker stopped at the same step.
    return steps.pop()

  def worker_lines(self, index):
    prefix = f"[worker {index}] "
    return [line[len(prefix):] for line in self.lines
            if line.startswith(prefix)]


def run_launch(num_workers, args, *, timeout=600):
  """Runs `launch.local --num_workers=N -- ARGS` to its end, its workers
  prewarmed, started again on a port clash; (returncode, output)."""
  launch = Launch(num_workers, args)
  returncode = launch.wait(timeout=timeout)
  return returncode, launch.output


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


def start_workers(worker_flags, until, timeout):
  """Starts one `dist_train.main` worker per entry of `worker_flags` (its
  flags), each with its own TF_CONFIG on free loopback ports and no launcher
  (forked from the prewarmed server), through `start_cluster`."""
  def make_workers():
    envs = workers.local_worker_envs(len(worker_flags),
                                     base_env=subprocess_env())
    return [Streamed(workers.worker_command(flags, python_command()), env)
            for env, flags in zip(envs, worker_flags)]
  return start_cluster(make_workers, until, timeout)


def running_processes_mentioning(text):
  """Pids of the running processes whose command line contains `text`,
  among them the prewarmed server's live runs (their /proc command line is
  the server's)."""
  pids = []
  if _SERVER:
    live_dir = os.path.join(os.path.dirname(_SERVER[0].socket_path),
                            prewarmed_lib.LIVE)
    for entry in os.listdir(live_dir):
      try:
        with open(os.path.join(live_dir, entry), encoding="utf-8") as f:
          if text in f.read():
            pids.append(int(entry))
      except OSError:  # The run ended meanwhile.
        continue
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


def consecutive_free_ports(count):
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


def final_metrics(log, epochs=2):
  """What follows the step in the last epoch's `done` line: `train loss ...`."""
  lines = re.findall(rf"epoch {epochs}/{epochs} done at step \d+ \| (.*)", log)
  assert lines, log[-6000:]
  return lines[-1].strip()


def wait_for_checkpoint(process, model_dir, step, timeout=180, *,
                        output_fn=None, stop_fn=None):
  """Waits until ckpt-<step> is complete.

  Fails if the run ends first, or stops it (`stop_fn`, default: SIGKILL)
  and fails when `timeout` seconds pass. `output_fn` returns the run's output
  for the failure message (default: what is left in its stderr pipe).
  """
  index = os.path.join(str(model_dir), "checkpoints",
                       f"ckpt-{step}.index")
  deadline = time.monotonic() + timeout
  output_fn = output_fn or (lambda: process.stderr.read())
  while not os.path.exists(index):
    if process.poll() is not None:
      raise AssertionError(f"run ended (exit {process.returncode}) before "
                           f"step {step}:\n{output_fn()[-6000:]}")
    if time.monotonic() > deadline:
      (stop_fn or process.kill)()
      raise AssertionError(f"no checkpoint of step {step} after {timeout} s")
    time.sleep(0.005)
