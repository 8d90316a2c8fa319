"""Every failure ends with one `dist_train: error:` line and loses no work.

Each failure is reproduced for real, by the command line in its own process: a
model_dir on a read-only tmpfs, a tmpfs that fills up, user code that raises,
flagfiles that cannot be read. Failures that only need to raise are checked
case by case in tests/integration/test_error_messages.py, in one process;
here one command line of each kind shows the line and the exit code. Mounting needs root (or CAP_SYS_ADMIN); those
tests are skipped, saying so, where mount(2) fails with EPERM.
"""

import contextlib
import ctypes
import errno
import hashlib
import os

import keras
import pytest
import tensorflow as tf

from tests.helpers import processes
from tests.helpers import user_code

SMALL_RUN = ["--dataset=synthetic", "--num_train_examples=256",
             "--num_validation_examples=64", "--global_batch_size=32",
             "--epochs=1", "--mode=train"]  # 8 steps, no validation pass.
# 784-256-256-10 weights, SGD: a checkpoint and a model.keras of ~1.1 MB.
ONE_MB_MODEL = "--hidden_units=256"
MB = 1024 * 1024

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                        ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_MS_RDONLY, _MS_REMOUNT, _MNT_DETACH = 1, 32, 2


def _mount_tmpfs(path, options, flags=0):
  if _libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", flags,
                 options.encode()) != 0:
    error = ctypes.get_errno()
    if error == errno.EPERM:
      pytest.skip(f"cannot mount a tmpfs at {path}: {os.strerror(error)} "
                  "(needs root or CAP_SYS_ADMIN)")
    raise OSError(error, os.strerror(error), str(path))


@contextlib.contextmanager
def tmpfs(path, size_bytes, *, read_only=False):
  """A tmpfs of `size_bytes` mounted at `path` (created) while in the block."""
  path.mkdir()
  _mount_tmpfs(path, f"size={size_bytes}", _MS_RDONLY if read_only else 0)
  try:
    yield path
  finally:
    if _libc.umount2(os.fsencode(path), 0) != 0:
      _libc.umount2(os.fsencode(path), _MNT_DETACH)  # Busy: detach lazily.


def free_space(path):
  """Makes the file system of `path` a bigger disk: the user freed space."""
  _mount_tmpfs(path, "size=64m", _MS_REMOUNT)


def fill(path, leave_pages):
  """Fills the file system of `path`, leaving `leave_pages` pages free."""
  fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT)
  try:
    for chunk in (MB, 4096):
      with contextlib.suppress(OSError):  # ENOSPC: full at this granularity.
        while True:
          os.write(fd, b"\0" * chunk)
  finally:
    os.close(fd)
  os.truncate(path / "filler",
              os.path.getsize(path / "filler") - leave_pages * 4096)
  assert os.statvfs(path).f_bavail == leave_pages


def one_line(result, exit_code=1):
  """The run's one error line, after checking its exit code and that no
  traceback was printed."""
  assert result.returncode == exit_code, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  return processes.error_line(result).removeprefix("dist_train: error: ")


