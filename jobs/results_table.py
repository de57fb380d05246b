"""Print the README's results table (markdown) from run directories.

    python jobs/results_table.py runs/table/*

The command column is rebuilt from each run's config.json: the flags that differ from
`leukray train`'s defaults, so it reproduces the run.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leukray.config import DataConfig, TrainConfig, to_dict  # noqa: E402

# Flags that change results (not scaling/placement), in the order they are printed.
RESULT_FLAGS = ("arch", "weights", "freeze_stages", "image_size", "epochs", "batch_size", "lr", "weight_decay",
                "label_smoothing", "warmup_epochs", "patience", "augment", "class_weights", "seed", "split_seed",
                "group_size")


def command(cfg: dict, run: Path) -> str:
    data, train = cfg["data"], cfg["train"]
    # arch/weights against the plain defaults, the rest against the preset they select
    defaults = {**to_dict(DataConfig()), **to_dict(TrainConfig(arch=train["arch"], weights=train["weights"])),
                "arch": TrainConfig().arch, "weights": TrainConfig().weights}
    given = {**data, **train}
    path = data["data"]
    if os.path.isabs(path) and not os.path.relpath(path).startswith("../.."):
        path = os.path.relpath(path)  # /work/shared/... -> ../shared/..., as in the README
    flags = [f"--data {path}", f"--split {data['split']}"]
    for k in RESULT_FLAGS:
        if k in given and given[k] != defaults[k]:
            v = given[k]
            flags.append(f"--{k.replace('_', '-')}" if v is True else f"--no-{k.replace('_', '-')}" if v is False
                         else f"--{k.replace('_', '-')} {v}")
    return f"`leukray train {' '.join(flags)} --output {run}`"


def row(run: Path) -> str:
    cfg = json.loads((run / "config.json").read_text())
    m = json.loads((run / "metrics.json").read_text())
    t = json.loads((run / "timings.json").read_text())
    wall = json.loads((run / "wall.json").read_text())["seconds"] if (run / "wall.json").exists() else t["total_s"]
    benign = next((v["recall"] for c, v in m["per_class"].items() if c.casefold() == "benign"), float("nan"))
    data = cfg["data"]
    return (f"| {Path(data['data']).name} | {data['split']} | {m['accuracy'] * 100:.2f} % | {m['macro_f1']:.3f} | "
            f"{benign * 100:.1f} % | {t['epochs_run']} | {int(wall // 60)} min {wall % 60:.0f} s | {command(cfg, run)} |")


if __name__ == "__main__":
    print("| data | split | test accuracy | macro-F1 | Benign recall | epochs | train wall time | command |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for arg in sys.argv[1:]:
        if (Path(arg) / "metrics.json").exists():
            print(row(Path(arg)))
