"""Every file and folder inside a model_dir is named in outputs/model_dir.py
only: no other module of dist_train spells one of those names."""

import ast
import pathlib
import subprocess
import sys

from dist_train.outputs import model_dir as model_dir_lib

_PACKAGE = pathlib.Path(model_dir_lib.__file__).parents[1]
# The summary runs `train` and `validation` are also the names of the data
# splits, which other modules spell for that reason.
NAMES = {model_dir_lib.OWNER_LOCK, model_dir_lib.CHECKPOINTS,
         model_dir_lib.BEST, model_dir_lib.BEST_METRICS,
         model_dir_lib.EXPORT, model_dir_lib.KERAS_MODEL,
         model_dir_lib.SAVED_MODEL, model_dir_lib.EVAL_RESULTS,
         model_dir_lib.TRAINING_DONE, model_dir_lib.RUN_CONFIG,
         model_dir_lib.RUN_INFO}


def _string_constants(tree):
  """(line, value) of the string constants of `tree` that are not
  docstrings."""
  docstrings = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                         ast.AsyncFunctionDef)) and node.body:
      first = node.body[0]
      if isinstance(first, ast.Expr) and isinstance(first.value,
                                                    ast.Constant):
        docstrings.add(id(first.value))
  return [(node.lineno, node.value) for node in ast.walk(tree)
          if isinstance(node, ast.Constant) and isinstance(node.value, str)
          and id(node) not in docstrings]


def test_the_names_inside_model_dir_are_spelled_in_one_module():
  spelled = []
  for path in sorted(_PACKAGE.rglob("*.py")):
    if path == pathlib.Path(model_dir_lib.__file__):
      continue
    tree = ast.parse(path.read_text(encoding="utf-8"))
    spelled += [f"{path.relative_to(_PACKAGE.parent)}:{line} {value!r}"
                for line, value in _string_constants(tree) if value in NAMES]
  assert not spelled, "name them through dist_train.outputs.model_dir"


def test_the_names_load_without_tensorflow():
  # The command line checks the model_dir (ownership.check_writable) before
  # TensorFlow loads, so that a bad one fails in well under a second.
  loaded = subprocess.run(
      [sys.executable, "-c", "import sys; "
       "from dist_train.outputs import model_dir, ownership; "
       "print('tensorflow' in sys.modules)"],
      cwd=_PACKAGE.parent, capture_output=True, text=True, check=True)
  assert loaded.stdout == "False\n"


def test_paths_keep_a_filesystem_scheme():
  assert model_dir_lib.is_local("/runs/a")
  assert not model_dir_lib.is_local("gs://bucket/runs/a")
  assert model_dir_lib.profile_dir("gs://b/run", 2) == (
      "gs://b/run/train/worker_2")
  assert model_dir_lib.keras_models("gs://b/run") == (
      "gs://b/run/best/model.keras", "gs://b/run/export/model.keras")
  assert model_dir_lib.partial_dir("gs://b/run/best") == (
      "gs://b/run/.best.partial")
  assert model_dir_lib.old_dir("/runs/a/export/saved_model") == (
      "/runs/a/export/.saved_model.old")
  assert model_dir_lib.partial_file("gs://b/run/export/model.keras") == (
      "gs://b/run/export/model.partial.keras")
