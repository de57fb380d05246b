"""The benchmark harness itself runs and reports comparable numbers (tiny sizes)."""

from pathlib import Path

import pytest

from leukray import benchmark as B


def test_scoring_benchmark_compares_ray_and_plain(trained_run, synth_data):
    paths = sorted(str(p) for p in Path(synth_data).rglob("*.jpg"))[:40]
    rows = B.bench_scoring(trained_run["model"], paths, reps=1, plans={"ray, 1 actor(s)": {"actors": 1}},
                           log=lambda *_: None)
    cases = {r["case"]: r for r in rows}
    assert set(cases) == {"ray, 1 actor(s)", "plain DataLoader", "plain DataLoader + quality checks"}
    ray_row, plain = cases["ray, 1 actor(s)"], cases["plain DataLoader"]
    checked = cases["plain DataLoader + quality checks"]
    assert ray_row["ratio_vs_plain"] == ray_row["images_per_s"] / plain["images_per_s"]
    assert ray_row["ratio_vs_plain_with_checks"] == ray_row["images_per_s"] / checked["images_per_s"]
    # one repetition: the paired ratio is the ratio of the two runs
    assert ray_row["paired_ratios"] == [ray_row["all_images_per_s"][0] / plain["all_images_per_s"][0]]
    assert plain["paired_ratios"] == [1.0]
    assert all(r["images_per_s"] > 0 and r["peak_rss_mb"] > 50 for r in rows)
    table = B.format_table(rows)
    assert "scoring JPEG -> Parquet" in table and "plain DataLoader" in table


