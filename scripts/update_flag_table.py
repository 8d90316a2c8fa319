"""Rewrites the flag table in docs/flags.md from dist_train/config.py.

    python scripts/update_flag_table.py

Each option is defined once, as a Config field; tests/unit/test_flags.py fails
while the table in docs/flags.md differs from what this writes.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dist_train import flags  # pylint: disable=wrong-import-position

HEADER = "| flag | default | meaning |"


def main():
  path = os.path.join(ROOT, "docs", "flags.md")
  with open(path) as f:
    page = f.read()
  start = page.index(HEADER)
  end = page.index("\n\n", start) + 1
  with open(path, "w") as f:
    f.write(page[:start] + flags.flag_table() + page[end:])


if __name__ == "__main__":
  main()
