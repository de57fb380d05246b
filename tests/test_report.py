"""`leukray report` on a small fake run directory (no Ray, no training: seconds)."""

import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from leukray.evaluate import compute_metrics
from leukray.model import DEFAULT_MEAN, DEFAULT_STD, create_model, save_model
from leukray.report import best_epoch_index, write_report
from leukray.synthetic import CLASSES, make_dataset

PNGS = ("samples.png", "curves.png", "confusion.png", "roc.png", "misclassified.png")


def make_run(root, all_correct: bool = False):
    """A run directory as `leukray train` leaves it, built by hand: 4 classes x 6 images,
    files 1-3 train, 4 val, 5-6 test; random test probabilities (or all correct)."""
    data = make_dataset(root / "data", per_class=6, size=64, seed=3)
    run = root / "run"
    run.mkdir()
    classes = list(CLASSES)
    rows = []
    for c in classes:
        for i in range(1, 7):
            rel = f"{c}/WBC-{c}-{i:03d}.jpg"
            split = "train" if i <= 3 else "val" if i == 4 else "test"
            rows.append({"path": str((data / rel).resolve()), "relpath": rel, "sha256": f"{c}{i}",
                         "label": c, "split": split, "group": len(rows) // 2})
    split = pd.DataFrame(rows)
    split.to_csv(run / "split.csv", index=False)
    (run / "config.json").write_text(json.dumps({
        "data": {"data": str(data), "image_size": 64, "split": "grouped", "group_size": 2,
                 "val_fraction": 0.15, "test_fraction": 0.15, "split_seed": 0},
        "train": {"arch": "leuknet", "epochs": 3, "augment": True}, "classes": classes}))

    model = create_model("leuknet", len(classes))
    meta = save_model(run / "model.pt", model, {"arch": "leuknet", "classes": classes, "image_size": 64,
                                                "mean": list(DEFAULT_MEAN), "std": list(DEFAULT_STD)})
    history = [{"epoch": e, "train_loss": 1.5 - 0.3 * e, "train_accuracy": 0.3 + 0.2 * e, "val_loss": 1.4 - 0.2 * e,
                "val_accuracy": [0.4, 0.7, 0.6][e - 1], "lr": 1e-3, "epoch_time_s": 1.0, "train_images_per_s": 50.0}
               for e in (1, 2, 3)]
    (run / "history.json").write_text(json.dumps(history))
    (run / "timings.json").write_text(json.dumps({"ingest_s": 1.0, "fit_s": 3.5, "total_s": 6.0, "epochs_run": 3}))

    test = split[split["split"] == "test"].reset_index(drop=True)
    rng = np.random.default_rng(0)
    probs = rng.random((len(test), len(classes))) + 0.05
    truth = test["label"].map(classes.index).to_numpy()
    if all_correct:
        probs[np.arange(len(test)), truth] += 10
    else:
        probs[0, truth[0]] = 0.0  # at least one mistake, whatever the seed
    probs /= probs.sum(1, keepdims=True)
    preds = pd.DataFrame({"path": test["path"], "label": test["label"], "error": pd.Series([None] * len(test), dtype=object)})
    preds["predicted_label"] = [classes[i] for i in probs.argmax(1)]
    preds["confidence"] = probs.max(1).astype(np.float32)
    for i, c in enumerate(classes):
        preds[f"prob_{c}"] = probs[:, i].astype(np.float32)
    preds["malignant_probability"] = (1 - probs[:, 0]).astype(np.float32)
    preds["model_id"] = meta["model_id"]
    (run / "predictions" / "test").mkdir(parents=True)
    preds.to_parquet(run / "predictions" / "test" / "part-x.parquet", index=False)
    metrics = compute_metrics(preds, classes)
    (run / "metrics.json").write_text(json.dumps({**metrics, "split": "test"}))
    return run, metrics


def test_full_report(tmp_path):
    run, metrics = make_run(tmp_path)
    path = write_report(run)
    out = run / "report"
    assert path == out / "report.md"
    text = path.read_text()
    for name in PNGS:
        assert (out / name).stat().st_size > 5_000, name
        with Image.open(out / name) as im:
            assert im.width > 200 and im.height > 200, name
            im.verify()
        assert f"]({name})" in text, f"report.md does not link {name}"
    assert f"{metrics['accuracy']:.4f}" in text and f"{metrics['macro_f1']:.4f}" in text
    assert "Benign recall" in text and f"{metrics['per_class']['Benign']['recall']:.4f}" in text
    assert "Best epoch**: 2" in text  # history's max val accuracy
    assert "`grouped`" in text and "group_size 2" in text
    assert "| test | 2 | 2 | 2 | 2 | **8** |" in text
    summary = (out / "model_summary.txt").read_text()
    flops = int(re.search(r"^FLOPs\s+(\d+)", summary, re.M).group(1))
    assert flops > 0
    assert "LeukNet(" in summary and "1x4" in summary  # print(model) and the output shape of the head
    assert "Missing or inconsistent" not in text


def test_missing_optional_files_become_notes(tmp_path):
    run, metrics = make_run(tmp_path)
    for name in ("timings.json", "history.json"):
        (run / name).unlink()
    (run / "predictions" / "test" / "part-x.parquet").unlink()
    text = write_report(run, max_misclassified=5).read_text()
    out = run / "report"
    assert "no `timings.json`" in text and "no `history.json`" in text and "no `predictions/test`" in text
    assert "n/a (no timings.json)" in text
    assert not (out / "curves.png").exists() and not (out / "roc.png").exists()
    assert (out / "confusion.png").exists() and f"{metrics['accuracy']:.4f}" in text  # metrics.json still there


def test_report_without_metrics_recomputes_them(tmp_path):
    run, metrics = make_run(tmp_path)
    (run / "metrics.json").unlink()
    text = write_report(run).read_text()
    assert "recomputed from predictions" in text and f"{metrics['accuracy']:.4f}" in text


def test_output_dir_extra_sections_and_no_mistakes(tmp_path):
    run, metrics = make_run(tmp_path, all_correct=True)
    assert metrics["accuracy"] == 1.0
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "misclassified.png").write_bytes(b"stale")  # from an earlier report
    path = write_report(run, output=tmp_path / "elsewhere", samples_per_class=2,
                        extra_sections=[("Grad-CAM", "![cam](gradcam.png)")])
    text = path.read_text()
    assert path.parent == tmp_path / "elsewhere" and not (run / "report").exists()
    assert "No test image is misclassified" in text
    assert not (path.parent / "misclassified.png").exists()
    assert text.rstrip().endswith("## Grad-CAM\n\n![cam](gradcam.png)")


def test_model_id_mismatch_is_flagged(tmp_path):
    run, _ = make_run(tmp_path)
    part = run / "predictions" / "test" / "part-x.parquet"
    df = pd.read_parquet(part)
    df["model_id"] = "0123456789abcdef"
    df.to_parquet(part, index=False)
    assert "not by model.pt" in write_report(run).read_text()


@pytest.mark.parametrize("accs, losses, best", [
    ([0.5, 0.8, 0.8], [1.0, 0.5, 0.4], 2),  # tie on accuracy: lower val loss wins
    ([0.5, 0.8, 0.8], [1.0, 0.5, 0.5], 1),  # full tie: the earliest
    ([0.9, 0.8, 0.8], [1.0, 0.1, 0.1], 0),  # accuracy first, loss only breaks ties
])
def test_best_epoch_rule_matches_training(accs, losses, best):
    """The report's best epoch is the one training kept: `recipe.is_improvement`, the rule
    `train.train_loop_per_worker` applies epoch by epoch."""
    from leukray.recipe import is_improvement

    history = [{"val_accuracy": a, "val_loss": v} for a, v in zip(accs, losses)]
    kept, state = -1, {"val_accuracy": -1.0, "val_loss": float("inf")}
    for epoch, h in enumerate(history):
        if is_improvement(h["val_accuracy"], h["val_loss"], state):
            kept, state = epoch, h
    assert kept == best
    assert best_epoch_index(history) == kept


def test_malformed_file_costs_one_section(tmp_path):
    run, metrics = make_run(tmp_path)
    (run / "history.json").write_text('{"not": "a list"}')
    text = write_report(run).read_text()
    assert "`history.json` unreadable (ValueError" in text and "no usable history.json" in text
    assert f"{metrics['accuracy']:.4f}" in text
    assert not (run / "report" / "curves.png").exists() and (run / "report" / "roc.png").exists()


def test_calibration_section_shows_the_table_and_the_reliability_diagram(tmp_path):
    from leukray.calibration import calibration_summary

    run, metrics = make_run(tmp_path)
    without = write_report(run).read_text()
    assert "no `calibration` in metrics.json" in without and not (run / "report" / "reliability.png").exists()
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 200)
    logits = rng.normal(size=(200, 4)) * 3
    logits[np.arange(200), labels] += 4  # mostly right, over-confident
    cal = calibration_summary(logits, labels, temperature=2.5)
    (run / "metrics.json").write_text(json.dumps({**metrics, "split": "test", "calibration": cal}))
    text = write_report(run).read_text()
    section = text.split("## Calibration")[1].split("\n## ")[0]
    assert "Temperature **2.500**" in section
    assert f"| ECE (15 bins) | {cal['before']['ece']:.4f} | {cal['after']['ece']:.4f} |" in section
    assert "](reliability.png)" in section
    with Image.open(run / "report" / "reliability.png") as im:
        assert im.width > 200 and im.height > 200