def test_plain_loop_with_checks_flags_what_score_flags(trained_run, tmp_path):
    """The same-work peer runs the model's quality checks: on a blank image, a grayscale copy
    and real (synthetic) smears its flags are `score`'s; the bare loop writes none, and a
    model without trust metadata has no checks to run."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from leukray.config import ScoreConfig
    from leukray.infer import score_paths
    from leukray.model import create_model, save_model

    split = next(Path(trained_run["model"]).parent.glob("split.csv"))
    smears = list(pd.read_csv(split)["path"][:3])
    Image.fromarray(np.full((200, 200, 3), 250, np.uint8)).save(tmp_path / "blank.png")
    Image.open(smears[0]).convert("L").convert("RGB").save(tmp_path / "gray.png")
    paths = [str(tmp_path / "blank.png"), str(tmp_path / "gray.png"), *smears]
    B.score_plain(trained_run["model"], paths, str(tmp_path / "checked.parquet"), 2, workers=0, threads=1,
                  checks=True)
    B.score_plain(trained_run["model"], paths, str(tmp_path / "bare.parquet"), 2, workers=0, threads=1)
    score_paths([{"path": p} for p in paths], ScoreConfig(model=trained_run["model"], output=str(tmp_path / "s"),
                                                          engine="torch"), log=lambda *_: None)
    scored = pd.read_parquet(tmp_path / "s").set_index("path")["quality_flags"]
    expected = [scored[p] if isinstance(scored[p], str) else None for p in paths]
    flags = pd.read_parquet(tmp_path / "checked.parquet")["quality_flags"]
    assert [f if isinstance(f, str) else None for f in flags] == expected
    assert "uniform" in expected[0] and "grayscale" in expected[1]
    assert "quality_flags" not in pd.read_parquet(tmp_path / "bare.parquet").columns
    save_model(tmp_path / "bare.pt", create_model("leuknet", 4).eval(), {"arch": "leuknet", "classes": list("abcd"),
               "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3})
    with pytest.raises(ValueError, match="no trust metadata"):
        B.score_plain(str(tmp_path / "bare.pt"), paths, str(tmp_path / "x.parquet"), 2, workers=0, threads=1,
                      checks=True)


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


def test_cpu_steps_double_up_to_the_machine():
    assert B.cpu_steps(1) == [1] and B.cpu_steps(2) == [1, 2]
    assert B.cpu_steps(6) == [1, 2, 4, 6] and B.cpu_steps(16) == [1, 2, 4, 8, 16]


def test_symlinked_archive_names_n_distinct_files(tmp_path, synth_data):
    files = sorted(str(p) for p in Path(synth_data).rglob("*.jpg"))[:3]
    src = B.symlinked_archive(files, 1001, tmp_path)
    links = sorted(src.rglob("*.jpg"))
    assert len(links) == 1001 and len({p.parent for p in links}) == 2
    assert links[4].resolve() == Path(files[4 % 3]).resolve()


@pytest.mark.slow
def test_benchmark_cli_scaling_and_whole_command(tmp_path):
    """The new sections through the CLI on tiny inputs (own Ray, subprocesses): a row per stage
    and side at 1 CPU, the whole-command pair, the table printed and the JSON written."""
    import json
    import subprocess
    import sys

    from leukray.synthetic import make_dataset

    data = make_dataset(tmp_path / "data", per_class=3, size=64)
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "leukray.cli", "benchmark", "--data", str(data), "--reps", "1",
                          "--image-size", "32", "--skip", "scoring", "training", "scale", "engines", "finetune",
                          "int8", "costs", "--scaling-cpus", "1", "--command-files", "8", "--out", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    cases = {(r["benchmark"], r["case"]) for r in rows}
    assert cases == {("scaling, 1 CPU(s)", c) for c in ("decode, ray tasks", "decode, plain DataLoader",
                                                        "ingest, ray (train)", "scoring, ray (default plan)",
                                                        "scoring, plain DataLoader")} | \
        {("whole command, 8 files", c) for c in ("leukray score (CLI)", "plain script (2 workers)",
                                                 "plain script + quality checks")}
    assert all(r["images_per_s"] > 0 for r in rows)
    assert "scaling, 1 CPU(s)" in run.stdout and "whole command, 8 files" in run.stdout


@pytest.mark.slow
def test_int8_cost_compares_arg_max_classes_of_every_row():
    """A row that is not assessable (null predicted_label) still has the model's prediction:
    comparing predicted_label counted such rows as changed even between identical outputs."""
    import pandas as pd

    df = pd.DataFrame({"predicted_label": [None, "b"], "prob_a": [0.9, 0.2], "prob_b": [0.1, 0.8]})
    assert list(B.top_classes(df, ["a", "b"])) == ["a", "b"]
    assert (B.top_classes(df, ["a", "b"]) != B.top_classes(df.copy(), ["a", "b"])).sum() == 0


def test_int8_benchmark_states_speed_and_accuracy_cost(trained_run):
    pytest.importorskip("onnxruntime")
    rows = B.bench_int8(trained_run["run_dir"], reps=1, log=lambda *_: None)
    cases = {r["case"]: r for r in rows}
    assert set(cases) == {"torch", "onnx", "onnx-int8 static", "onnx-int8 dynamic"}
    assert cases["onnx"]["predictions_changed_vs_fp32"] == 0 and cases["onnx"]["accuracy_diff_vs_fp32"] == 0
    assert cases["torch"]["predictions_changed_vs_fp32"] == 0, "PyTorch and fp32 ONNX agree"
    for r in rows:
        assert r["images_per_s"] > 0 and r["model_only_images_per_s"] > 0 and r["images"] == 16
        assert 0 <= r["predictions_changed_vs_fp32"] <= r["images"]


def test_costs_benchmark_times_each_step_and_the_whole_call(synth_data, tmp_path):
    """The benchmark model carries trust metadata (so scoring pays for the quality checks, as
    with every trained model), and the per-image cost rows cover each step and the whole call."""
    from leukray import trust
    from leukray.data import list_labeled_images
    from leukray.modelfile import read_model_meta

    listing = list_labeled_images(synth_data)
    paths = [r["path"] for r in listing.records][:30]
    model, _ = B._bench_models(listing.classes, 64, paths)
    meta = read_model_meta(model)
    assert trust.of(meta) is not None and isinstance(trust.decode_checks(meta), dict)
    rows = B.bench_costs(str(model), paths, reps=1, log=lambda *_: None)
    cases = [r["case"] for r in rows]
    assert cases[0] == "read file" and cases[-1] == "whole Predictor call"
    assert "quality checks + colour" in cases and any(c.startswith("model (") for c in cases)
    assert all(r["ms_per_image"] > 0 and r["images"] == 30 for r in rows)
    whole = rows[-1]  # the call decodes, checks, resizes and runs the model: at least its largest step
    assert whole["ms_per_image"] > max(r["ms_per_image"] for r in rows[:-1]) and "rest_ms_per_image" in whole
