"""NaN and Inf: named loss terms stop the run (exit 3), and no checkpoint ever
holds a non-finite weight."""

import os

import numpy as np
import pytest
import tensorflow as tf

from dist_train.loop import guards
from dist_train.models import mnist
from tests.helpers import processes

# One epoch of 20 steps of 32 examples.
_RUN_FLAGS = ["--dataset=synthetic", "--num_train_examples=640",
              "--num_validation_examples=64", "--global_batch_size=32",
              "--epochs=1", "--learning_rate=0.01"]


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_check_variables_names_the_non_finite_weight(value):
  model = mnist.create_mlp(hidden_units=4)
  guards.check_variables(model.variables)  # Finite: no error.
  kernel = model.get_layer("dense_2").kernel
  kernel.assign(tf.tensor_scatter_nd_update(kernel, [[1, 2]], [value]))
  with pytest.raises(guards.NonFiniteError,
                     match=r"^variable dense_2/kernel holds NaN or Inf; "
                           "refusing to write it to a checkpoint$"):
    guards.check_variables(model.variables)


def test_check_losses_names_each_non_finite_term():
  guards.check_losses({"loss": 1.0, "add_loss": 0.0}, first_step=1,
                      last_step=2)
  with pytest.raises(guards.NonFiniteError) as raised:
    guards.check_losses({"loss": np.inf, "cross_entropy": 2.0,
                         "regularization": np.inf, "add_loss": np.nan},
                        first_step=5, last_step=8)
  assert str(raised.value) == (
      "non-finite loss in steps 5-8: loss=inf, regularization=inf, "
      "add_loss=nan; no checkpoint of these steps was written")
  assert raised.value.exit_code == 3


@pytest.mark.parametrize("flags, term", [
    # 1e38 times a sum of squared weights overflows float32 at step 1.
    (["--kernel_l2=1e38"], "regularization"),
    # The reference add_loss layer: 1e38 times a sum of activations.
    (["--activity_regularization=1e38", "--add_loss_reduction=sum"],
     "add_loss"),
])
def test_non_finite_loss_term_is_named(tmp_path, flags, term):
  model_dir = tmp_path / "run"
  # One step per loop: the loss terms checked first are those of step 1.
  result = processes.run_cli(*_RUN_FLAGS, f"--model_dir={model_dir}",
                            "--steps_per_loop=1", "--log_every_steps=1",
                            *flags)
  assert result.returncode == 3, result.stderr[-3000:]
  line = processes.error_line(result)
  assert "non-finite loss in steps 1-1: " in line, line
  assert f" {term}=inf" in line, line
  # The step's cross-entropy was finite; only the term at fault is named.
  others = {"cross_entropy", "regularization", "add_loss"} - {term}
  assert not any(f"{name}=" in line for name in others), line
  assert not list((model_dir / "checkpoints").glob("ckpt-*"))


def test_non_finite_weight_is_never_saved(tmp_path):
  """A weight turns NaN at step 8 while every loss stays finite: the save at
  step 9 is refused, and the earlier checkpoints are kept intact."""
  model_dir = tmp_path / "run"
  result = processes.run_cli(
      *_RUN_FLAGS, f"--model_dir={model_dir}",
      "--model=tests.helpers.model_fixtures:nan_weight_from_step_8",
      "--steps_per_loop=3", "--log_every_steps=3",
      "--checkpoint_every_steps=3")
  assert result.returncode == 3, result.stderr[-3000:]
  assert processes.error_line(result) == (
      "dist_train: error: variable nan_weight/poison holds NaN or Inf; "
      "refusing to write it to a checkpoint")
  assert "step 9 | epoch 1/1 | loss " in result.stderr  # The losses were fine.
  checkpoint_dir = str(model_dir / "checkpoints")
  assert sorted(os.listdir(checkpoint_dir)) == [
      "checkpoint", "ckpt-3.data-00000-of-00001", "ckpt-3.index",
      "ckpt-6.data-00000-of-00001", "ckpt-6.index"]
  assert tf.train.latest_checkpoint(checkpoint_dir).endswith("ckpt-6")
  for step in (3, 6):
    reader = tf.train.load_checkpoint(os.path.join(checkpoint_dir,
                                                   f"ckpt-{step}"))
    values = {name: reader.get_tensor(name)
              for name in reader.get_variable_to_shape_map()}
    [calls] = [v for name, v in values.items() if "/calls/" in name]
    [poison] = [v for name, v in values.items() if "/poison/" in name]
    assert (calls, poison) == (step, 0.0)
    for name, value in values.items():
      if np.issubdtype(np.asarray(value).dtype, np.floating):
        assert np.all(np.isfinite(value)), (step, name)
  assert not (model_dir / "export").exists()
