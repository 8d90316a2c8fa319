"""A real TensorBoard serves the run's curves, configuration and model; PNG plots."""

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from dist_train.outputs import summaries
from tests.helpers import processes


@pytest.fixture(scope="module")
def model_dir(cpu_test_run):
  """cpu_test.cfg's run, made once for the session."""
  return cpu_test_run[0]


def _wait_for_url(lines, reader, deadline):
  """The URL of TensorBoard's `TensorBoard <version> at <url>` line."""
  while time.monotonic() < deadline:
    for line in list(lines):
      match = re.search(r"TensorBoard \S+ at (http://127\.0\.0\.1:\d+)", line)
      if match:
        return match.group(1)
    if not reader.is_alive():
      break
    time.sleep(0.1)
  raise AssertionError(f"tensorboard printed no URL:\n{''.join(lines)}")


@contextlib.contextmanager
def tensorboard_server(logdir):
  """Starts `tensorboard` on a port the OS picks (--port=0); yields its URL."""
  process = subprocess.Popen(
      [sys.executable, "-m", "tensorboard.main", "--logdir", logdir,
       "--host", "127.0.0.1", "--port", "0"],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env={**os.environ, "PYTHONUNBUFFERED": "1"})
  lines = []

  def read():
    for line in process.stdout:
      lines.append(line)

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  try:
    # TensorBoard binds the port itself and prints it: no port is probed,
    # released and then bound, which another process could take between.
    url = _wait_for_url(lines, reader, deadline=time.monotonic() + 120)
    deadline = time.monotonic() + 120
    while True:
      try:
        with urllib.request.urlopen(f"{url}/data/runs", timeout=5) as r:
          if sorted(json.load(r)) == ["train", "validation"]:
            break
      except (urllib.error.URLError, ConnectionError):
        pass
      if process.poll() is not None or time.monotonic() > deadline:
        raise AssertionError(f"tensorboard did not serve {logdir}:\n"
                             f"{''.join(lines)}")
      time.sleep(0.5)
    yield url
  finally:
    process.terminate()
    process.wait(timeout=30)


def _get(url, body=None):
  request = urllib.request.Request(
      url, data=None if body is None else json.dumps(body).encode(),
      headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(request, timeout=30) as response:
    return json.load(response)


def test_tensorboard_serves_the_curves_config_and_model(model_dir):
  on_disk = {split: summaries.read_scalars(os.path.join(model_dir, split))
             for split in ("train", "validation")}
  with tensorboard_server(model_dir) as url:
    for split, tags in (("train", ("loss", "accuracy", "learning_rate")),
                        ("validation", ("loss", "accuracy"))):
      for tag in tags:
        served = _get(f"{url}/data/plugin/scalars/scalars?run={split}&tag={tag}")
        # Steps exactly, values to a tolerance (pytest.approx takes flat
        # sequences only, not (step, value) pairs).
        assert [step for _, step, _ in served] == [
            step for step, _ in on_disk[split][tag]], (split, tag)
        assert [value for _, _, value in served] == pytest.approx(
            [value for _, value in on_disk[split][tag]]), (split, tag)
    assert [s for _, s, _ in _get(
        f"{url}/data/plugin/scalars/scalars?run=train&tag=loss")] == list(
            range(5, 40, 5))
    experiment = _get(f"{url}/data/plugin/hparams/experiment",
                      {"experimentName": ""})
    hparams = {h["name"]: h for h in experiment["hparamInfos"]}
    assert {"global_batch_size", "learning_rate", "num_replicas",
            "optimizer"} <= set(hparams)
    assert hparams["num_replicas"]["domainInterval"]["minValue"] == 2
    text = _get(f"{url}/data/plugin/text/text?run=train&tag=model_summary")
    assert "55,050 parameters" in text[0]["text"]


def test_plot_run_writes_a_png(model_dir, tmp_path):
  output = tmp_path / "curves.png"
  result = processes.run_python(["scripts/plot_run.py", model_dir,
                                f"--output={output}"], check=True)
  assert result.stdout.strip() == str(output)
  content = output.read_bytes()
  assert content.startswith(b"\x89PNG\r\n\x1a\n") and len(content) > 10_000


def test_plot_run_without_events_fails_clearly(tmp_path):
  result = processes.run_python(["scripts/plot_run.py", str(tmp_path)])
  assert result.returncode == 1
  assert "no train or validation event files" in result.stderr
