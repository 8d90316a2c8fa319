"""Test processes forked from an interpreter that has already imported
TensorFlow: each run is a real process of its own, without the 5-6 s of CPU
that importing TensorFlow and Keras costs every fresh one.

`processes.run_python` sends a command here when what it tests does not
depend on how the interpreter started (see `processes.run_python`). The
server (this file run as a script, one per pytest process) imports
TensorFlow, Keras and dist_train once, and for each request forks a monitor
that forks the run: the run sets its arguments, environment, working
directory and sys.path as `python ARGS` would, takes stdout and stderr to
files, runs the module, script or code as `__main__`, and exits the way the
interpreter does (atexit handlers, non-daemon threads joined). The monitor
sends the run's pid, then its exit code (negative for a signal, as
`subprocess` gives it) and the CPU seconds it used.

Nothing of TensorFlow's runtime exists before the fork (no op has run, no
device was made), so each run configures its own devices and cluster.
"""

import json
import os
import signal
import socket
import sys

# Variables that the imports below read once: a run asking for other values
# than the server's must start fresh (`processes.run_python` checks).
IMPORT_TIME_VARIABLES = ("TF_CPP_MIN_LOG_LEVEL", "TF_CPP_MAX_VLOG_LEVEL",
                         "TF_CPP_VMODULE", "TF_ENABLE_ONEDNN_OPTS",
                         "CUDA_VISIBLE_DEVICES", "KERAS_BACKEND",
                         "KERAS_HOME", "PYTHONHASHSEED", "PYTHONNOUSERSITE",
                         "PYTHONDONTWRITEBYTECODE")


def _base_sys_path():
  """sys.path without the server's own first entry and its PYTHONPATH."""
  own = set(filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)))
  return [p for p in sys.path[1:] if p not in own]


def _exit_code(error):
  code = error.code
  if code is None:
    return 0
  if isinstance(code, int):
    return code
  print(code, file=sys.stderr)
  return 1


def _run(request, base_path):
  """Becomes `python ARGS` in this (forked) process; returns its exit code."""
  os.chdir(request["cwd"])
  os.environ.clear()
  os.environ.update(request["env"])
  signal.signal(signal.SIGCHLD, signal.SIG_DFL)
  null = os.open(os.devnull, os.O_RDONLY)
  os.dup2(null, 0)
  for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(out, fd)
    os.close(out)
  pythonpath = [p for p in request["env"].get("PYTHONPATH", "").split(
      os.pathsep) if p]
  kind, target, args = request["kind"], request["target"], request["args"]
  # Imported here: runpy is all a run needs of the server's own code.
  import runpy  # pylint: disable=import-outside-toplevel
  first = (os.path.dirname(os.path.abspath(target)) if kind == "script"
           else (os.getcwd() if kind == "module" else ""))
  sys.path[:] = [first, *pythonpath, *base_path]
  try:
    if kind == "module":
      sys.argv = [target, *args]  # runpy puts the module's file first.
      # As in a fresh `python -m`: the module is not imported under its name.
      sys.modules.pop(target, None)
      runpy.run_module(target, run_name="__main__", alter_sys=True)
    elif kind == "script":
      sys.argv = [target, *args]
      runpy.run_path(target, run_name="__main__")
    else:
      sys.argv = ["-c", *args]
      exec(compile(target, "<string>", "exec"),  # pylint: disable=exec-used
           {"__name__": "__main__", "__builtins__": __builtins__})
  except SystemExit as e:
    return _exit_code(e)
  except BaseException:  # pylint: disable=broad-except
    import traceback  # pylint: disable=import-outside-toplevel
    traceback.print_exc()
    return 1
  return 0


def _monitor(conn, request, listener, base_path):
  """In the forked monitor: forks the run, reports its pid and exit code.
  Returns the exit code when this process is the run itself."""
  signal.signal(signal.SIGCHLD, signal.SIG_DFL)
  pid = os.fork()
  if pid == 0:
    conn.close()
    listener.close()
    return _run(request, base_path)
  try:
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    _, status, usage = os.wait4(pid, 0)
    conn.sendall(json.dumps({
        "exit": os.waitstatus_to_exitcode(status),
        "cpu_s": usage.ru_utime + usage.ru_stime}).encode() + b"\n")
    conn.close()
  except OSError:  # The test stopped waiting (its timeout) and killed it.
    pass
  os._exit(0)  # pylint: disable=protected-access


def _read_line(conn):
  data = b""
  while not data.endswith(b"\n"):
    chunk = conn.recv(65536)
    if not chunk:
      return None
    data += chunk
  return json.loads(data)


def serve(socket_path):
  """Imports once, then forks a run per connection until the parent dies.
  Returns the exit code of a run (in the forked run process only)."""
  # The server ends with the pytest process that started it (checked every
  # second: PR_SET_PDEATHSIG would end it with the *thread* that started it).
  parent = os.getppid()
  base_path = _base_sys_path()
  sys.path.insert(0, os.getcwd())
  # pylint: disable=import-outside-toplevel,unused-import
  import numpy
  import tensorflow
  import keras
  import dist_train.main
  import dist_train.train
  # pylint: enable=import-outside-toplevel,unused-import
  # Loading the device platforms (and CUDA's failed cuInit line on a machine
  # without a GPU) happens here once, not in the middle of a run's output;
  # it makes no TensorFlow context, so each run still sets its own devices.
  tensorflow.config.list_physical_devices()
  del sys.path[0]
  signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # Monitors reap themselves.
  listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  listener.bind(socket_path)
  listener.listen(64)
  listener.settimeout(1.0)
  print("ready", flush=True)
  while os.getppid() == parent:
    try:
      conn, _ = listener.accept()
    except socket.timeout:
      continue
    conn.settimeout(None)
    request = _read_line(conn)
    if request is None:
      conn.close()
      continue
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() == 0:
      return _monitor(conn, request, listener, base_path)
    conn.close()
  return 0


if __name__ == "__main__":
  sys.exit(serve(sys.argv[1]))
