"""Test processes forked from an interpreter that has already imported
TensorFlow: each run is a real process of its own, without the 5-6 s of CPU
that importing TensorFlow and Keras costs every fresh one.

`processes.run_python` sends a command here when what it tests does not
depend on how the interpreter started (see `processes.run_python`). The
server (this file run as a script, one per pytest process) imports
TensorFlow, Keras and dist_train once, and for each request forks a monitor
that forks the run: the run sets its arguments, environment, working
directory and sys.path as `python ARGS` would, takes stdout and stderr to
files, runs the module, script or code as `__main__`, and exits as the
interpreter does (non-daemon threads joined, atexit handlers run, standard
streams flushed) but for the teardown of every module: that garbage
collection would touch, and so copy, every page of the imported TensorFlow
that the run shares with the server, 1.2 CPU-s a run. The monitor
sends the run's pid, then its exit code (negative for a signal, as
`subprocess` gives it) and the CPU seconds it used.

A request may instead send its own stdin, stdout and stderr (SCM_RIGHTS)
and name a process to watch: tests/helpers/prewarmed_exec.py, which stands
in for `python` in commands that other programs start (launch.local's
workers), does so, and the monitor kills the run when that process dies.
While a run lives, `<server dir>/live/<pid>` holds its command line, for
`processes.running_processes_mentioning`; the CPU seconds of such runs are
appended to `<server dir>/exec_cpu_s`.

Nothing of TensorFlow's runtime exists before the fork (no op has run, no
device was made), so each run configures its own devices and cluster.

AutoGraph's conversion of dist_train's step functions (parsing their source
and rewriting it: about half of a short run's CPU after the imports) is
pure Python, cached per code object. Each run writes which of dist_train's
functions it converted, with which options (`_save_conversions`); the
server converts those between forks (`_learn_conversions`), so the runs it
forks next find them in the cache. The converted code is what the run would
have made itself: the same source, options and module namespace.
"""

import gc
import json
import os
import select
import signal
import socket
import sys

# Variables that the imports below read once: a run asking for other values
# than the server's must start fresh (`processes.run_python` checks).
IMPORT_TIME_VARIABLES = ("TF_CPP_MIN_LOG_LEVEL", "TF_CPP_MAX_VLOG_LEVEL",
                         "TF_CPP_VMODULE", "TF_ENABLE_ONEDNN_OPTS",
                         "CUDA_VISIBLE_DEVICES", "KERAS_BACKEND",
                         "KERAS_HOME", "PYTHONHASHSEED", "PYTHONNOUSERSITE",
                         "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED",
                         "PYTHONWARNINGS", "PYTHONFAULTHANDLER")


def starts_fresh(env):
  """True when a run with environment `env` must not be forked from a server
  whose own environment is this process's."""
  return any(env.get(name) != os.environ.get(name)
             for name in IMPORT_TIME_VARIABLES)


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


# Folders of the server's directory: the live runs' command lines, and the
# conversions that ended runs saved.
LIVE, CONVERSIONS = "live", "autograph"
# Only dist_train's own functions are learned: the server imports no other
# module that a run may import (a user's or a test's task module).
_LEARNED_PACKAGE = "dist_train"


def _save_conversions(directory):
  """Writes [module, qualified name, first line, options] of each function
  of dist_train that AutoGraph converted in this run to directory/PID."""
  # pylint: disable=import-outside-toplevel,protected-access
  from tensorflow.python.autograph.impl import api
  files = {getattr(module, "__file__", None): name
           for name, module in list(sys.modules.items())
           if name.split(".")[0] == _LEARNED_PACKAGE}
  converted = []
  for code, by_options in list(api._TRANSPILER._cache._cache.items()):
    module = files.get(code.co_filename)
    if module and "<locals>" not in code.co_qualname:
      for options in by_options:
        recursive, user_requested, internal, features = options.as_tuple()
        converted.append([module, code.co_qualname, code.co_firstlineno,
                          [recursive, user_requested, internal,
                           sorted(f.value for f in features)]])
  path = os.path.join(directory, str(os.getpid()))
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(converted, f)
  os.replace(path + ".tmp", path)


def _learn_conversions(directory, learned):
  """Converts, in this server, the functions that ended runs saved (see
  `_save_conversions`) and `learned` does not hold yet."""
  for name in os.listdir(directory):
    if name.endswith(".tmp"):
      continue
    path = os.path.join(directory, name)
    with open(path, encoding="utf-8") as f:
      converted = json.load(f)
    os.remove(path)
    for entry in converted:
      key = json.dumps(entry)
      if key not in learned:
        learned.add(key)
        try:
          _convert(*entry)
        except Exception:  # pylint: disable=broad-except
          pass  # The runs convert it themselves, or say why they cannot.


def _convert(module, qualname, first_line, options):
  """Has AutoGraph convert module.qualname as the run did, into its cache."""
  # pylint: disable=import-outside-toplevel,protected-access
  import importlib
  from tensorflow.python.autograph.core import converter
  from tensorflow.python.autograph.impl import api
  function = importlib.import_module(module)
  for part in qualname.split("."):
    function = getattr(function, part)
  function = getattr(function, "fget", function)  # A property's.
  if function.__code__.co_firstlineno != first_line:
    return  # A decorated function: not the code the run converted.
  recursive, user_requested, internal, features = options
  api._TRANSPILER.transform(function, converter.ProgramContext(
      options=converter.ConversionOptions(
          recursive=recursive, user_requested=user_requested,
          internal_convert_user_code=internal,
          optional_features=[converter.Feature(f) for f in features])))


