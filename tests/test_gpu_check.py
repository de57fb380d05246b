"""jobs/gpu_check.py's Ray part as a dry run on CPUs (`--device cpu`).

A GPU machine is lent to some sessions only, for minutes, and the brief asks for one prepared
script run once there: the script must not meet today's code for the first time on that
machine. This runs its Ray side (`leukray synth`, `train`, `score` as subprocesses) and its
plain side on a few tiny images and checks the report it writes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("startup_s", "ingest_images_per_s", "epoch_images_per_s", "scoring_images_per_s", "wall_s")


@pytest.mark.slow
def test_gpu_check_dry_run_reports_ray_and_plain_side_by_side(tmp_path):
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "gpu_check.py"), "--device", "cpu", "--per-class", "8",
                           "--epochs", "2", "--image-size", "64", "--workdir", str(tmp_path / "work"),
                           "--out", str(report)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    side = json.loads(report.read_text())["ray_vs_plain"]
    assert side["device"] == "cpu" and side["files"] == 32
    for name in ("ray", "plain"):
        assert all(side[name][key] > 0 for key in SIDES), side[name]
    assert set(side["ray"]["startup"]) == {"ray_init_s", "listing_hashing_s", "decode_s", "train_start_s",
                                           "first_batch_s"}
    assert "start-up to first batch, s" in proc.stdout and "Ray start-up split: ray_init_s" in proc.stdout
    assert list((tmp_path / "work" / "pred").glob("*.parquet")), "score --output got no Parquet part"
