"""Bad flags end the command line with one line and exit code 1, before
TensorFlow loads: checked in this process by calling `main` as the command
line does (absl's flagsaver restores the flags after each case).

tests/e2e/test_main.py and test_bad_input.py run one bad flag each through a
real command line, for the exit code and to show that TensorFlow is never
imported.
"""

from absl.testing import flagsaver
import pytest

from dist_train import main
from tests.helpers import processes

CPU_TEST_FLAGS = f"--flagfile={processes.FLAGS_DIR}/cpu_test.cfg"


def cli_error(capsys, monkeypatch, *flags):
  """(exit code, the `dist_train: error:` lines) of `dist_train.main FLAGS`,
  run here; fails if the run got as far as loading TensorFlow."""
  def would_start_tensorflow():
    raise AssertionError(f"{flags} got past the checks made before "
                         "TensorFlow loads")
  monkeypatch.setattr(main.logs, "quiet_tensorflow_startup",
                      would_start_tensorflow)
  capsys.readouterr()
  with flagsaver.flagsaver(), pytest.raises(SystemExit) as exited:
    main.main(main.parse_flags(["dist_train", *flags]))
  lines = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("dist_train: error:")]
  return exited.value.code, lines


@pytest.mark.parametrize("flags, message", [
    (["--flagfile=/nonexistent/flags.cfg"],
     "cannot read --flagfile=/nonexistent/flags.cfg: No such file"),
    (["--bogus_flag=1"], "Unknown command line flag 'bogus_flag'"),
    (["--dataset=imagenet"], "--dataset must be one of"),
    (["--global_batch_size=0"],
     "--global_batch_size must be positive, got 0"),
    (["--global_batch_size=-4"],
     "--global_batch_size must be positive, got -4"),
    (["--cpu_replicas=2", "--strategy=one_device"],
     "cannot be combined with --strategy=one_device"),
])
def test_bad_input_exits_with_one_line_before_training(
    tmp_path, capsys, monkeypatch, flags, message):
  model_dir = tmp_path / "run"
  code, lines = cli_error(capsys, monkeypatch, CPU_TEST_FLAGS,
                          f"--model_dir={model_dir}", *flags)
  assert code == 1
  assert len(lines) == 1 and message in lines[0], lines
  assert not model_dir.exists()  # No training work was done.


@pytest.mark.parametrize("flag, message", [
    ("--keep_checkpoints=0", "--keep_checkpoints must be positive, got 0"),
    ("--checkpoint_every_steps=-5",
     "--checkpoint_every_steps must be positive, got -5"),
    ("--log_every_steps=0", "--log_every_steps must be positive, got 0"),
    ("--on_corrupt_checkpoint=ignore", "--on_corrupt_checkpoint=ignore"),
    ("--optimizer=lbfgs", "--optimizer=lbfgs"),
    ("--learning_rate=-1", "--learning_rate must be positive, got -1.0"),
])
def test_bad_flags_exit_1(tmp_path, capsys, monkeypatch, flag, message):
  code, lines = cli_error(capsys, monkeypatch, f"--model_dir={tmp_path}/run",
                          flag)
  assert code == 1
  assert len(lines) == 1 and message in lines[0], lines


def test_missing_model_dir_is_refused(capsys, monkeypatch):
  code, lines = cli_error(capsys, monkeypatch, "--dataset=synthetic")
  assert code == 1
  assert len(lines) == 1 and "--model_dir" in lines[0], lines
