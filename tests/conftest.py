"""The suite's tiers and the runs that several test modules read.

Each test gets the marker of its folder: `unit` (fast, no process of its
own), `integration` (real TensorFlow training in the test's process) and
`e2e` (dist_train in processes of its own: the CLI, launchers, workers), so
that `python -m pytest -m "not e2e" tests` is the quick inner loop.
"""

import os

import pytest

from tests.helpers import parity
from tests.helpers import processes

# TensorFlow's C++ start-up banner hides the lines tests assert on; errors
# (level 3) still print.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TIERS = ("unit", "integration", "e2e")
_HERE = os.path.dirname(os.path.abspath(__file__))


def _shared_runs(item):
  """The suite's own session- and module-scoped fixtures `item` reads: the
  runs it shares with other tests."""
  shared = set()
  fixture_info = getattr(item, "_fixtureinfo", None)
  for name, definitions in (fixture_info.name2fixturedefs.items()
                            if fixture_info else ()):
    definition = definitions[-1]
    if not definition.func.__module__.startswith("tests."):
      continue  # pytest's own (tmp_path_factory, ...): cheap, per process.
    if definition.scope == "session":
      shared.add(name)
    elif definition.scope == "module":
      shared.add(f"{item.module.__name__}.{name}")
  return shared


def _group_by_shared_runs(items):
  """Puts tests that read the same session or module run (transitively) in
  one pytest-xdist group, so that one worker process makes each run once;
  the other tests go wherever a worker is free."""
  parent = {}

  def root(name):
    while parent.setdefault(name, name) != name:
      name = parent[name]
    return name

  shared = {item.nodeid: sorted(_shared_runs(item)) for item in items}
  for names in shared.values():
    for name in names[1:]:
      parent[root(name)] = root(names[0])
  for item in items:
    if shared[item.nodeid]:
      item.add_marker(pytest.mark.xdist_group(root(shared[item.nodeid][0])))


def pytest_collection_modifyitems(config, items):
  for item in items:
    tier = os.path.relpath(str(item.path), _HERE).split(os.sep)[0]
    if tier in TIERS:
      item.add_marker(getattr(pytest.mark, tier))
  _group_by_shared_runs(items)
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


@pytest.fixture(scope="session")
def cpu_test_run(tmp_path_factory):
  """(model_dir, CompletedProcess) of launch/flags/cpu_test.cfg as it is, run
  once for the session through the command line. Read it only; a test that
  trains on in it takes a copy (`processes.copy_run`)."""
  model_dir = str(tmp_path_factory.mktemp("cpu_test") / "run")
  result = processes.run_cli(f"--flagfile={processes.FLAGS_DIR}/cpu_test.cfg",
                             f"--model_dir={model_dir}", check=True)
  return model_dir, result


@pytest.fixture(scope="session")
def parity_runs(request, tmp_path_factory):
  """(output_dir, {(case, replicas): saved result}): every parity run that
  the collected modules declare, trained once for the session with one
  process per replica count. A case's model_dir is output_dir/CASE_REPLICAS.
  """
  output_dir = str(tmp_path_factory.mktemp("parity"))
  wanted = request.config.stash.get(_PARITY_RUNS_WANTED, {})
  return output_dir, parity.train_all(output_dir, wanted)
