"""Rewrites the flag table in README.md from dist_train/config.py.

    python scripts/update_flag_table.py

Each option is defined once, as a Config field; tests/test_flags.py fails
while the README's table differs from what this writes.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dist_train import flags  # pylint: disable=wrong-import-position

HEADER = "| flag | default | meaning |"


def main():
  path = os.path.join(ROOT, "README.md")
  with open(path) as f:
    readme = f.read()
  start = readme.index(HEADER)
  end = readme.index("\n\n", start) + 1
  with open(path, "w") as f:
    f.write(readme[:start] + flags.flag_table() + readme[end:])


if __name__ == "__main__":
  main()
