"""The console: progress bar (progress.py), log format and TensorFlow's
start-up lines filtered (logs.py); tests/e2e/test_console_runs.py: what a real
run prints."""

import contextlib
import errno
import importlib.util
import io
import logging
import os
import pty
import re
import subprocess
import sys
import textwrap

from absl import logging as absl_logging
import pytest

from dist_train import logs
from dist_train import progress
from tests.helpers import processes

ERASE = "\r\x1b[2K"
# absl's Python prefix: "I1127 13:05:02.123456 140234 controller.py:123] ".
ABSL_PYTHON_PREFIX = re.compile(
    r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ \S+\.py:\d+\] ", re.M)


class FakeTerminal(io.StringIO):

  def isatty(self):
    return True


class FakeClock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def make_bar(stream=None, clock=None, **kwargs):
  return progress.EpochProgress(
      2, 10, 63, FakeTerminal() if stream is None else stream,
      environ={}, clock=clock or FakeClock(), **kwargs)


def test_bar_renders_steps_rate_and_eta():
  stream, clock = FakeTerminal(), FakeClock()
  bar = make_bar(stream, clock)
  bar.update(20, 12345.4)
  # One update: no rate yet.
  assert stream.getvalue() == (
      ERASE + "epoch 2/10 [######..............] 20/63 steps | "
      "12,345 examples/s | ETA --")
  clock.now += 2.0
  bar.update(40)  # 20 steps in 2 s: 23 steps left take 2.3 s.
  assert stream.getvalue().endswith(
      ERASE + "epoch 2/10 [############........] 40/63 steps | ETA 0:02")
  clock.now += 1.0
  bar.update(63)
  assert bar.render().endswith("[####################] 63/63 steps | "
                               "ETA 0:00")


def test_eta_in_hours():
  clock = FakeClock()
  bar = progress.EpochProgress(1, 1, 10_000, FakeTerminal(), environ={},
                              clock=clock)
  bar.update(1)
  clock.now += 1.0
  bar.update(2)  # 9,998 steps left at 1 step/s.
  assert bar.render().endswith("ETA 2:46:38")


def test_redraws_at_most_every_tenth_of_a_second_but_always_the_last():
  stream, clock = FakeTerminal(), FakeClock()
  bar = make_bar(stream, clock)
  for step, seconds in [(1, 0.0), (2, 0.05), (3, 0.09), (4, 0.11), (5, 0.15),
                        (63, 0.16)]:
    clock.now = 100.0 + seconds
    bar.update(step)
  drawn = re.findall(r"\] (\d+)/63 steps", stream.getvalue())
  assert drawn == ["1", "4", "63"]


def test_clear_redraw_and_close():
  stream = FakeTerminal()
  bar = make_bar(stream)
  bar.clear()  # Nothing shown yet: nothing to erase.
  assert stream.getvalue() == ""
  bar.update(5)
  bar.clear()
  assert stream.getvalue().endswith("5/63 steps | ETA --" + ERASE)
  bar.redraw()
  assert stream.getvalue().endswith(ERASE + ERASE + bar.render())
  with bar:
    pass  # Leaving the block closes the bar.
  after_close = stream.getvalue()
  assert after_close.endswith(ERASE)
  bar.update(6)
  bar.redraw()
  bar.clear()
  assert stream.getvalue() == after_close


@pytest.mark.parametrize("stream, is_tty", [
    (io.StringIO(), None),  # A pipe or a file.
    (FakeTerminal(), False),
])
def test_not_interactive_does_nothing(stream, is_tty):
  bar = progress.EpochProgress(1, 1, 10, stream, is_tty, environ={})
  assert not bar.enabled
  bar.update(3, 100.0)
  bar.update(10, 100.0)
  bar.clear()
  bar.close()
  assert stream.getvalue() == ""


@pytest.mark.parametrize("environ, expected", [
    ({}, True),
    ({"TERM": "xterm-256color"}, True),
    ({"NO_COLOR": ""}, True),  # An empty NO_COLOR does not count.
    ({"SLURM_JOB_ID": "1234"}, False),
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, False),
    ({"NO_COLOR": "1"}, False),
    ({"TERM": "dumb"}, False),
])
def test_interactive_only_on_a_terminal_outside_batch_jobs(environ, expected):
  assert progress.interactive(FakeTerminal(), environ) is expected
  assert not progress.interactive(io.StringIO(), environ)
  bar = progress.EpochProgress(1, 1, 10, io.StringIO(), is_tty=True,
                              environ=environ)
  assert bar.enabled is expected


def test_interactive_with_closed_or_plain_streams():
  closed = open(os.devnull, encoding="utf-8")
  closed.close()
  assert not progress.interactive(closed, {})
  assert not progress.interactive(object(), {})