def _run(request, base_path, server_dir):
  """Becomes `python ARGS` in this (forked) process, and exits."""
  try:
    code = _run_main(request, base_path)
  finally:
    # No garbage collection from here to the exit: a collection that the
    # bookkeeping below set off could free the run's last objects, among
    # them a tf.data iterator, and the cancellation of
    # `tf.data.experimental` testing's `sleep` dataset (a slow input of the
    # tests) can deadlock there. A process that ends does not free them.
    gc.disable()
    try:
      _save_conversions(os.path.join(server_dir, CONVERSIONS))
    except Exception:  # pylint: disable=broad-except
      pass  # The next runs convert for themselves.
  _exit(code)


def _exit(code):
  """Ends this run as the interpreter ends (Py_FinalizeEx), without tearing
  down its modules."""
  # pylint: disable=import-outside-toplevel,protected-access
  import atexit
  import threading
  threading._shutdown()  # Joins the non-daemon threads.
  atexit._run_exitfuncs()
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  os._exit(code)


def _run_main(request, base_path):
  os.chdir(request["cwd"])
  os.environ.clear()
  os.environ.update(request["env"])
  signal.signal(signal.SIGCHLD, signal.SIG_DFL)
  fds = request.get("fds")
  if fds:
    for fd, own in zip((0, 1, 2), fds):
      os.dup2(own, fd)
    for own in set(fds):
      os.close(own)
  else:
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


def _wait_watching(pid, watched):
  """Waits for the run `pid`; kills it first if the process `watched` (the
  one that stands in for it) dies."""
  try:
    run_fd, watched_fd = os.pidfd_open(pid), os.pidfd_open(watched)
  except ProcessLookupError:  # The stand-in died before the run started.
    os.kill(pid, signal.SIGKILL)
    return os.wait4(pid, 0)
  ready, _, _ = select.select([run_fd, watched_fd], [], [])
  if run_fd not in ready:
    os.kill(pid, signal.SIGKILL)
  os.close(run_fd)
  os.close(watched_fd)
  return os.wait4(pid, 0)


def _monitor(conn, request, listener, base_path, server_dir):
  """In the forked monitor: forks the run, reports its pid and exit code,
  and exits (the run exits in `_run`)."""
  signal.signal(signal.SIGCHLD, signal.SIG_DFL)
  pid = os.fork()
  if pid == 0:
    conn.close()
    listener.close()
    _run(request, base_path, server_dir)
  for fd in set(request.get("fds") or ()):
    os.close(fd)
  live = os.path.join(server_dir, LIVE, str(pid))
  with open(live, "w", encoding="utf-8") as f:
    f.write(" ".join([request["target"], *request["args"]]))
  try:
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    if request.get("watch_pid"):
      _, status, usage = _wait_watching(pid, request["watch_pid"])
    else:
      _, status, usage = os.wait4(pid, 0)
    os.remove(live)
    cpu_s = usage.ru_utime + usage.ru_stime
    if request.get("watch_pid"):  # Its stand-in does not report it.
      with open(os.path.join(server_dir, "exec_cpu_s"), "a",
                encoding="utf-8") as f:
        f.write(f"{cpu_s}\n")
    conn.sendall(json.dumps({
        "exit": os.waitstatus_to_exitcode(status),
        "cpu_s": cpu_s}).encode() + b"\n")
    conn.close()
  except OSError:  # The test stopped waiting (its timeout) and killed it.
    pass
  if os.path.exists(live):
    os.waitpid(pid, 0)
    os.remove(live)
  os._exit(0)  # pylint: disable=protected-access


def _read_request(conn):
  """The request, with the file descriptors it sent (if any) as "fds"."""
  data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
  while data and not data.endswith(b"\n"):
    chunk = conn.recv(1 << 20)
    if not chunk:
      break
    data += chunk
  if not data.endswith(b"\n"):
    for fd in fds:
      os.close(fd)
    return None
  request = json.loads(data)
  request["fds"] = list(fds)
  return request


def serve(socket_path):
  """Imports once, then forks a run per connection until the parent dies.
  The forked processes never return here: each exits."""
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
  server_dir = os.path.dirname(socket_path)
  for name in (LIVE, CONVERSIONS):
    os.makedirs(os.path.join(server_dir, name), exist_ok=True)
  learned = set()
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
    request = _read_request(conn)
    if request is None:
      conn.close()
      continue
    if starts_fresh(request["env"]):
      conn.sendall(json.dumps({"fresh": True}).encode() + b"\n")
      for fd in request["fds"]:
        os.close(fd)
      conn.close()
      continue
    # Before each fork: the run that just ended may have converted what
    # this one needs.
    _learn_conversions(os.path.join(server_dir, CONVERSIONS), learned)
    # What the server made is out of the collector's reach in the run: its
    # collections would otherwise touch, and so copy, the shared pages.
    gc.freeze()
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() == 0:
      _monitor(conn, request, listener, base_path, server_dir)
    for fd in request["fds"]:
      os.close(fd)
    conn.close()
  return 0


if __name__ == "__main__":
  sys.exit(serve(sys.argv[1]))
