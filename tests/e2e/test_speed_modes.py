"""Many steps per loop, XLA and mixed precision keep the replica-parity promise.

Each replica count trains the reference_sum case of
tests/helpers/parity_run.py (2 epochs of 11 steps, uneven splits and a
2-example last batch each epoch) and its variants in its own process, the
one that also trains the parity tests' cases. Each mode is shown to be on:
the run reports how many compiled loops it called, XLA itself reports the
modules it compiled for the replicas' gradients, and 16-bit training ends
measurably apart from float32 training.

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

import pytest

from tests.helpers import parity

FLOAT32_TOLERANCE = parity.TOLERANCE
MIXED_ABSOLUTE_TOLERANCE = 1e-2

CASES = ["reference_sum", "reference_steps_per_loop_1", "reference_jit",
         "reference_bfloat16", "reference_float16"]
STEPS = 22
# Compiled loop calls over the 22 steps: with --steps_per_loop=3 loops end
# at steps 3,4,7,8,11 | 12,15,16,19,20,22 (every 4th step logs); with 1,
# one call per step.
LOOP_CALLS = {"reference_steps_per_loop_1": 22}
DEFAULT_LOOP_CALLS = 11


# Trained once for the session (tests/conftest.py: parity_runs), in the
# processes of the parity tests' cases.
PARITY_RUNS = {1: CASES, 2: CASES}


@pytest.fixture(scope="module")
def runs(parity_runs):
  """{(case, replicas): saved result} of this module's cases."""
  _, results = parity_runs
  return {(case, replicas): results[(case, replicas)]
          for replicas, cases in PARITY_RUNS.items() for case in cases}


def _difference(a, b):
  return parity.max_weight_difference(a, b)


def test_each_run_says_it_ran_in_its_mode(runs):
  for (case, replicas), result in runs.items():
    assert int(result["num_replicas"]) == replicas, case
    assert int(result["global_step"]) == STEPS, case
    assert int(result["loop_calls"]) == LOOP_CALLS.get(
        case, DEFAULT_LOOP_CALLS), (case, replicas)
    xla_modules = int(result["xla_modules"])
    if case == "reference_jit":
      # At least one compiled module per replica's forward and backward pass.
      assert xla_modules >= replicas, (case, replicas, xla_modules)
    else:
      assert xla_modules == 0, (case, replicas, xla_modules)
    assert parity.moved(result) > parity.MIN_MOVED, (case, replicas)


def test_one_step_per_loop_matches_many(runs):
  """steps_per_loop=1 and 3 make the same updates, on 1 and on 2 replicas."""
  for replicas in (1, 2):
    difference = _difference(runs[("reference_steps_per_loop_1", replicas)],
                             runs[("reference_sum", replicas)])
    print(f"steps_per_loop 1 vs 3 on {replicas} replica(s): max weight "
          f"difference {difference:.2e}")
    assert difference < FLOAT32_TOLERANCE, (replicas, difference)


@pytest.mark.parametrize("case", ["reference_steps_per_loop_1",
                                  "reference_jit"])
def test_float32_modes_match_one_device(runs, case):
  """2 replicas in the mode match 1 device without it (plain float32)."""
  difference = _difference(runs[(case, 2)], runs[("reference_sum", 1)])
  print(f"{case} on 2 replicas vs 1 device: max weight difference "
        f"{difference:.2e}")
  assert difference < FLOAT32_TOLERANCE, f"{case}: {difference:.2e}"


def test_jit_compile_matches_plain_on_one_device(runs):
  difference = _difference(runs[("reference_jit", 1)],
                           runs[("reference_sum", 1)])
  print(f"jit_compile vs plain on 1 device: max weight difference "
        f"{difference:.2e}")
  assert difference < FLOAT32_TOLERANCE, difference


@pytest.mark.parametrize("case", ["reference_bfloat16", "reference_float16"])
def test_mixed_precision_replicas_match_one_device(runs, case):
  one, two = runs[(case, 1)], runs[(case, 2)]
  precision_error = _difference(one, runs[("reference_sum", 1)])
  # The mode is really on: 16-bit training differs from float32 training.
  assert precision_error > 100 * FLOAT32_TOLERANCE, precision_error
  replica_error = _difference(one, two)
  print(f"{case}: 1 vs 2 replicas {replica_error:.2e}; 16-bit vs float32 on "
        f"1 device {precision_error:.2e}")
  assert replica_error < min(2 * precision_error, MIXED_ABSOLUTE_TOLERANCE), (
      f"{case}: 2 replicas differ from 1 device by {replica_error:.2e}; "
      f"16-bit vs float32 on 1 device: {precision_error:.2e}")
  # And it still learns as well as float32 does.
  assert float(two["validation_loss"]) == pytest.approx(
      float(runs[("reference_sum", 1)]["validation_loss"]), abs=0.05)