def test_quiet_tensorflow_startup_keeps_a_level_the_user_set():
  environ = {}
  logs.quiet_tensorflow_startup(environ)
  assert environ == {"TF_CPP_MIN_LOG_LEVEL": "1"}
  environ = {"TF_CPP_MIN_LOG_LEVEL": "0"}
  logs.quiet_tensorflow_startup(environ)
  assert environ == {"TF_CPP_MIN_LOG_LEVEL": "0"}


@contextlib.contextmanager
def absl_output():
  """absl's handler writing to a fake terminal; logging set up as before after.

  sys.stderr is replaced too: absl writes there until flags are parsed. In the
  test's body, not a fixture: pytest sets its own sys.stderr after set-up.
  """
  handler = absl_logging.get_absl_handler()
  python_handler = handler.python_handler
  tf_logger = logging.getLogger("tensorflow")
  saved = (python_handler.stream, python_handler.formatter,
           list(handler.filters), list(logging.root.handlers),
           logging.root.level, tf_logger.level)
  stream = FakeTerminal()
  python_handler.stream = stream
  try:
    with contextlib.redirect_stderr(stream):
      yield stream
  finally:
    (python_handler.stream, formatter, handler.filters[:],
     logging.root.handlers[:], root_level, tf_level) = saved
    python_handler.setFormatter(formatter)
    logging.root.setLevel(root_level)
    tf_logger.setLevel(tf_level)


def logged_text(stream):
  """What was written, less absl's notice that flags are not parsed."""
  return stream.getvalue().replace(
      "WARNING: Logging before flag parsing goes to stderr.\n", "")


def log_lines(stream):
  return logged_text(stream).splitlines()


def test_plain_log_format():
  with absl_output() as output:
    logs.configure_logging()
    logging.root.setLevel(logging.INFO)
    absl_logging.info("step %d | loss %.2f", 100, 0.5)
    absl_logging.warning("careful")
    absl_logging.error("broken")
    lines = log_lines(output)
    assert len(lines) == 3, lines
    assert re.fullmatch(r"\d\d:\d\d:\d\d step 100 \| loss 0\.50", lines[0])
    assert re.fullmatch(r"\d\d:\d\d:\d\d warning: careful", lines[1])
    assert re.fullmatch(r"\d\d:\d\d:\d\d error: broken", lines[2])


def test_verbose_keeps_absl_prefix():
  with absl_output() as output:
    logs.configure_logging(verbose=True)
    logging.root.setLevel(logging.INFO)
    absl_logging.info("hello")
    lines = log_lines(output)
    assert len(lines) == 1
    assert ABSL_PYTHON_PREFIX.match(lines[0]), lines
    assert "test_console.py" in lines[0]


def test_tensorflow_info_is_hidden_but_not_its_warnings():
  with absl_output():
    logs.configure_logging()
    assert logging.getLogger("tensorflow").level == logging.WARNING
    # TensorFlow's checkpoint code logs through absl, not its own logger.
    tf_file = os.path.join(
        os.path.dirname(importlib.util.find_spec("tensorflow").origin),
        "python", "checkpoint", "functional_saver.py")
    handler = absl_logging.get_absl_handler()

    def record(level, pathname):
      return logging.LogRecord("absl", level, pathname, 1, "message", (), None)

    assert not handler.filter(record(logging.INFO, tf_file))
    assert handler.filter(record(logging.WARNING, tf_file))
    assert handler.filter(record(logging.INFO, logs.__file__))


def test_log_line_clears_the_bar_and_redraws_it_below():
  with absl_output() as output:
    logs.configure_logging()
    logging.root.setLevel(logging.INFO)
    bar = progress.EpochProgress(1, 3, 63, output, environ={})
    bar.update(20)
    absl_logging.info("Saved checkpoint")
    bar.close()
    absl_logging.info("epoch 1/3 done")
    shown = ERASE + "epoch 1/3 [######..............] 20/63 steps | ETA --"
    text = logged_text(output)
    assert re.fullmatch(
        re.escape(shown + ERASE) + r"\d\d:\d\d:\d\d Saved checkpoint\n" +
        re.escape(shown + ERASE) + r"\d\d:\d\d:\d\d epoch 1/3 done\n", text), text


def test_log_line_redraws_only_the_newest_bar():
  with absl_output() as output:
    logs.configure_logging()
    logging.root.setLevel(logging.INFO)
    first = progress.EpochProgress(1, 2, 10, output, environ={})
    first.update(10)  # Not closed by its caller.
    second = progress.EpochProgress(2, 2, 10, output, environ={})
    second.update(3)
    absl_logging.info("Saved checkpoint")
  text = logged_text(output)
  assert text.endswith(ERASE + second.render())
  assert text.count("epoch 1/2") == 1, repr(text)


