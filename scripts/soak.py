"""A long multi-worker run, watched: threads, memory, open files and steps/s of
every worker over time.

    python scripts/soak.py --num_workers=8 --minutes=10
    python scripts/soak.py --num_workers=2 --minutes=60 --interval_s=60 \\
        --output=soak.md

Starts `launch.local` with N workers on loopback on a tiny model with
validation and a checkpoint every epoch (the boundaries where resources
leak, if anything does), samples each worker's /proc every `--interval_s`
seconds, and stops the run with SIGTERM after `--minutes`. Prints a Markdown
table, one row per sample: per worker, its threads, resident memory (MB) and
open files, and the run's global steps per second since the last sample
(from the chief's log). A resource that grows from row to row is a leak;
tests/e2e/test_soak.py checks the same in under a minute.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_LINE = re.compile(r"^\[worker 0\] .*step (\d+) \|")


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_workers", type=int, default=8)
  parser.add_argument("--minutes", type=float, default=10.0)
  parser.add_argument("--interval_s", type=float, default=60.0,
                      help="seconds between samples")
  parser.add_argument("--output", default=None,
                      help="also write the table to this file")
  parser.add_argument("--model_dir", default=None,
                      help="default: a temporary directory, removed after")
  parser.add_argument("worker_flags", nargs="*",
                      help="more dist_train flags after --")
  return parser.parse_args(argv)


def _children(pid):
  pids = []
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/stat") as f:
        if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
          pids.append(int(name))
    except (OSError, IndexError, ValueError):
      pass
  return sorted(pids)


def _usage(pid):
  """(threads, resident MB, open files) of a process, or None once gone."""
  try:
    with open(f"/proc/{pid}/status") as f:
      fields = dict(line.split(":", 1) for line in f)
    return (int(fields["Threads"]), int(fields["VmRSS"].split()[0]) // 1024,
            len(os.listdir(f"/proc/{pid}/fd")))
  except (OSError, KeyError, ValueError):
    return None


class _ChiefSteps:
  """The latest global step the chief logged, read from the launcher."""

  def __init__(self, stream):
    self.step = 0
    self.lines = []
    self._thread = threading.Thread(target=self._read, args=(stream,),
                                    daemon=True)
    self._thread.start()

  def _read(self, stream):
    for line in stream:
      self.lines.append(line)
      del self.lines[:-200]  # The tail is enough to report a failure.
      match = STEP_LINE.search(line)
      if match:
        self.step = int(match.group(1))


def main(argv=None):
  args = _parse_args(argv)
  model_dir = args.model_dir or tempfile.mkdtemp(prefix="dist_train_soak_")
  flags = ["--dataset=synthetic", "--num_train_examples=2048",
           "--num_validation_examples=256", "--global_batch_size=256",
           "--epochs=1000000", "--log_every_steps=8", "--steps_per_loop=4",
           f"--model_dir={model_dir}", *args.worker_flags]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  launcher = subprocess.Popen(
      [sys.executable, "-m", "launch.local",
       f"--num_workers={args.num_workers}", "--", *flags],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)
  chief = _ChiefSteps(launcher.stdout)
  header = (["minute", "steps/s"] +
            [f"w{i} threads / RSS MB / files"
             for i in range(args.num_workers)])
  rows = []
  start = time.monotonic()
  last_time, last_step = start, 0
  print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header),
        flush=True)
  try:
    while time.monotonic() - start < args.minutes * 60:
      time.sleep(args.interval_s)
      if launcher.poll() is not None:
        raise SystemExit("the run ended early:\n" + "".join(chief.lines[-40:]))
      now, step = time.monotonic(), chief.step
      usages = [_usage(pid) for pid in _children(launcher.pid)]
      row = ([f"{(now - start) / 60:.1f}",
              f"{(step - last_step) / (now - last_time):.1f}"] +
             ["-" if u is None else f"{u[0]} / {u[1]} / {u[2]}"
              for u in usages])
      last_time, last_step = now, step
      rows.append(row)
      print("| " + " | ".join(row) + " |", flush=True)
  finally:
    if launcher.poll() is None:
      launcher.send_signal(signal.SIGTERM)
      try:
        launcher.wait(timeout=120)
      except subprocess.TimeoutExpired:
        launcher.kill()
    if args.model_dir is None:
      subprocess.run(["rm", "-rf", model_dir], check=False)
  if args.output:
    with open(args.output, "w") as f:
      f.write("| " + " | ".join(header) + " |\n|" + " --- |" * len(header) +
              "\n" + "".join("| " + " | ".join(r) + " |\n" for r in rows))
  print(f"{args.num_workers} workers, {args.minutes:g} min, last step "
        f"{chief.step}; the launcher exited {launcher.returncode}")


if __name__ == "__main__":
  main()
