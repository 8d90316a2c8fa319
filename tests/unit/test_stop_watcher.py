"""The watcher of blocked stop signals (loop/stop.py, the command line's
`install(block=True)`) survives what `signal.sigtimedwait` really returns.

When another signal interrupts the wait just as its timeout runs out,
CPython's `sigtimedwait` returns a siginfo of no signal (si_signo 0) instead
of None. A two-worker run once lost its watcher to that: every later SIGTERM
stayed pending, and the main thread waited forever for the watcher to step
aside. The script below, a process without TensorFlow, gets that siginfo
first, then SIGTERM: before the first training step the watcher must end
the process at once with the resumable exit code.
"""

import subprocess
import sys
import textwrap

from dist_train import errors
from tests.helpers import processes

_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from dist_train.loop import stop

    real_wait = signal.sigtimedwait
    waits = []

    def interrupted_at_its_deadline_once(sigset, timeout):
      waits.append(timeout)
      if len(waits) == 1:  # What CPython returns after EINTR at the deadline.
        return signal.struct_siginfo((0,) * 7)
      return real_wait(sigset, timeout)

    signal.sigtimedwait = interrupted_at_its_deadline_once
    stop.install(block=True)
    deadline = time.monotonic() + 10
    while len(waits) < 2 and time.monotonic() < deadline:
      time.sleep(0.01)  # Until the watcher has taken the empty siginfo.
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
    print("the SIGTERM was not taken")
""")


def test_an_empty_siginfo_does_not_end_the_watcher():
  result = subprocess.run([sys.executable, "-c", _SCRIPT],
                          cwd=processes.REPO_ROOT,
                          env=processes.subprocess_env(),
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == errors.EXIT_PREEMPTED, (
      result.stdout + result.stderr)
  assert "stopped by SIGTERM before the first training step" in (
      result.stderr), result.stderr
  assert "Traceback" not in result.stderr, result.stderr