def run_python_code(code, env_overrides=None):
  return processes.run_python(["-c", textwrap.dedent(code)], timeout=60,
                             env_overrides=env_overrides)


def test_startup_filter_drops_only_cpp_info_lines():
  result = run_python_code("""
      import os, sys
      from dist_train import logs
      with logs.startup_info_hidden({"TF_CPP_MIN_LOG_LEVEL": "1"}):
        for line in [
            "WARNING: All log messages before absl::InitializeLog() is called"
            " are written to STDERR",
            "I0000 00:00:1795785503.537329    4660 port.cc:153] oneDNN on.",
            "W0000 00:00:1795785503.537410    4660 a.cc:1] a warning",
            "2025-09-17 14:44:05.157831: I external/b/cudart_stub.cc:32] no",
            "E0000 00:00:1795785503.537500    4660 c.cc:2] an error",
            "To enable the following instructions: AVX2"]:
          os.write(2, line.encode() + b"\\n")
        print("from python", file=sys.stderr)
      print("after", file=sys.stderr)
      """)
  assert result.returncode == 0, result.stderr
  assert result.stderr.splitlines() == [
      "W0000 00:00:1795785503.537410    4660 a.cc:1] a warning",
      "E0000 00:00:1795785503.537500    4660 c.cc:2] an error",
      "To enable the following instructions: AVX2",
      "from python", "after"]


def test_startup_filter_keeps_a_crash_message_and_info_when_asked_for():
  crash = run_python_code("""
      import os
      from dist_train import logs
      with logs.startup_info_hidden({"TF_CPP_MIN_LOG_LEVEL": "1"}):
        os.write(2, b"F0000 00:00:1795785503.5 4660 cpu_feature_guard.cc:1] "
                    b"no AVX\\n")
        os.abort()
      """)
  assert crash.returncode != 0
  assert "cpu_feature_guard.cc:1] no AVX" in crash.stderr
  verbose = run_python_code("""
      import os
      from dist_train import logs
      with logs.startup_info_hidden({"TF_CPP_MIN_LOG_LEVEL": "0"}):
        os.write(2, b"I0000 00:00:1795785503.5 4660 port.cc:153] oneDNN\\n")
      """)
  assert "port.cc:153] oneDNN" in verbose.stderr


# A stand-in for the controller: a bar per epoch, log lines in between.
DRIVER = """
from absl import app, logging
from dist_train import logs, progress

def main(argv):
  logs.configure_logging()
  bar = progress.EpochProgress(1, 1, 3, min_redraw_seconds=0)
  for step in range(1, 4):
    bar.update(step, 1000.0)
    if step == 2:
      logging.info("a log line")
  bar.close()
  logging.info("epoch 1/1 done")

app.run(main)
"""


def driver_env():
  env = processes.subprocess_env({"TERM": "xterm"})
  for name in ("NO_COLOR", "SLURM_JOB_ID", "KUBERNETES_SERVICE_HOST"):
    env.pop(name, None)
  return env


def read_until_closed(fd):
  chunks = []
  while True:
    try:
      chunk = os.read(fd, 4096)
    except OSError as e:  # EIO: the other side of the pty was closed.
      if e.errno != errno.EIO:
        raise
      break
    if not chunk:
      break
    chunks.append(chunk)
  return b"".join(chunks).decode()


def test_bar_is_drawn_on_a_terminal_only():
  main_fd, terminal_fd = pty.openpty()
  try:
    process = subprocess.Popen(
        [sys.executable, "-c", DRIVER], cwd=processes.REPO_ROOT,
        env=driver_env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=terminal_fd)
    os.close(terminal_fd)
    terminal = read_until_closed(main_fd)
    assert process.wait(timeout=60) == 0, terminal
  finally:
    os.close(main_fd)
  bars = re.findall(r"\r\x1b\[2Kepoch 1/1 \[[#.]+\] (\d)/3 steps", terminal)
  # Each step, and step 2 again below the log line.
  assert bars == ["1", "2", "2", "3"], repr(terminal)
  assert re.search(r"\r\x1b\[2K\d\d:\d\d:\d\d a log line\r?\n\r\x1b\[2Kepoch",
                   terminal), repr(terminal)
  assert re.search(r"\r\x1b\[2K\d\d:\d\d:\d\d epoch 1/1 done", terminal)

  piped = subprocess.run(
      [sys.executable, "-c", DRIVER], cwd=processes.REPO_ROOT, env=driver_env(),
      capture_output=True, text=True, timeout=60)
  assert piped.returncode == 0, piped.stderr
  assert "\r" not in piped.stderr and "\x1b" not in piped.stderr
  assert re.fullmatch(r"\d\d:\d\d:\d\d a log line\n"
                      r"\d\d:\d\d:\d\d epoch 1/1 done\n", piped.stderr)
