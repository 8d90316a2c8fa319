"""N replicas make exactly the update one device makes on the same global batch.

Each replica count runs in its own process (a process can form only one
collective group size). The data leave a partial last batch every epoch.
"""

import concurrent.futures
import os

import numpy as np
import pytest

from tests import conftest

TOLERANCE = 1e-5


def _train(tmp_dir, case, replicas):
  output = os.path.join(tmp_dir, f"{case}_{replicas}.npz")
  conftest.run_python(["tests/parity_run.py", f"--case={case}",
                       f"--cpu_replicas={replicas}", f"--output={output}"],
                      check=True)
  with np.load(output) as f:
    return dict(f)


RUNS = [("reference_sum", 1), ("reference_sum", 2), ("reference_sum", 4),
        ("keras_mean", 1), ("keras_mean", 2), ("keras_mean", 4),
        ("reference_clip", 1), ("reference_clip", 2),
        ("user_plugins", 1), ("user_plugins", 2),
        ("reference_declared_mean", 1), ("reference_declared_mean", 2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{(case, replicas): saved result}, trained once for the whole module.

  Two processes at a time: one per core of a small CI machine.
  """
  tmp_dir = str(tmp_path_factory.mktemp("parity"))
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    futures = {run: pool.submit(_train, tmp_dir, *run) for run in RUNS}
    return {run: future.result() for run, future in futures.items()}


def _weights(result):
  names = sorted((k for k in result if k.startswith("weight_")),
                 key=lambda k: int(k.split("_")[1]))
  return [result[k] for k in names]


def _max_weight_difference(a, b):
  return max(float(np.max(np.abs(x - y)))
             for x, y in zip(_weights(a), _weights(b)))


@pytest.mark.parametrize("case, replicas", [
    ("reference_sum", 2), ("reference_sum", 4), ("keras_mean", 2),
    ("keras_mean", 4), ("reference_clip", 2), ("user_plugins", 2)])
def test_replicas_match_one_device(runs, case, replicas):
  one, many = runs[(case, 1)], runs[(case, replicas)]
  assert int(one["global_step"]) == int(many["global_step"]) >= 20
  difference = _max_weight_difference(one, many)
  assert difference < TOLERANCE, (
      f"{case}: {replicas} replicas differ from 1 device by {difference:.2e}")


def test_clipping_is_active_in_the_clip_case(runs):
  """Otherwise the clip parity test would only repeat reference_sum."""
  clipped, unclipped = runs[("reference_clip", 1)], runs[("reference_sum", 1)]
  assert _max_weight_difference(clipped, unclipped) > 100 * TOLERANCE


def test_wrongly_scaled_add_loss_breaks_parity(runs):
  """The reference sum layer declared `mean` is scaled by 1/2 on 2 replicas.

  This guards the parity test itself: a scaling error must show up as a
  difference far above the tolerance.
  """
  one = runs[("reference_declared_mean", 1)]
  two = runs[("reference_declared_mean", 2)]
  assert _max_weight_difference(one, two) > 100 * TOLERANCE


@pytest.mark.parametrize("case", ["reference_sum", "keras_mean"])
@pytest.mark.parametrize("metric", ["train_loss", "train_accuracy",
                                    "validation_loss", "validation_accuracy"])
def test_metrics_aggregate_across_replicas(runs, case, metric):
  """Metrics read in cross-replica context equal the single-device values."""
  one, two = float(runs[(case, 1)][metric]), float(runs[(case, 2)][metric])
  assert one == pytest.approx(two, abs=1e-5)
  assert 0.0 < one < (1.0 if "accuracy" in metric else 10.0)
