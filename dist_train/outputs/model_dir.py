"""The layout of a run's model_dir: every name in it, and crash-safe writes.

    <model_dir>/
      OWNER.lock             the claim of the run writing here (ownership.py)
      checkpoints/           ckpt-<step>.index, .data-*, `checkpoint` state
      train/ validation/     TensorBoard events of the chief (summaries.py);
      eval/                  train/ also holds profiler traces (profiler.py)
      best/                  ckpt, model.keras, metrics.json (best.py)
      export/model.keras     the final model (export.py)
      export/saved_model/    with --export_saved_model
      eval_results.json      the last evaluation (--mode=evaluate)
      run.cfg                every option of the latest start, a flagfile
      run.<start>.cfg        those of each earlier start (run_record.py)
      run.json               versions, git commit, devices of the latest start
      metrics.jsonl          the chief's scalars, a line per log interval and
                             evaluation (metrics_file.py; --metrics_file)
      training_done.json     written last, when training has ended
      .doctor-<task>-<pid>/  `dist-train doctor`'s test checkpoint, removed
                             after its check (doctor/checks.py)

Everything is read and written through one filesystem API, `tf.io.gfile`, so
a model_dir may be on any TensorFlow filesystem (gs://, hdfs://, ram://).
Libraries that need a local path (Keras' `save`, `zipfile`) get one: a file
or directory on a non-local filesystem is written to a local temporary copy
and copied into place.

Replacing a file or a directory never leaves half of one under its name:
  - a file is written to `<root>.partial<ext>` beside it and renamed over it;
  - a directory is filled under `.<name>.partial`, the old one is moved to
    `.<name>.old`, the new one renamed into place, and the old one removed
    (names that do not start with `<name>`: some filesystems, ram:// among
    them, say a path exists when any longer name starts with it).
The next write (and `recover_dir`, which each user of a directory calls when
it starts) removes what an interrupted write left, and puts `.<name>.old`
back when a run stopped between the two renames. Renames are atomic on POSIX
filesystems; object stores such as gs:// copy each object, so there the
window is the copy.

TensorFlow is imported on first use, not with this module: the command line
reads names from here before TensorFlow loads.
"""

import contextlib
import json
import os
import tempfile
from typing import Iterator, Optional

OWNER_LOCK = "OWNER.lock"
CHECKPOINTS = "checkpoints"
CHECKPOINT_STATE = "checkpoint"  # TensorFlow's state file in checkpoints/.
BEST = "best"
BEST_CHECKPOINT = "ckpt"  # A checkpoint prefix inside best/.
BEST_METRICS = "metrics.json"
EXPORT = "export"
KERAS_MODEL = "model.keras"  # In best/ and export/.
SAVED_MODEL = "saved_model"  # In export/.
EVAL_RESULTS = "eval_results.json"
TRAINING_DONE = "training_done.json"
RUN_CONFIG = "run.cfg"
RUN_INFO = "run.json"
METRICS_FILE = "metrics.jsonl"
# TensorBoard runs, one directory each: the chief's training and validation
# scalars, and a continuous evaluator's.
SUMMARY_SPLITS = ("train", "validation", "eval")
DOCTOR_SCRATCH = ".doctor"
PARTIAL = ".partial"
OLD = ".old"


