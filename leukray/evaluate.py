"""Evaluation: score labelled images through the batch-inference path, then compute metrics.

Evaluating with the same `score_paths` that users run in production means the reported
numbers come from exactly the code (preprocessing, model loading, batching) that will
score their archives.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from leukray import calibration, trust
from leukray.config import RayConfig, ScoreConfig
from leukray.data import list_labeled_images
from leukray.infer import score_paths
from leukray.modelfile import read_model_meta
from leukray.rundir import METRICS_FILE, SPLIT_FILE, TEST_PREDICTIONS_DIR, read_predictions, valid_predictions


def compute_metrics(df: pd.DataFrame, classes: list[str]) -> dict:
    """Accuracy, log loss, per-class precision/recall/F1/ROC-AUC, macro-F1, confusion matrix.

    `df` is a predictions table with a `label` column. Rows that failed to decode are
    counted in `errors`, rows whose label is not a model class in `unknown_labels`; both
    are left out of the metrics (the same rows the report's ROC curves use).
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

    _, y, probs = valid_predictions(df, classes)
    errors = int(df["error"].notna().sum()) if "error" in df else 0
    pred = probs.argmax(1)
    labels = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    per_class = {}
    for i, c in enumerate(classes):
        binary = (y == i).astype(int)
        auc = float(roc_auc_score(binary, probs[:, i])) if 0 < binary.sum() < len(binary) else None
        per_class[c] = {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i]), "roc_auc": auc}
    eps = 1e-12
    return {
        "n": int(len(y)),
        "errors": errors,
        "unknown_labels": int(len(df) - errors - len(y)),
        "accuracy": float((pred == y).mean()) if len(y) else 0.0,
        "loss": float(-np.log(probs[np.arange(len(y)), y] + eps).mean()) if len(y) else 0.0,
        "macro_f1": float(np.mean(f)),
        "classes": classes,
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),  # rows: true, cols: predicted
    }


def trust_metrics(df: pd.DataFrame, classes: list[str], temperature: float) -> dict:
    """metrics.json's calibration and assessability facts of a predictions table.

    `calibration`: ECE (15 bins), Brier score, log loss before and after the temperature,
    and the reliability-diagram data (`calibration.calibration_summary`). The Parquet
    holds calibrated probabilities p; softmax(T * log p) gives back the raw ones (the row
    constant of log-softmax cancels), so no raw logits need storing. `assessable`: shares
    of decoded rows assessable / needing review, and how often each flag fired.
    """
    rows, y, probs = valid_predictions(df, classes)
    out = {}
    if len(y):
        raw_logits = temperature * np.log(np.clip(probs, 1e-38, 1.0))
        out["calibration"] = calibration.calibration_summary(raw_logits, y, temperature)
    if "assessable" in rows and len(rows):
        flags = [f for v in rows["quality_flags"] if isinstance(v, str) for f in v.split(";")]
        out["assessable"] = {"n": int(len(rows)), "assessable": int(rows["assessable"].sum()),
                             "share": float(rows["assessable"].mean()),
                             "needs_review_share": float(rows["needs_review"].mean()),
                             "flags": {f: flags.count(f) for f in sorted(set(flags))}}
    return out


def format_metrics(m: dict) -> str:
    """A short table for the terminal."""
    lines = [f"accuracy {m['accuracy']:.4f}   macro-F1 {m['macro_f1']:.4f}   loss {m['loss']:.4f}   n {m['n']}"
             + (f"   decode errors {m['errors']}" if m["errors"] else "")]
    if "calibration" in m:
        c = m["calibration"]
        lines.append(f"calibration (T {c['temperature']:.3f}): "
                     f"ECE {c['before']['ece']:.4f} -> {c['after']['ece']:.4f}, "
                     f"Brier {c['before']['brier']:.4f} -> {c['after']['brier']:.4f}, "
                     f"log loss {c['before']['log_loss']:.4f} -> {c['after']['log_loss']:.4f}")
    if "assessable" in m:
        a = m["assessable"]
        lines.append(f"assessable {a['assessable']}/{a['n']} ({a['share']:.2%}), needs review "
                     f"{a['needs_review_share']:.2%}, flags {a['flags'] or 'none'}")
    lines.append(f"{'class':<12}{'precision':>10}{'recall':>10}{'f1':>10}{'auc':>10}{'support':>9}")
    for c, v in m["per_class"].items():
        auc = f"{v['roc_auc']:.4f}" if v["roc_auc"] is not None else "-"
        lines.append(f"{c:<12}{v['precision']:>10.4f}{v['recall']:>10.4f}{v['f1']:>10.4f}{auc:>10}{v['support']:>9}")
    width = max(len(c) for c in m["classes"]) + 2
    lines.append("confusion (rows true, columns predicted):")
    lines.append(" " * width + "".join(f"{c[:7]:>8}" for c in m["classes"]))
    for c, row in zip(m["classes"], m["confusion_matrix"]):
        lines.append(f"{c:<{width}}" + "".join(f"{v:>8}" for v in row))
    return "\n".join(lines)


def evaluate_items(items: list[dict], model: str, output: str, ray_cfg: RayConfig | None, log=print) -> dict:
    """Score labelled items into local folder `output` (Parquet) and compute metrics on them.
    The class order comes from the model file's metadata: the network is not built here."""
    score_paths(items, ScoreConfig(model=model, output=output, overwrite=True), ray_cfg, log=log)
    meta = read_model_meta(model)
    df = read_predictions(output)
    metrics = compute_metrics(df, meta["classes"])
    if trust.of(meta) is not None:
        metrics.update(trust_metrics(df, meta["classes"], trust.temperature(meta)))
    return metrics


def evaluate_run(run_dir: str | Path, ray_cfg: RayConfig | None = None, log=print) -> dict:
    """Evaluate a run's model on its own test split; writes metrics.json."""
    run_dir = Path(run_dir)
    if not (run_dir / SPLIT_FILE).is_file():
        raise FileNotFoundError(f"--model {run_dir}: not a run directory of `leukray train` (no {SPLIT_FILE}); "
                                "a model file alone needs --data")
    split = pd.read_csv(run_dir / SPLIT_FILE)
    test = split[split["split"] == "test"]
    items = [{"path": p, "label": lab} for p, lab in zip(test["path"], test["label"])]
    metrics = evaluate_items(items, str(run_dir), str(run_dir / TEST_PREDICTIONS_DIR), ray_cfg, log)
    metrics["split"] = "test"
    (run_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    log("[leukray] test metrics\n" + format_metrics(metrics))
    return metrics


def evaluate_folder(model: str, data: str, output: str, ray_cfg: RayConfig | None = None, log=print) -> dict:
    """Evaluate a model on another labelled folder (class sub-folders)."""
    listing = list_labeled_images(data)
    items = [{"path": r["path"], "label": r["label"]} for r in listing.records]
    metrics = evaluate_items(items, model, str(Path(output) / "predictions"), ray_cfg, log)
    Path(output).mkdir(parents=True, exist_ok=True)
    (Path(output) / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    log(format_metrics(metrics))
    return metrics
