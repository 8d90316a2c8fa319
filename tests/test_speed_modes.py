"""Many steps per loop, XLA and mixed precision keep the replica-parity promise.

Each run trains the reference_sum case of tests/parity_run.py (2 epochs of 11
steps, a partial last batch each epoch) in its own process.

Tolerances:
  * float32 modes (steps_per_loop=1, jit_compile): 1e-5, as in test_parity.
  * mixed_bfloat16 / mixed_float16: splitting a global batch moves where the
    16-bit rounding happens (each replica rounds its own partial gradient
    sums), so N replicas may differ from one device by about as much as
    16-bit training differs from float32 training. The test allows twice the
    16-bit-vs-float32 difference of one device, and never more than 1e-2 (3%
    of the largest weight). A loss- or replica-scaling error (a gradient off
    by a factor of 2, or by the loss scale) moves the weights by the size of
    the whole update, over 10 times that.
"""

import concurrent.futures

import pytest

from tests import test_parity

FLOAT32_TOLERANCE = 1e-5
MIXED_ABSOLUTE_TOLERANCE = 1e-2

RUNS = [("reference_sum", 1), ("reference_sum", 2),
        ("reference_steps_per_loop_1", 1), ("reference_steps_per_loop_1", 2),
        ("reference_jit", 1), ("reference_jit", 2),
        ("reference_bfloat16", 1), ("reference_bfloat16", 2),
        ("reference_float16", 1), ("reference_float16", 2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{(case, replicas): saved result}; two processes at a time."""
  tmp_dir = str(tmp_path_factory.mktemp("speed_modes"))
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    futures = {run: pool.submit(test_parity._train, tmp_dir, *run)  # pylint: disable=protected-access
               for run in RUNS}
    return {run: future.result() for run, future in futures.items()}


def _difference(a, b):
  return test_parity._max_weight_difference(a, b)  # pylint: disable=protected-access


def test_one_step_per_loop_matches_many(runs):
  """steps_per_loop=1 and 3 make the same updates, on 1 and on 2 replicas."""
  for replicas in (1, 2):
    one_step = runs[("reference_steps_per_loop_1", replicas)]
    three_steps = runs[("reference_sum", replicas)]
    assert int(one_step["global_step"]) == int(three_steps["global_step"]) == 22
    difference = _difference(one_step, three_steps)
    assert difference < FLOAT32_TOLERANCE, (replicas, difference)


@pytest.mark.parametrize("case", ["reference_steps_per_loop_1",
                                  "reference_jit"])
def test_float32_modes_match_one_device(runs, case):
  """2 replicas in the mode match 1 device without it (plain float32)."""
  difference = _difference(runs[(case, 2)], runs[("reference_sum", 1)])
  assert difference < FLOAT32_TOLERANCE, f"{case}: {difference:.2e}"


def test_jit_compile_matches_plain_on_one_device(runs):
  difference = _difference(runs[("reference_jit", 1)],
                           runs[("reference_sum", 1)])
  assert difference < FLOAT32_TOLERANCE, difference


@pytest.mark.parametrize("case", ["reference_bfloat16", "reference_float16"])
def test_mixed_precision_replicas_match_one_device(runs, case):
  one, two = runs[(case, 1)], runs[(case, 2)]
  assert int(one["global_step"]) == int(two["global_step"]) == 22
  precision_error = _difference(one, runs[("reference_sum", 1)])
  # The mode is really on: 16-bit training differs from float32 training.
  assert precision_error > 100 * FLOAT32_TOLERANCE, precision_error
  replica_error = _difference(one, two)
  assert replica_error < min(2 * precision_error, MIXED_ABSOLUTE_TOLERANCE), (
      f"{case}: 2 replicas differ from 1 device by {replica_error:.2e}; "
      f"16-bit vs float32 on 1 device: {precision_error:.2e}")
  # And it still learns as well as float32 does.
  assert float(two["validation_loss"]) == pytest.approx(
      float(runs[("reference_sum", 1)]["validation_loss"]), abs=0.05)
