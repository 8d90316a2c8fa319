"""The code examples of README.md and docs/ run as printed."""

import csv
import os
import re

from tests.helpers import processes


def _python_block_after(heading, page="README.md"):
  """The first Python block after `heading` in `page` (relative to the
  repository root)."""
  with open(os.path.join(processes.REPO_ROOT, page)) as f:
    text = f.read()
  section = text[text.index(heading):]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_python_api_example_runs(tmp_path):
  code = _python_block_after("## Python API").replace(
      "/tmp/dist_train/api", str(tmp_path / "api"))
  script = tmp_path / "example.py"
  script.write_text(code)
  result = processes.run_python([str(script)], check=True)
  step_line, shape_line = result.stdout.strip().splitlines()[-2:]
  assert step_line.startswith("126 {'loss': ")  # 2 epochs of 63 steps.
  assert shape_line == "(1, 10)"
  assert (tmp_path / "api" / "export" / "model.keras").exists()


def test_plugin_example_runs_from_the_command_line(tmp_path):
  package = tmp_path / "my_project"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "plugins.py").write_text(
      _python_block_after("## Your own model and data", "docs/tasks.md"))
  result = processes.run_cli(
      f"--model_dir={tmp_path / 'run'}", "--cpu_replicas=2", "--epochs=1",
      "--model=my_project.plugins:model_fn",
      "--dataset=my_project.plugins:dataset_fn",
      env_overrides={"PYTHONPATH": f"{tmp_path}{os.pathsep}"
                                   f"{processes.REPO_ROOT}"}, check=True)
  assert "Training 1000 examples, validating 1000" in result.stderr


def test_callbacks_example_runs(tmp_path):
  model_dir = tmp_path / "callbacks"
  code = _python_block_after("## Callbacks in the Python API",
                             "docs/evaluation.md").replace(
                                 "/tmp/dist_train/callbacks", str(model_dir))
  script = tmp_path / "example.py"
  script.write_text(code)
  result = processes.run_python([str(script)], check=True)
  step, reason = result.stdout.strip().splitlines()[-1].split(" ", 1)
  assert reason == "a callback set model.stop_training"
  with open(model_dir / "history.csv") as f:
    rows = list(csv.DictReader(f))
  print(f"stopped at step {step} after {len(rows)} epochs: {rows[-1]}")
  # Validation after each epoch of 63 steps; it stops at the first >= 0.88.
  assert int(step) == 63 * len(rows) < 630
  assert [float(row["val_accuracy"]) >= 0.88 for row in rows] == [
      False] * (len(rows) - 1) + [True]


def test_task_example_runs(tmp_path):
  """The Blobs task of docs/tasks.md prints what the page says it prints."""
  with open(os.path.join(processes.REPO_ROOT, "docs", "tasks.md")) as f:
    page = f.read()
  [code] = [block for block in re.findall(r"```python\n(.*?)```", page, re.S)
            if "class Blobs(tasks.Task):" in block]
  printed = re.search(r"It prints `(.*?)`", page[page.index(code):]).group(1)
  script = tmp_path / "example.py"
  script.write_text(code.replace("/tmp/dist_train/blobs",
                                 str(tmp_path / "blobs")))
  result = processes.run_python([str(script)], check=True)
  assert result.stdout.strip().splitlines()[-1] == printed
