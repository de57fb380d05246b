"""The model card: markdown for people, the same facts in the model file's metadata."""

import json

import numpy as np
import torch

from leukray import trust
from leukray.model import create_model, load_model, save_model
from leukray.modelcard import build_card, write_model_card
from leukray.rundir import CV_METRICS_FILE, METRICS_FILE, MODEL_CARD_FILE, MODEL_FILE, read_model_meta

CLASSES = ["Benign", "Early", "Pre", "Pro"]


def _run(tmp_path, data="/x/shared/data/all-taleqani/Original", folds=None, **extra_meta):
    model = create_model("leuknet", 4)
    meta = save_model(tmp_path / MODEL_FILE, model, {
        "arch": "leuknet", "classes": CLASSES, "image_size": 128, "mean": [0.8] * 3, "std": [0.1] * 3,
        "train_config": {"data": {"data": data, "split": "grouped", "group_size": 20, "val_fraction": 0.15,
                                  "test_fraction": 0.15, "split_seed": 0, "folds": folds, "fold": 0},
                         "train": {"ema": True}},
        "split_id": "abc", "best_epoch": 7, "val_accuracy": 0.97, **extra_meta})
    (tmp_path / METRICS_FILE).write_text(json.dumps({
        "n": 391, "accuracy": 0.9847, "macro_f1": 0.981, "classes": CLASSES,
        "per_class": {c: {"recall": r} for c, r in zip(CLASSES, (0.93, 0.99, 1.0, 1.0))}}))
    return meta


def test_card_written_as_markdown_and_into_the_model_file(tmp_path):
    before = _run(tmp_path)
    path = write_model_card(tmp_path)
    text = path.read_text()
    assert path == tmp_path / MODEL_CARD_FILE
    for needle in ("not a diagnosis", "CC BY 4.0", "Aria M", "uint8 RGB NHWC, 128 x 128", "Policy grouped",
                   "accuracy 0.9847", "Benign 0.9300", "exponential moving average", "not calibrated",
                   "no assessability checks stored", "Benign (hematogones) <-> Early", "torch "):
        assert needle in text, needle
    meta = read_model_meta(tmp_path / MODEL_FILE)
    card = meta["card"]
    assert card["classes"] == CLASSES and card["metrics"]["test"]["accuracy"] == 0.9847
    assert card["data"]["licence"] == "CC BY 4.0" and card["calibration"] == "not calibrated"
    assert meta["model_id"] == before["model_id"]  # same weights, same id
    _, loaded_meta = load_model(tmp_path)  # still a valid model file
    assert json.loads(json.dumps(loaded_meta["card"])) == card  # plain types


def _trust() -> dict:
    """Trust metadata as `train` stores it (meta["trust"]), fitted on synthetic validation logits."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    logits = 3 * (rng.normal(size=(400, 4)) + 2 * np.eye(4)[labels])
    return trust.fit_arrays(logits, labels, np.ones(400, bool),
                            {"threshold": 6.5, "keep": 0.998, "confidence": 0.95}, review=0.8)


def test_card_shows_calibration_thresholds_and_cv_intervals_when_present(tmp_path):
    t = _trust()
    _run(tmp_path, data="/elsewhere/my-lab-images", trust=t)
    metrics = json.loads((tmp_path / METRICS_FILE).read_text())
    metrics["calibration"] = {"temperature": t["temperature"], "before": {"ece": 0.05}, "after": {"ece": 0.012}}
    metrics["assessable"] = {"n": 391, "assessable": 381, "share": 0.9744}
    (tmp_path / METRICS_FILE).write_text(json.dumps(metrics))
    cv = {"folds": 5, "n": 3256, "confidence": 0.95,
          "across_folds": {"accuracy": {"mean": 0.981, "low": 0.975, "high": 0.987}},
          "pooled": {"accuracy": {"value": 0.9812, "low": 0.976, "high": 0.985, "method": "wilson"}}}
    (tmp_path / "cv.json").write_text(json.dumps(cv))
    text = write_model_card(tmp_path, tmp_path / "cv.json").read_text()
    assert f"temperature {t['temperature']:.4f}" in text and "test_ece_before 0.0500, test_ece_after 0.0120" in text
    assert f"validation_ece_after {t['validation']['ece_after']:.4f}" in text
    assert "colour_distance_threshold 6.5000, colour_keep 0.9980, colour_confidence 0.9500" in text and f"ood_threshold {t['ood_threshold']:.4f}" in text
    assert f"ood_keep 0.9900, ood_confidence 0.9500, ood_confidence_achieved {t['ood_confidence_achieved']:.4f}, " \
        "review_threshold 0.8000" in text
    assert "test_assessable_share 0.9744" in text
    assert "| accuracy | 0.9810 [0.9750, 0.9870] | 0.9812 [0.9760, 0.9850] |" in text
    assert "user data" in text and "/elsewhere/my-lab-images" in text
    card = read_model_meta(tmp_path / MODEL_FILE)["card"]
    assert card["metrics"]["cv"]["pooled"]["accuracy"]["method"] == "wilson"
    assert card["assessable"]["ood_threshold"] == t["ood_threshold"]


def test_card_goes_into_the_runs_export_of_the_same_model_only(tmp_path):
    meta = _run(tmp_path, trust=_trust())
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.json").write_text(json.dumps({"model_id": meta["model_id"], "arch": "leuknet"}))
    write_model_card(tmp_path)
    exported = json.loads((tmp_path / "export" / "model.json").read_text())
    assert exported["card"] == read_model_meta(tmp_path / MODEL_FILE)["card"] and exported["arch"] == "leuknet"
    (tmp_path / "export" / "model.json").write_text(json.dumps({"model_id": "another model"}))
    write_model_card(tmp_path)
    assert "card" not in json.loads((tmp_path / "export" / "model.json").read_text())


def test_build_card_without_metrics_is_still_complete():
    card = build_card({"arch": "leuknet", "classes": CLASSES, "image_size": 64, "model_id": "x"})
    assert "test" not in card["metrics"] and card["versions"]["torch"] == torch.__version__
    assert set(card) >= {"intended_use", "data", "classes", "input", "split", "metrics", "calibration",
                         "assessable", "known_failure_modes", "versions"}


def test_a_fold_runs_card_finds_the_cv_intervals_above_it_and_a_plain_run_does_not(tmp_path):
    cv = {"folds": 5, "n": 2769, "confidence": 0.95,
          "across_folds": {"accuracy": {"mean": 0.975, "low": 0.958, "high": 0.992}}, "pooled": {}}
    (tmp_path / CV_METRICS_FILE).write_text(json.dumps(cv))
    fold, plain, other = tmp_path / "fold-0", tmp_path / "plain", tmp_path / "b" / "fold-0"
    for d in (fold, plain, other):
        d.mkdir(parents=True)
    (tmp_path / "b" / CV_METRICS_FILE).write_text(json.dumps(cv))
    _run(fold, folds=5)
    _run(plain)
    _run(other, folds=3)  # fold 0 of a 3-fold run inside a 5-fold CV directory: not its intervals
    assert "| accuracy | 0.9750 [0.9580, 0.9920]" in write_model_card(fold).read_text()  # e.g. after `leukray refit`
    assert "0.9750" not in write_model_card(plain).read_text()
    assert "0.9750" not in write_model_card(other).read_text()
