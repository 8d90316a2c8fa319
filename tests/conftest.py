"""The suite's tiers and the runs that several test modules read.

Each test gets the marker of its folder: `unit` (fast, no process of its
own), `integration` (real TensorFlow training in the test's process) and
`e2e` (dist_train in processes of its own: the CLI, launchers, workers), so
that `python -m pytest -m "not e2e" tests` is the quick inner loop.
"""

import fcntl
import os
import pickle

import pytest

from tests.helpers import processes

# TensorFlow's C++ start-up banner hides the lines tests assert on; errors
# (level 3) still print.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TIERS = ("unit", "integration", "e2e")
_HERE = os.path.dirname(os.path.abspath(__file__))


# The modules that take longest (CPU seconds measured on 2 cores), started
# first so that the xdist workers end together: the short modules fill
# in at the end.
_LONGEST_FIRST = ("test_eight_workers", "test_fault_tolerance",
                  "test_multi_worker", "test_tasks", "test_step_budgets",
                  "test_input", "test_model_families", "test_parity",
                  "test_sync_batchnorm", "test_ema", "test_doctor",
                  "test_plateau", "test_spike_recovery", "test_health",
                  "test_long_jobs", "test_failures", "test_soak",
                  "test_examples", "test_early_stopping", "test_main",
                  "test_stop", "test_readme")


def _start_order(item):
  name = item.path.stem
  tier = os.path.relpath(str(item.path), _HERE).split(os.sep)[0]
  if name in _LONGEST_FIRST:
    return (0, _LONGEST_FIRST.index(name))
  return (1 + (TIERS[::-1].index(tier) if tier in TIERS else 3), 0)


def pytest_collection_modifyitems(config, items):
  for item in items:
    tier = os.path.relpath(str(item.path), _HERE).split(os.sep)[0]
    if tier in TIERS:
      item.add_marker(getattr(pytest.mark, tier))
  items.sort(key=_start_order)  # Stable: a module's tests keep their order.
  # The parity runs the collected modules ask for (PARITY_RUNS =
  # {replicas: [case, ...]}), made once per session by `parity_runs`.
  wanted = {}
  modules = {item.module.__name__: item.module for item in items if item.module}
  for _, module in sorted(modules.items()):
    for replicas, cases in getattr(module, "PARITY_RUNS", {}).items():
      wanted.setdefault(replicas, [])
      wanted[replicas] += [c for c in cases if c not in wanted[replicas]]
  config.stash[_PARITY_RUNS_WANTED] = wanted


_PARITY_RUNS_WANTED = pytest.StashKey[dict]()


def _made_once(tmp_path_factory, name, make):
  """make(directory) once per pytest run, however many xdist workers ask.

  pytest-xdist gives each worker its own session, so a session fixture
  would be made once per worker; the first worker to ask makes it under a
  file lock in the directory the workers share, and the others load what it
  returned.
  """
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # Shared by the workers of this run.
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    made = root / f"{name}.pickle"
    if made.exists():
      return pickle.loads(made.read_bytes())
    directory = root / name
    directory.mkdir(exist_ok=True)  # A failed earlier try left it.
    value = make(str(directory))
    made.write_bytes(pickle.dumps(value))
    return value


@pytest.fixture(scope="session")
def cpu_test_run(tmp_path_factory):
  """(model_dir, CompletedProcess) of launch/flags/cpu_test.cfg as it is, run
  once for the run through the command line. Read it only; a test that
  trains on in it takes a copy (`processes.copy_run`)."""
  def make(directory):
    model_dir = os.path.join(directory, "run")
    return model_dir, processes.run_cli(
        f"--flagfile={processes.FLAGS_DIR}/cpu_test.cfg",
        f"--model_dir={model_dir}", check=True)
  return _made_once(tmp_path_factory, "cpu_test", make)


@pytest.fixture(scope="session")
def parity_runs(request, tmp_path_factory):
  """(output_dir, {(case, replicas): saved result}): every parity run that
  the collected modules declare, trained once for the session with one
  process per replica count. A case's model_dir is output_dir/CASE_REPLICAS.
  """
  # Here, not at the top: pytest-xdist's controller loads this file too, and
  # parity imports TensorFlow, which only the workers need.
  from tests.helpers import parity  # pylint: disable=import-outside-toplevel
  wanted = request.config.stash.get(_PARITY_RUNS_WANTED, {})
  return _made_once(
      tmp_path_factory, "parity",
      lambda output_dir: (output_dir, parity.train_all(output_dir, wanted)))
