#!/usr/bin/env bash
# Re-resolves constraints.txt: installs requirements-dev.txt's ranges, without
# the current pins, into a fresh virtual environment and writes its pip freeze.
#
#   bash scripts/update_constraints.sh [VENV_DIR]
#
# With VENV_DIR the environment is built there and kept, to run the tests on
# the new versions (VENV_DIR/bin/python -m pytest ...); without it, it is
# built in a temporary folder and removed. Commit constraints.txt only once the
# parity tests and then the whole suite pass on it (BUILD.md).
set -euo pipefail
cd "$(dirname "$0")/.."

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
venv="${1:-$work/venv}"
if [[ -e "$venv" ]]; then
  echo "update_constraints: error: $venv already exists" >&2
  exit 1
fi

# The requirement files without their `-c constraints.txt` lines: the ranges
# alone decide.
for name in requirements.txt requirements-dev.txt; do
  grep -v '^-c ' "$name" > "$work/$name"
done

python3 -m venv "$venv"
unset PYTHONPATH
export PYTHONNOUSERSITE=1
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  -r "$work/requirements-dev.txt"

{
  cat <<'HEADER'
# The exact version of every package that requirements-dev.txt resolves to
# (direct and transitive): the set the test suite last passed with, resolved
# with Python 3.11 on Linux x86_64. requirements.txt and requirements-dev.txt
# read it with `-c constraints.txt`.
#
# Generated; do not edit by hand. To move the pins forward:
#   bash scripts/update_constraints.sh /tmp/newpins   # fresh venv, pip freeze
#   /tmp/newpins/bin/python -m pytest -q tests/e2e/test_parity.py tests/e2e/test_speed_modes.py
#   /tmp/newpins/bin/python -m pytest -q tests
# and commit this file only when the parity tests, then the whole suite, pass
# on the new versions (BUILD.md, "Moving the pins forward").
HEADER
  # --all: setuptools (required by tensorflow) and wheel (by astunparse) are
  # in the closure too; pip is only the installer.
  "$venv/bin/python" -m pip freeze --disable-pip-version-check --all \
    --exclude pip
} > constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins)"
