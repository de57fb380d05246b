"""Print the README's results table (markdown) from run directories.

    python jobs/results_table.py runs/table/*
"""

import json
import sys
from pathlib import Path


def row(run: Path) -> str:
    cfg = json.loads((run / "config.json").read_text())
    m = json.loads((run / "metrics.json").read_text())
    t = json.loads((run / "timings.json").read_text())
    wall = json.loads((run / "wall.json").read_text())["seconds"] if (run / "wall.json").exists() else t["total_s"]
    benign = next((v["recall"] for c, v in m["per_class"].items() if c.casefold() == "benign"), float("nan"))
    data = cfg["data"]
    split = data["split"] if data["split"] != "auto" else "auto"
    cmd = f"`leukray train --data {data['data']} --split {split} --output {run}`"
    return (f"| {Path(data['data']).name} | {split} | {m['accuracy'] * 100:.2f} % | {m['macro_f1']:.3f} | "
            f"{benign * 100:.1f} % | {t['epochs_run']} | {int(wall // 60)} min {wall % 60:.0f} s | {cmd} |")


if __name__ == "__main__":
    print("| data | split | test accuracy | macro-F1 | Benign recall | epochs | train wall time | command |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for arg in sys.argv[1:]:
        if (Path(arg) / "metrics.json").exists():
            print(row(Path(arg)))
