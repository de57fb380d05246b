"""The benchmark harness itself runs and reports comparable numbers (tiny sizes)."""

from pathlib import Path

from leukray import benchmark as B


def test_scoring_benchmark_compares_ray_and_plain(trained_run, synth_data):
    paths = sorted(str(p) for p in Path(synth_data).rglob("*.jpg"))[:40]
    rows = B.bench_scoring(trained_run["model"], paths, reps=1, actors=[1], log=lambda *_: None)
    cases = {r["case"]: r for r in rows}
    assert set(cases) == {"ray, 1 actor(s)", "plain DataLoader"}
    ray_row, plain = cases["ray, 1 actor(s)"], cases["plain DataLoader"]
    assert ray_row["ratio_vs_plain"] == ray_row["images_per_s"] / plain["images_per_s"]
    assert all(r["images_per_s"] > 0 and r["peak_rss_mb"] > 50 for r in rows)
    table = B.format_table(rows)
    assert "scoring JPEG -> Parquet" in table and "plain DataLoader" in table


def test_peak_rss_sees_child_processes():
    import subprocess
    import sys

    with B.peak_rss() as rss:
        subprocess.run([sys.executable, "-c", "x = bytearray(300 * 2**20); import time; time.sleep(1)"], check=True)
    assert rss["mb"] > 300


def test_engines_benchmark_compares_torch_and_onnx(trained_run, synth_data, ray_session):
    import pytest

    pytest.importorskip("onnxruntime")
    paths = sorted(str(p) for p in Path(synth_data).rglob("*.jpg"))[:24]
    models = {"leuknet": trained_run["model"]}
    rows = B.bench_engines_model(models, image_size=64, reps=1, log=lambda *_: None) + \
        B.bench_engines_scoring(models, paths, reps=1, log=lambda *_: None)
    cases = {(r["benchmark"], r["case"]): r for r in rows}
    assert set(cases) == {(b, f"leuknet, {e}") for b in ("model only, batch 64", "scoring JPEG -> Parquet")
                          for e in ("torch", "onnx")}
    assert all(r["images_per_s"] > 0 for r in rows)
    torch_row, onnx_row = (cases[("scoring JPEG -> Parquet", f"leuknet, {e}")] for e in ("torch", "onnx"))
    assert onnx_row["ratio_vs_plain"] == onnx_row["images_per_s"] / torch_row["images_per_s"]
    assert "leuknet, onnx" in B.format_table(rows)


def test_train_step_benchmark_compares_frozen_stages():
    rows = B.bench_train_step("leuknet", image_size=32, frozen=[0, 2], reps=1, log=lambda *_: None)
    assert [r["frozen_stages"] for r in rows] == [0, 2]
    assert rows[1]["ratio_vs_plain"] == rows[1]["images_per_s"] / rows[0]["images_per_s"]
    assert all(r["images_per_s"] > 0 for r in rows)


def test_benchmark_engines_reports_rates(tmp_path):
    import pytest
    import torch

    pytest.importorskip("onnxruntime")
    from leukray.model import create_model, save_model

    save_model(tmp_path / "model.pt", create_model("leuknet", 4).eval(),
               {"arch": "leuknet", "classes": list("abcd"), "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3})
    torch.set_num_threads(2)
    stats = B.benchmark_engines(tmp_path / "model.pt", batch=2, size=32, threads=1, reps=1)
    assert stats["torch_images_per_s"] > 0 and stats["onnx_images_per_s"] > 0
    assert stats["onnx_speedup"] == stats["onnx_images_per_s"] / stats["torch_images_per_s"]
    assert torch.get_num_threads() == 2, "the caller's thread count is restored"