def sha256(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


# 1. A model_dir that cannot be created or written: found before TensorFlow
# starts, by ownership.check_writable, so stderr holds nothing but the line.


def test_model_dir_under_a_file_is_refused_before_tensorflow(tmp_path):
  (tmp_path / "results").write_text("")
  model_dir = tmp_path / "results" / "run"
  result = processes.run_cli(f"--model_dir={model_dir}", *SMALL_RUN)
  line = one_line(result)
  assert line == (f"cannot create --model_dir={model_dir}: "
                  f"{tmp_path / 'results'} is a file, not a directory")
  assert result.stderr.strip() == f"dist_train: error: {line}"


def test_model_dir_on_a_read_only_file_system_is_refused_before_tensorflow(
    tmp_path):
  with tmpfs(tmp_path / "ro", 2 * MB, read_only=True) as mount:
    # A model_dir to create, and one that exists but takes no file.
    for model_dir, path in [(mount / "run", f"{mount}/run: "),
                            (mount, f"{mount}/.write_probe.")]:
      result = processes.run_cli(f"--model_dir={model_dir}", *SMALL_RUN)
      line = one_line(result)
      assert line.startswith(f"cannot write to --model_dir={model_dir}: {path}")
      assert line.endswith(": Read-only file system")
      assert result.stderr.strip() == f"dist_train: error: {line}"


# Root writes through permission bits, so this case can only be seen as
# another user.
@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")
def test_model_dir_without_permission_is_refused_before_tensorflow(tmp_path):
  parent = tmp_path / "locked"
  parent.mkdir(mode=0o500)
  result = processes.run_cli(f"--model_dir={parent / 'run'}", *SMALL_RUN)
  line = one_line(result)
  assert line == (f"cannot write to --model_dir={parent / 'run'}: "
                  f"{parent / 'run'}: Permission denied")
  assert result.stderr.strip() == f"dist_train: error: {line}"


# 2. The disk fills up: checkpoints, the export and the summaries each fail
# with a line naming what could not be written; what was saved stays intact.


def test_disk_full_while_checkpointing_keeps_earlier_checkpoints(tmp_path):
  # 4 MB hold three checkpoints of ~1.1 MB (steps 2, 4, 6), not a fourth.
  with tmpfs(tmp_path / "disk", 4 * MB) as mount:
    model_dir = mount / "run"
    checkpoint_dir = model_dir / "checkpoints"
    command = [f"--model_dir={model_dir}", *SMALL_RUN, ONE_MB_MODEL,
               "--checkpoint_every_steps=2", "--keep_checkpoints=20"]
    result = processes.run_cli(*command)
    assert one_line(result) == (
        f"cannot write the checkpoint of step 8 to {checkpoint_dir}/ckpt-8: "
        "No space left on device; the latest intact checkpoint is "
        f"{checkpoint_dir}/ckpt-6 (step 6): free the space or fix the mount "
        "and rerun the same command to resume from it")
    # The failed save left nothing behind, and the earlier ones restore.
    assert not [name for name in os.listdir(checkpoint_dir) if "_temp" in name]
    state = tf.train.get_checkpoint_state(str(checkpoint_dir))
    expected = [f"{checkpoint_dir}/ckpt-{step}" for step in (2, 4, 6)]
    assert list(state.all_model_checkpoint_paths) == expected
    for path in expected:
      reader = tf.train.load_checkpoint(path)
      for name in reader.get_variable_to_shape_map():
        reader.get_tensor(name)

    free_space(mount)
    resumed = processes.run_cli(*command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming at step 6 (epoch 1, step 6 of 8)" in resumed.stderr
    assert tf.train.latest_checkpoint(str(checkpoint_dir)).endswith("ckpt-8")


def test_disk_full_while_exporting_keeps_the_previous_export(tmp_path):
  # After the first run (a checkpoint and model.keras of ~1.1 MB each), 3.6
  # MB hold the second run's checkpoint but not its new model.keras.
  with tmpfs(tmp_path / "disk", int(3.6 * MB)) as mount:
    model_dir = mount / "run"
    export = model_dir / "export" / "model.keras"
    first = [f"--model_dir={model_dir}", *SMALL_RUN, ONE_MB_MODEL]
    processes.run_cli(*first, check=True)
    exported = sha256(export)

    command = [*first, "--epochs=2"]
    result = processes.run_cli(*command)
    assert one_line(result) == (
        f"cannot write the export {export}: No space left on device; the "
        "previous one is unchanged; the checkpoints hold the trained model, "
        "and rerunning the same command exports it")
    assert sha256(export) == exported
    assert os.listdir(export.parent) == ["model.keras"]
    assert tf.train.latest_checkpoint(
        str(model_dir / "checkpoints")).endswith("ckpt-16")

    free_space(mount)
    rerun = processes.run_cli(*command, check=True)
    assert "Already trained for 2 epochs" in rerun.stderr
    assert sha256(export) != exported


def test_disk_full_while_exporting_the_saved_model(tmp_path):
  # 2.7 MB hold a checkpoint and model.keras (~1.1 MB each), not a
  # SavedModel besides.
  with tmpfs(tmp_path / "disk", int(2.7 * MB)) as mount:
    model_dir = mount / "run"
    export_dir = model_dir / "export"
    result = processes.run_cli(f"--model_dir={model_dir}", *SMALL_RUN,
                              ONE_MB_MODEL, "--export_saved_model")
    assert one_line(result) == (
        f"cannot write the export {export_dir}/saved_model: No space left on "
        "device; there was none before; the checkpoints hold the trained "
        "model, and rerunning the same command exports it")
    assert os.listdir(export_dir) == ["model.keras"]  # No partial SavedModel.
    model = keras.saving.load_model(export_dir / "model.keras")
    assert model.count_params() == 784 * 256 + 256 + 256 * 256 + 256 + 2570


@pytest.fixture
def user_module(tmp_path):
  """(module path, file, env) of the failing user code, as a package."""
  return user_code.write_package(tmp_path)


def test_disk_full_while_writing_the_run_record(tmp_path):
  # Three free pages: the lock record and the events file (its run
  # description over 4 KB) take them, both made before the first step;
  # run.cfg, written then, finds none.
  with tmpfs(tmp_path / "disk", 2 * MB) as mount:
    fill(mount, leave_pages=3)
    model_dir = mount / "run"
    result = processes.run_cli(f"--model_dir={model_dir}", *SMALL_RUN)
    line = one_line(result)
    assert line == (f"cannot write the run record in {model_dir}: No space "
                    "left on device; the checkpoints are unaffected: free the "
                    "space and rerun the same command to resume"), line
    assert result.returncode == 1


@pytest.mark.parametrize("mode", ["raises", "drops silently"])
def test_disk_full_while_writing_summaries(tmp_path, user_module, mode):
  # Five free pages: the lock record takes one, run.cfg and run.json one
  # each, the events file (its run description over 4 KB) the last two.
  # TensorFlow raises when flushing its buffer fails, but ignores a failed
  # write of an event larger than the buffer, like the deep model's summary.
  module, _, env = user_module
  model = "mlp" if mode == "raises" else f"{module}:deep"
  with tmpfs(tmp_path / "disk", 2 * MB) as mount:
    fill(mount, leave_pages=5)
    model_dir = mount / "run"
    result = processes.run_cli(f"--model_dir={model_dir}", *SMALL_RUN,
                              f"--model={model}", "--log_every_steps=1",
                              "--metrics_file=none",
                              env_overrides=env)
    line = one_line(result)
    assert line.startswith(
        f"cannot write TensorBoard events to {model_dir}/train")
    assert "No space left on device" in line
    assert line.endswith("the checkpoints are unaffected: free the space and "
                         "rerun the same command to resume from the latest "
                         "one")
    if mode == "drops silently":
      assert "1 of 2 events lost; TensorFlow's summary writer reports no " in (
          line)


def test_disk_full_while_writing_the_metrics_file(tmp_path):
  # Five free pages, as above: metrics.jsonl's first line (the first log
  # step's) finds none after the events file took the last two.
  with tmpfs(tmp_path / "disk", 2 * MB) as mount:
    fill(mount, leave_pages=5)
    model_dir = mount / "run"
    result = processes.run_cli(f"--model_dir={model_dir}", *SMALL_RUN,
                              "--log_every_steps=1")
    assert one_line(result) == (
        f"cannot write the metrics file {model_dir}/metrics.jsonl: No space "
        "left on device; the checkpoints are unaffected: free the space and "
        "rerun the same command to resume from the latest one")
    assert result.returncode == 1


# 3. User code that raises, or cannot be called as dist_train calls it: the
# line names the flag, the exception and the user's own file:line. Each case
# raises its error in tests/integration/test_error_messages.py; one runs here
# through the command line, for the line and the exit code.


@pytest.mark.parametrize("flag, function, expected", [
    ("model", "raises", "raised ValueError: bad width (at {raise ValueError})"),
])
def test_user_code_that_raises_names_flag_exception_and_line(
    tmp_path, user_module, flag, function, expected):
  module, file, env = user_module
  result = processes.run_cli(f"--model_dir={tmp_path / 'run'}", *SMALL_RUN,
                            f"--{flag}={module}:{function}", env_overrides=env)
  where = expected[expected.index("{") + 1:expected.index("}")]
  expected = expected.replace(f"{{{where}}}", user_code.line_of(file, where))
  separator = " " if expected.startswith("raised") else ": "
  assert one_line(result) == (
      f"--{flag}={module}:{function}{separator}{expected}")
  assert not (tmp_path / "run" / "checkpoints").exists()


# 4. A flagfile that cannot be read: one line naming it, before TensorFlow.


@pytest.mark.parametrize("kind, reason", [
    ("binary", "it is not UTF-8 text (byte 0x80: invalid start byte); a "
     "flagfile holds one --flag=value per line"),
    ("latin-1", "it is not UTF-8 text (byte 0xe9: invalid continuation byte); "
     "a flagfile holds one --flag=value per line"),
    ("directory", "Is a directory"),
    ("missing", "No such file or directory"),
])
def test_unreadable_flagfile_is_named(tmp_path, kind, reason):
  flagfile = tmp_path / "run.cfg"
  if kind == "binary":
    flagfile.write_bytes(bytes(range(256)))
  elif kind == "latin-1":
    flagfile.write_bytes("--model_dir=/tmp/r\n--dataset=synthétic\n"
                         .encode("latin-1"))
  elif kind == "directory":
    flagfile.mkdir()
  # A nested flagfile is named too, not the one that includes it.
  outer = tmp_path / "outer.cfg"
  outer.write_text(f"--flagfile={flagfile}\n")
  for given in (flagfile, outer):
    result = processes.run_cli(f"--flagfile={given}")
    line = one_line(result)
    assert line == f"cannot read --flagfile={flagfile}: {reason}"
    assert result.stderr.strip() == f"dist_train: error: {line}"


# 5. Any other exception: the line names the phase of the run it ended, and
# the user's file:line when user code raised it (every phase is checked in
# tests/integration/test_error_messages.py; the one inside the compiled
# training steps runs here through the command line).


@pytest.mark.parametrize("flags, phase, message, where", [
    (["--model={module}:raises_in_training"],
     "training steps 1-8",
     "RuntimeError: boom in training (in Boom.call())",
     'raise RuntimeError("boom in training")'),
])
def test_other_exceptions_name_the_phase(tmp_path, user_module, flags, phase,
                                         message, where):
  module, file, env = user_module
  # Flags given later win: a user --dataset replaces the synthetic one.
  result = processes.run_cli(
      f"--model_dir={tmp_path / 'run'}", *SMALL_RUN,
      *[flag.format(module=module) for flag in flags], env_overrides=env)
  line = one_line(result)
  assert line.startswith(f"{phase}: {message} (at {user_code.line_of(file, where)})")


def test_traceback_flag_prints_the_traceback_then_the_line(tmp_path):
  (tmp_path / "results").write_text("")
  model_dir = tmp_path / "results" / "run"
  result = processes.run_cli(f"--model_dir={model_dir}", "--traceback")
  assert result.returncode == 1
  assert "Traceback (most recent call last)" in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f"dist_train: error: cannot create --model_dir={model_dir}: "
      f"{tmp_path / 'results'} is a file, not a directory")
