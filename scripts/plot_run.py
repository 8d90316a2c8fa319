"""Renders a run's loss and accuracy curves to a PNG, for machines with no browser.

    pip install -r requirements-dev.txt   # matplotlib, not needed to train
    python scripts/plot_run.py /tmp/dist_train/quickstart [--output curves.png]

Reads the TensorBoard event files under <model_dir>/train and
<model_dir>/validation; with --metrics_file (a run's metrics.jsonl, see
docs/monitoring.md), that file instead, wherever it was copied to.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dist_train.outputs import metrics_file  # pylint: disable=wrong-import-position
from dist_train.outputs import summaries  # pylint: disable=wrong-import-position

SPLITS = ("train", "validation")
METRICS = ("loss", "accuracy")


def read_curves(model_dir):
  """{split: {metric: [(step, value), ...]}} for the splits that have events."""
  curves = {}
  for split in SPLITS:
    directory = os.path.join(model_dir, split)
    if os.path.isdir(directory):
      scalars = summaries.read_scalars(directory)
      curves[split] = {m: scalars[m] for m in METRICS if m in scalars}
  return curves


def read_curves_from_metrics_file(path):
  """The same, from a metrics.jsonl file (one JSON object per line)."""
  curves = {}
  for record in metrics_file.read(path):
    if record.get("split") not in SPLITS:
      continue
    by_metric = curves.setdefault(record["split"], {})
    for metric in METRICS:
      if metric in record:
        by_metric.setdefault(metric, []).append((record["step"],
                                                 record[metric]))
  return curves


def plot(curves, output, title):
  """Draws one panel per metric, one line per split, and saves a PNG."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")  # No display on a headless cluster node.
  from matplotlib import pyplot  # pylint: disable=import-outside-toplevel

  figure, axes = pyplot.subplots(1, len(METRICS), figsize=(11, 4))
  for axis, metric in zip(axes, METRICS):
    for split, by_metric in curves.items():
      points = by_metric.get(metric)
      if points:
        steps, values = zip(*points)
        axis.plot(steps, values, marker="o" if len(steps) < 30 else None,
                  label=split)
    axis.set_xlabel("global step")
    axis.set_ylabel(metric)
    axis.grid(True, alpha=0.3)
    axis.legend()
  figure.suptitle(title)
  figure.tight_layout()
  figure.savefig(output, dpi=100)
  pyplot.close(figure)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("model_dir")
  parser.add_argument("--output", default=None,
                      help="PNG path (default: <model_dir>/curves.png)")
  parser.add_argument("--metrics_file", default=None,
                      help="read this metrics.jsonl instead of the events")
  args = parser.parse_args()
  if args.metrics_file:
    curves = read_curves_from_metrics_file(args.metrics_file)
    if not any(curves.values()):
      sys.exit(f"plot_run: error: no train or validation lines in "
               f"{args.metrics_file}")
  else:
    curves = read_curves(args.model_dir)
  if not any(curves.values()):
    sys.exit(f"plot_run: error: no train or validation event files under "
             f"{args.model_dir}")
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    sys.exit("plot_run: error: matplotlib is not installed: "
             "pip install -r requirements-dev.txt")
  output = args.output or os.path.join(args.model_dir, "curves.png")
  plot(curves, output, title=os.path.abspath(args.model_dir))
  print(output)


if __name__ == "__main__":
  main()
