"""Benchmarks: leukray's Ray paths vs plain PyTorch on the same files, model and recipe.

    python jobs/benchmark.py [--data ROOT] [--reps 3] [--out benchmarks/results/latest.json]

Prints a table and writes JSON (machine description, every case, medians of --reps).
Without --data it uses ../shared/data/all-taleqani/Original when present, else
generates synthetic images.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leukray import benchmark as B  # noqa: E402
from leukray import runtime  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "all-taleqani" / "Original"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="labelled folder (class sub-folders)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per case; medians are reported")
    p.add_argument("--epochs", type=int, default=4, help="epochs per training run (epoch 1 excluded from steady state)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--scale", type=int, nargs="*", default=[2000, 20000], help="archive sizes for the RSS test")
    p.add_argument("--skip", nargs="*", default=[], choices=["scoring", "training", "scale"])
    p.add_argument("--out", default="benchmarks/results/latest.json")
    args = p.parse_args()

    data = args.data or (str(DEFAULT_DATA) if DEFAULT_DATA.is_dir() else None)
    if data is None:
        from leukray.synthetic import make_dataset

        data = str(make_dataset(Path(tempfile.mkdtemp()) / "synth", per_class=200))
    from leukray.data import list_labeled_images
    from leukray.model import create_model, save_model

    listing = list_labeled_images(data)
    paths = [r["path"] for r in listing.records]
    model = Path(tempfile.mkdtemp()) / "model.pt"  # speed does not depend on the weights
    save_model(model, create_model("leuknet", len(listing.classes)).eval(),
               {"arch": "leuknet", "classes": listing.classes, "image_size": args.image_size,
                "mean": [0.8, 0.67, 0.7], "std": [0.12, 0.17, 0.1]})
    runtime.init_ray()
    report = {"machine": B.machine(), "data": data, "images": len(paths), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "rows": []}
    log = lambda m: print(m, flush=True)  # noqa: E731
    if "scoring" not in args.skip:
        log("scoring ...")
        report["rows"] += B.bench_scoring(str(model), paths, args.reps, [1, 2], log)
    if "training" not in args.skip:
        log("training ...")
        report["rows"] += B.bench_training(data, args.reps, [1, 2], args.epochs, args.image_size, log)
    if "scale" not in args.skip and args.scale:
        log("scale ...")
        report["rows"] += B.bench_scale(str(model), data, args.scale, log)
    print()
    print(f"machine: {report['machine']}")
    print(B.format_table(report["rows"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
