"""Benchmarks: leukray's Ray paths vs plain PyTorch on the same files, model and recipe.

    python jobs/benchmark.py [--data ROOT] [--reps 3] [--out benchmarks/results/latest.json]

Same as `leukray benchmark`. Prints a table and writes JSON (machine description, every
case, medians of --reps).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # leukray from this checkout / job working dir

from leukray.cli import console  # noqa: E402

if __name__ == "__main__":
    sys.exit(console(["benchmark", *sys.argv[1:]]))
