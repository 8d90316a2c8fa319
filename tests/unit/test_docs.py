"""README.md and docs/ stay true to the repository: their links resolve, the
flags they name exist, and the README stays short enough to read first."""

import dataclasses
import glob
import os
import re

import pytest

from dist_train import config as config_lib
from tests.helpers import processes

README_MAX_BYTES = 12_288

# Flags of other programs that the pages show in commands, by program.
FOREIGN_FLAGS = {
    "logdir": "tensorboard",
    "nodes": "sbatch",
    "dependency": "sbatch",
    "signal": "sbatch",
    "ntasks": "srun",
}
# This repository's absl programs: their flags are read from their own
# --helpfull, so a renamed or removed flag fails here.
ABSL_PROGRAMS = ("dist_train.main", "launch.local", "launch.k8s.worker",
                 "dist_train.doctor")
# Its scripts (argparse): their flags are read from the source.
SCRIPTS = ("scripts/benchmark.py", "scripts/make_mnist_sample.py",
           "scripts/plot_run.py", "scripts/soak.py")

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9_-]*)")
_CODE_BLOCK = re.compile(r"```.*?```", re.S)


def _pages():
  return [os.path.join(processes.REPO_ROOT, "README.md"),
          *sorted(glob.glob(os.path.join(processes.REPO_ROOT, "docs", "*.md")))]


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def _anchor(heading):
  """GitHub's anchor of a Markdown heading."""
  text = heading.strip().lower()
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


def _anchors(path):
  text = _CODE_BLOCK.sub("", _read(path))
  return {_anchor(line.lstrip("#")) for line in text.splitlines()
          if re.match(r"#{1,6} ", line)}


def _page_ids(paths):
  return [os.path.relpath(p, processes.REPO_ROOT) for p in paths]


def test_the_docs_pages_exist():
  names = {os.path.basename(p) for p in _pages()}
  assert {"flags.md", "tasks.md", "data.md", "evaluation.md",
          "scaling-out.md", "failures.md", "performance.md",
          "architecture.md"} <= names, names


def test_the_readme_is_short():
  size = os.path.getsize(os.path.join(processes.REPO_ROOT, "README.md"))
  print(f"README.md: {size} bytes (limit {README_MAX_BYTES})")
  assert size <= README_MAX_BYTES


@pytest.mark.parametrize("path", _pages(), ids=_page_ids(_pages()))
def test_every_relative_link_resolves(path):
  text = _CODE_BLOCK.sub("", _read(path))
  links = _LINK.findall(text)
  for link in links:
    if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
      continue
    target, _, anchor = link.partition("#")
    target_path = (os.path.normpath(os.path.join(os.path.dirname(path),
                                                 target))
                   if target else path)
    assert os.path.exists(target_path), f"{link}: no {target_path}"
    if anchor:
      assert target_path.endswith(".md"), link
      assert anchor in _anchors(target_path), (
          f"{link}: no heading with the anchor #{anchor} in {target_path}")


@pytest.fixture(scope="module")
def program_flags():
  """{program: its flags} of this repository's command-line programs."""
  found = {}
  for program in ABSL_PROGRAMS:
    result = processes.run_python(["-m", program, "--helpfull"], timeout=60)
    found[program] = set(re.findall(r"^\s+(?:-\?,)?--(?:\[no\])?(\w+)",
                                    result.stdout, re.M))
  for script in SCRIPTS:
    source = _read(os.path.join(processes.REPO_ROOT, script))
    found[script] = set(re.findall(r'add_argument\(\s*"--([\w-]+)"', source))
  return found


def test_the_programs_flags_are_found(program_flags):
  """The flags each program is checked against cannot silently be none."""
  assert {field.name for field in dataclasses.fields(config_lib.Config)} | {
      "traceback", "flagfile", "helpfull"} <= program_flags["dist_train.main"]
  assert {"num_workers", "gpus_per_worker", "stop_grace_s"} <= program_flags[
      "launch.local"]
  assert {"job_name", "service", "num_workers", "port"} <= program_flags[
      "launch.k8s.worker"]
  assert {"output", "tables", "quick"} <= program_flags["scripts/benchmark.py"]
  assert "lr_schedule" not in program_flags["launch.local"]
  assert {"timeout_s", "model_dir", "cpu_replicas", "slurm_port_base"} <= (
      program_flags["dist_train.doctor"])


@pytest.mark.parametrize("path", _pages(), ids=_page_ids(_pages()))
def test_every_flag_named_exists(path, program_flags):
  known = set(FOREIGN_FLAGS).union(*program_flags.values())
  unknown = sorted({name for name in _FLAG.findall(_read(path))
                    if name not in known})
  assert not unknown, (
      f"{os.path.relpath(path, processes.REPO_ROOT)} names flags that no "
      f"program here defines: {unknown}")