def _gfile():
  """tf.io.gfile, imported on first use (see the module docstring)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return tf.io.gfile


def is_local(path: str) -> bool:
  """Whether `path` is on a POSIX filesystem of this machine (no `scheme://`)."""
  return "://" not in path


def checkpoints_dir(model_dir: str) -> str:
  return os.path.join(model_dir, CHECKPOINTS)


def checkpoint_state_file(model_dir: str) -> str:
  return os.path.join(model_dir, CHECKPOINTS, CHECKPOINT_STATE)


def best_dir(model_dir: str) -> str:
  return os.path.join(model_dir, BEST)


def best_metrics_file(model_dir: str) -> str:
  return os.path.join(model_dir, BEST, BEST_METRICS)


def export_dir(model_dir: str) -> str:
  return os.path.join(model_dir, EXPORT)


def export_keras_model(model_dir: str) -> str:
  return os.path.join(model_dir, EXPORT, KERAS_MODEL)


def saved_model_dir(model_dir: str) -> str:
  return os.path.join(model_dir, EXPORT, SAVED_MODEL)


def eval_results_file(model_dir: str) -> str:
  return os.path.join(model_dir, EVAL_RESULTS)


def training_done_file(model_dir: str) -> str:
  return os.path.join(model_dir, TRAINING_DONE)


def run_config_file(model_dir: str) -> str:
  return os.path.join(model_dir, RUN_CONFIG)


def earlier_run_config_file(model_dir: str, start: str) -> str:
  """run.<start>.cfg: the options of an earlier start, e.g. of
  20261202T031500Z."""
  root, ext = os.path.splitext(RUN_CONFIG)
  return os.path.join(model_dir, f"{root}.{start}{ext}")


def run_info_file(model_dir: str) -> str:
  return os.path.join(model_dir, RUN_INFO)


def metrics_file(model_dir: str) -> str:
  return os.path.join(model_dir, METRICS_FILE)


def owner_lock_file(model_dir: str) -> str:
  return os.path.join(model_dir, OWNER_LOCK)


def summary_dir(model_dir: str, split: str) -> str:
  """The TensorBoard run of `split` (one of SUMMARY_SPLITS)."""
  if split not in SUMMARY_SPLITS:
    raise ValueError(f"split must be one of {', '.join(SUMMARY_SPLITS)}, got "
                     f"{split!r}")
  return os.path.join(model_dir, split)


def profile_dir(model_dir: str, worker_index: int) -> str:
  """Where a worker's profiler trace goes: the chief's with the train events
  (one TensorBoard run), another worker's in a run of its own, so that
  workers on one host do not write the same <host>.xplane.pb."""
  train_dir = summary_dir(model_dir, "train")
  if worker_index == 0:
    return train_dir
  return os.path.join(train_dir, f"worker_{worker_index}")


def keras_models(model_dir: str) -> tuple:
  """The model.keras files a later run may start from, the preferred first:
  the best model, then the final export."""
  return (os.path.join(model_dir, BEST, KERAS_MODEL),
          export_keras_model(model_dir))


def partial_file(path: str) -> str:
  """Where `path` is written before it is renamed into place; the extension
  is kept (Keras saves only to names ending in .keras)."""
  root, ext = os.path.splitext(path)
  return root + PARTIAL + ext


def partial_dir(path: str) -> str:
  """Where the directory `path` is filled before it replaces the old one."""
  parent, name = os.path.split(path.rstrip("/"))
  return os.path.join(parent, f".{name}{PARTIAL}")


def old_dir(path: str) -> str:
  """Where the directory `path` waits while the new one takes its name."""
  parent, name = os.path.split(path.rstrip("/"))
  return os.path.join(parent, f".{name}{OLD}")


def _remove(path: str) -> None:
  gfile = _gfile()
  if gfile.isdir(path):
    gfile.rmtree(path)
  elif gfile.exists(path):
    gfile.remove(path)


def _copy_tree(source: str, target: str) -> None:
  """Copies directory `source` into `target` (created) file by file."""
  gfile = _gfile()
  gfile.makedirs(target)
  for directory, subdirs, files in gfile.walk(source):
    relative = os.path.relpath(directory, source)
    into = target if relative == "." else os.path.join(target, relative)
    for name in subdirs:
      gfile.makedirs(os.path.join(into, name))
    for name in files:
      gfile.copy(os.path.join(directory, name), os.path.join(into, name),
                 overwrite=True)


def _move_dir(source: str, target: str) -> None:
  """rename(2) where it is atomic; elsewhere a copy, then the source removed
  (object stores have no directories to rename, and ram:// renames only the
  directory's own entry)."""
  if is_local(source):
    _gfile().rename(source, target)
  else:
    _copy_tree(source, target)
    _gfile().rmtree(source)


@contextlib.contextmanager
def writing_file(path: str) -> Iterator[str]:
  """Yields a local path to write `path`'s new contents to; when the block
  ends without an exception, they replace `path` at once.

  The parent directory is created. On an exception nothing is left behind and
  the previous `path`, if any, is unchanged.
  """
  gfile = _gfile()
  partial = partial_file(path)
  gfile.makedirs(os.path.dirname(path) or ".")
  _remove(partial)  # Left by an interrupted write.
  try:
    if is_local(path):
      yield partial
    else:
      with tempfile.TemporaryDirectory(prefix="dist_train_") as local:
        local_path = os.path.join(local, os.path.basename(path))
        yield local_path
        gfile.copy(local_path, partial, overwrite=True)
    gfile.rename(partial, path, overwrite=True)
  except BaseException:
    with contextlib.suppress(Exception):
      _remove(partial)
    raise


def write_file(path: str, contents) -> None:
  """Replaces the file `path` with `contents` (str or bytes) at once."""
  with writing_file(path) as local_path:
    with open(local_path, "wb" if isinstance(contents, bytes) else "w") as f:
      f.write(contents)


def write_json(path: str, value) -> None:
  """Replaces the file `path` with `value` as indented JSON at once."""
  write_file(path, json.dumps(value, indent=2))


def read_json(path: str) -> Optional[dict]:
  """The JSON value in the file `path`, or None when there is none.

  Raises:
    ValueError: the file is not JSON.
    OSError: it cannot be read.
  """
  gfile = _gfile()
  if not gfile.exists(path):
    return None
  with gfile.GFile(path) as f:
    return json.load(f)


@contextlib.contextmanager
def reading_file(path: str) -> Iterator[str]:
  """Yields a local path holding the file `path`: itself, or a temporary copy
  for libraries that read only local files (zipfile, h5py)."""
  if is_local(path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="dist_train_") as local:
    local_path = os.path.join(local, os.path.basename(path))
    _gfile().copy(path, local_path)
    yield local_path


def recover_dir(path: str) -> None:
  """Finishes or undoes a replacement of the directory `path` that a stopped
  run left: removes its `partial_dir`, and puts its `old_dir` back when
  `path` is missing (the run stopped between moving the old one aside and
  renaming the new one into place: the old one is the last complete one),
  else removes it."""
  gfile = _gfile()
  _remove(partial_dir(path))
  old = old_dir(path)
  if gfile.exists(old):
    if gfile.exists(path):
      gfile.rmtree(old)
    else:
      _move_dir(old, path)


@contextlib.contextmanager
def writing_dir(path: str) -> Iterator[str]:
  """Yields an empty local directory to fill with `path`'s new contents; when
  the block ends without an exception, they replace `path`.

  What an interrupted replacement left is recovered first (`recover_dir`).
  On an exception nothing is left behind and the previous `path`, if any, is
  unchanged.
  """
  gfile = _gfile()
  recover_dir(path)
  partial, old = partial_dir(path), old_dir(path)
  try:
    if is_local(path):
      gfile.makedirs(partial)
      yield partial
    else:
      with tempfile.TemporaryDirectory(prefix="dist_train_") as local:
        yield local
        _copy_tree(local, partial)
  except BaseException:
    with contextlib.suppress(Exception):
      _remove(partial)
    raise
  if gfile.exists(path):
    _move_dir(path, old)
  _move_dir(partial, path)
  _remove(old)


def doctor_scratch_dir(model_dir: str, task: str, pid: int) -> str:
  """Where `dist-train doctor` writes and reads its test checkpoint: a folder
  of its own per task and process, so workers sharing a model_dir (and a run
  training there) do not meet."""
  return os.path.join(model_dir, f"{DOCTOR_SCRATCH}-{task}-{pid}")
