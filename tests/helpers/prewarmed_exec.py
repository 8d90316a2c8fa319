"""`python prewarmed_exec.py SOCKET ARGS` acts as `python ARGS`, forked from
the prewarmed server listening at SOCKET (tests/helpers/prewarmed.py).

It stands in for the interpreter in commands that another program starts,
such as the workers of `launch.local --python=...`: that program sees a
process with its own pid that it can signal, wait for and kill, while the
run itself skips importing TensorFlow. This process imports nothing heavy.

- The run gets this process's stdin, stdout and stderr.
- SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 and SIGCONT are passed
  on to the run.
- When this process dies (SIGKILL too), the server kills the run.
- Its exit code is the run's; a run killed by a signal kills this process
  with the same signal.
- A run whose environment changes what the server's imports read
  (`prewarmed.IMPORT_TIME_VARIABLES`) is started as a fresh `python ARGS`.
"""

import json
import os
import signal
import socket
import sys

_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
              signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT)


def _request(args):
  """The server's request for `python ARGS`, or None if it cannot fork it."""
  if len(args) >= 2 and args[0] == "-m":
    kind, target, rest = "module", args[1], args[2:]
  elif len(args) >= 2 and args[0] == "-c":
    kind, target, rest = "code", args[1], args[2:]
  elif args and args[0].endswith(".py"):
    kind, target, rest = "script", os.path.abspath(args[0]), args[1:]
  else:
    return None
  return {"kind": kind, "target": target, "args": list(rest),
          "env": dict(os.environ), "cwd": os.getcwd(),
          "watch_pid": os.getpid()}


def _exec_fresh(args):
  os.execv(sys.executable, [sys.executable, *args])


def main(argv):
  socket_path, args = argv[1], argv[2:]
  request = _request(args)
  if request is None or not os.path.exists(socket_path):
    _exec_fresh(args)
  conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  try:
    conn.connect(socket_path)
  except OSError:
    _exec_fresh(args)
  pid, pending = None, []

  def forward(signum, frame):
    del frame
    if pid is None:
      pending.append(signum)  # Passed on once the run has a pid.
    else:
      os.kill(pid, signum)

  for signum in _FORWARDED:
    signal.signal(signum, forward)
  socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
  reader = conn.makefile("r")
  reply = json.loads(reader.readline())
  if reply.get("fresh"):
    conn.close()
    for signum in _FORWARDED:
      signal.signal(signum, signal.SIG_DFL)
    _exec_fresh(args)
  pid = reply["pid"]
  for signum in pending:
    os.kill(pid, signum)
  line = reader.readline()
  if not line:
    sys.exit(f"prewarmed_exec: the server lost the run {' '.join(args)}")
  code = json.loads(line)["exit"]
  if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
  sys.exit(code)


if __name__ == "__main__":
  main(sys.argv)
