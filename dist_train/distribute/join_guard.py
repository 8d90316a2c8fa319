"""Ctrl-C and SIGTERM while a worker waits for the other workers to join.

Inside the `MultiWorkerMirroredStrategy` constructor TensorFlow waits for
every worker while holding Python's lock, possibly forever if a peer never
comes. No Python code in the worker can run then, so the stop watcher
(loop/stop.py) cannot act. Another process has to act for it.

The design, a sidecar: for the join only, the worker starts this module as a
script (standard library only, no TensorFlow: it starts in about 0.1 s) and
leaves SIGINT and SIGTERM pending (`stop.kept_pending`: they are blocked in
every thread, and the watcher stops taking them with `sigtimedwait`, which
would remove them from the pending set). The sidecar reads /proc/<pid>/status
every 0.1 s; when a stop signal is pending it writes the one line to the
worker's stderr (an inherited file descriptor) and sends the worker
`_EXIT_SIGNAL`, whose disposition for the join is a 12-byte machine-code
stub, `exit_group(75)`: a C-level handler that needs no Python lock, so the
worker itself exits with EXIT_PREEMPTED (a ctypes callback cannot serve: it
takes Python's lock). Where the stub cannot be installed (another machine,
memory that may not be made executable) the default action of
`_EXIT_SIGNAL` ends the worker, and one still alive after `_GRACE_S` gets
SIGKILL. The worker closes the sidecar's stdin once it has joined; the
sidecar then exits.

Why not a supervising parent that re-executes `dist_train.main` as a child
and exits 75 for it: every launcher, the process-tree checks of the tests and
the ownership lock's pid see one process per worker today, and the parent
would have to forward signals without doubling a terminal's Ctrl-C (which
reaches the whole process group). The sidecar lives only while the worker
waits, changes nothing outside the join, and ends with it: a closed pipe.

The peers that had joined see the stopped worker as a failed peer (the
coordination service: a closed connection or a missed heartbeat, within
seconds) and exit with their own line.
"""

import contextlib
import ctypes
import mmap
import os
import platform
import select
import signal
import subprocess
import sys
import time

PHASE = "while waiting for the other workers to join"
EXIT_PREEMPTED = 75  # errors.EXIT_PREEMPTED; this file runs without dist_train.
# A real-time signal nothing else in a worker uses; its default action ends
# the process, so even without the stub it cannot be ignored.
_EXIT_SIGNAL = signal.SIGRTMAX - 1
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_POLL_S = 0.1
_GRACE_S = 3.0

# exit_group(EXIT_PREEMPTED), in the byte order of the machine.
_EXIT_STUBS = {
    # mov edi, EXIT_PREEMPTED; mov eax, 231 (exit_group); syscall
    "x86_64": (b"\xbf" + EXIT_PREEMPTED.to_bytes(4, "little") +
               bytes.fromhex("b8e7000000" "0f05")),
    # movz x0, #EXIT_PREEMPTED; movz x8, #94 (exit_group); svc #0
    "aarch64": ((0xd2800000 | EXIT_PREEMPTED << 5).to_bytes(4, "little") +
                bytes.fromhex("c80b80d2" "010000d4")),
}
_stub_address = None  # Installed once, kept for the life of the process.


def _libc():
  libc = ctypes.CDLL(None, use_errno=True)
  libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
  libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
  libc.signal.restype = ctypes.c_void_p
  return libc


def _exit_stub_address():
  """The address of `exit_group(75)` in executable memory, or None."""
  global _stub_address
  code = _EXIT_STUBS.get(platform.machine())
  if _stub_address is None and code is not None:
    page = mmap.mmap(-1, mmap.PAGESIZE,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE)
    page.write(code)
    address = ctypes.addressof((ctypes.c_char * len(code)).from_buffer(page))
    # Written, then made executable and read-only: never writable and
    # executable at once, which hardened kernels refuse.
    if _libc().mprotect(address, mmap.PAGESIZE,
                        mmap.PROT_READ | mmap.PROT_EXEC) == 0:
      _stub_address = (page, address)
  return _stub_address[1] if _stub_address else None


@contextlib.contextmanager
def exit_on_stop():
  """Ends the worker with EXIT_PREEMPTED and one line on SIGINT or SIGTERM in
  the block, although the block holds Python's lock (the join)."""
  # Here, not at the top: the sidecar runs this file without dist_train.
  from dist_train.loop import stop  # pylint: disable=import-outside-toplevel
  with stop.kept_pending(PHASE) as kept:
    if not kept or not os.path.exists(f"/proc/{os.getpid()}/status"):
      yield  # The Python API, or no /proc: a signal waits for the join.
      return
    address = _exit_stub_address()
    libc = _libc()
    previous = libc.signal(_EXIT_SIGNAL, address) if address else None
    sidecar = subprocess.Popen(
        # -I: the standard library only, not this script's folder.
        [sys.executable, "-I", os.path.abspath(__file__), str(os.getpid()),
         f"dist_train: error: stopped by {{signal}} {PHASE}: nothing to "
         "save, nothing lost; rerun the same command to resume"],
        # stdout: a launcher reading the worker's waits for no sidecar.
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
      yield
    finally:
      sidecar.stdin.close()  # The sidecar exits (or this process has).
      sidecar.wait()
      if address:
        libc.signal(_EXIT_SIGNAL, previous)


def _pending(pid):
  """The stop signal pending for process `pid`, or None; "" once it ended."""
  try:
    with open(f"/proc/{pid}/status") as f:
      fields = dict(line.split(":", 1) for line in f if ":" in line)
  except OSError:
    return ""
  if fields.get("State", "").split()[:1] == ["Z"]:
    return ""
  # ShdPnd: sent to the process (kill, a terminal's Ctrl-C); SigPnd: to its
  # main thread.
  pending = int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)
  for signum in _SIGNALS:
    if pending & (1 << (signum - 1)):
      return signum.name
  return None


def _ended(pid, timeout_s):
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if _pending(pid) == "":
      return True
    time.sleep(0.05)
  return False


def watch(pid: int, line: str):
  """The sidecar: until its stdin closes, ends worker `pid` with `line` on
  stderr when a stop signal is pending for it."""
  # Started from a thread that blocks them, but a terminal's Ctrl-C and
  # `timeout` signal the whole process group: these are the worker's.
  signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
  while True:
    if select.select([sys.stdin], [], [], _POLL_S)[0]:
      if not os.read(sys.stdin.fileno(), 64):
        return  # The worker joined.
    name = _pending(pid)
    if name == "":
      return
    if name:
      os.write(2, (line.format(signal=name) + "\n").encode())
      os.kill(pid, _EXIT_SIGNAL)
      if not _ended(pid, _GRACE_S):
        os.kill(pid, signal.SIGKILL)
      return


if __name__ == "__main__":
  watch(int(sys.argv[1]), sys.argv[2])
