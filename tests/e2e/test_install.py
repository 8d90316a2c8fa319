"""`pip install .` gives a working `dist-train` command outside the checkout."""

import glob
import os
import shutil
import site
import subprocess
import sys
import tomllib

from tests.helpers import processes


def _requirements(name):
  """The requirement lines of a requirements file, without -r/-c and comments."""
  with open(os.path.join(processes.REPO_ROOT, name)) as f:
    lines = [line.split(" #")[0].strip() for line in f]
  return [line for line in lines if line and not line.startswith(("#", "-"))]


def test_pyproject_lists_the_same_ranges_as_the_requirement_files():
  with open(os.path.join(processes.REPO_ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  assert project["dependencies"] == _requirements("requirements.txt")
  assert project["optional-dependencies"]["dev"] == _requirements(
      "requirements-dev.txt")
  assert project["optional-dependencies"]["profile"] == _requirements(
      "requirements-profile.txt")


def _run(args, *, cwd, env, timeout=300):
  result = subprocess.run(args, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
  assert result.returncode == 0, (
      f"{' '.join(args)} exited {result.returncode}:\n"
      f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
  return result


def _make_venv(venv_dir, env):
  """A venv that also sees this interpreter's packages (TensorFlow)."""
  _run([sys.executable, "-m", "venv", "--system-site-packages", venv_dir],
       cwd=os.path.dirname(venv_dir), env=env)
  python = os.path.join(venv_dir, "bin", "python")
  site_packages = _run(
      [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
      cwd=os.path.dirname(venv_dir), env=env).stdout.strip()
  # --system-site-packages reaches the base interpreter's packages only; when
  # the tests run in a venv, TensorFlow is in that venv's site-packages. They
  # come after the new venv's own, so its dist_train is the one imported.
  with open(os.path.join(site_packages, "parent_site_packages.pth"), "w") as f:
    for directory in site.getsitepackages():
      f.write(f"import site; site.addsitedir({directory!r})\n")
  return python, site_packages


def test_installed_command_trains_from_outside_the_checkout(tmp_path):
  env = processes.subprocess_env({"PYTHONNOUSERSITE": "1"})
  del env["PYTHONPATH"]  # Nothing may come from the checkout.
  # Built from a copy so that the build writes nothing into the checkout and
  # no leftover build/ output of an older layout gets into the wheel.
  source = tmp_path / "source"
  shutil.copytree(processes.REPO_ROOT, source, ignore=shutil.ignore_patterns(
      ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
  python, site_packages = _make_venv(str(tmp_path / "venv"), env)
  _run([python, "-m", "pip", "install", "--quiet", "--no-deps",
        "--ignore-installed", "--disable-pip-version-check", str(source)],
       cwd=tmp_path, env=env)

  imported = _run([python, "-c", "import dist_train; print(dist_train.__file__)"],
                  cwd=tmp_path, env=env).stdout.strip()
  package_dir = os.path.join(site_packages, "dist_train")
  assert os.path.realpath(imported) == os.path.realpath(
      os.path.join(package_dir, "__init__.py"))
  assert glob.glob(os.path.join(package_dir, "**", "mnist_sample.npz"),
                   recursive=True)

  # The packaged sample, read from the installed package, on 2 replicas.
  model_dir = tmp_path / "run"
  result = _run(
      [os.path.join(tmp_path, "venv", "bin", "dist-train"),
       f"--flagfile={processes.FLAGS_DIR}/cpu_test.cfg",
       f"--model_dir={model_dir}", "--dataset=mnist_sample",
       "--num_train_examples=600", "--num_validation_examples=200",
       "--epochs=1"], cwd=tmp_path, env=env)
  assert "Training 600 examples, validating 200" in result.stderr
  assert glob.glob(str(model_dir / "checkpoints" / "ckpt-*.index"))
  # `dist-train doctor` is the installed doctor (its help needs no
  # TensorFlow, so this costs no second TensorFlow start).
  doctor = _run([os.path.join(tmp_path, "venv", "bin", "dist-train"),
                 "doctor", "--helpfull"], cwd=tmp_path, env=env)
  assert doctor.stdout.startswith("usage: dist-train doctor ")
  assert "--timeout_s: Each step of the smoke test" in doctor.stdout
