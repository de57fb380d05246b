"""The report's Markdown sections, each built from a loaded run (`leukray.rundir.Run`).

A section function draws its figures into the report folder (with `leukray.figures`) and
returns Markdown that links them by file name, so the folder can be moved or zipped whole
and any other writer (an HTML page) can render the same sections and embed the same PNGs.
A section whose input is missing returns a note instead of failing the report.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from leukray.data import class_key
from leukray.figures import (load_thumbnail, plot_confusion, plot_curves, plot_misclassified, plot_reliability, plot_roc,
                             plot_samples)
from leukray.modelsummary import format_summary, model_summary, si
from leukray.rundir import (HISTORY_FILE, METRICS_FILE, MODEL_FILE, SPLIT_FILE, TEST_PREDICTIONS_DIR, TIMINGS_FILE, Run,
                            valid_predictions)
from leukray.storage import is_uri

SPLITS = ("train", "val", "test")
# Every figure and file a report may write: deleted first, so no stale one outlives a rerun.
FIGURES = ("samples.png", "curves.png", "confusion.png", "roc.png", "misclassified.png", "model_summary.txt")


def _resolve_image(path: str, relpath: str | None, data_root: str | None) -> str:
    """The file as recorded, or DATA/relpath when the recorded absolute path moved."""
    if is_uri(path) or os.path.exists(path) or not (relpath and data_root):
        return path
    alt = os.path.join(data_root, relpath)
    return alt if os.path.exists(alt) else path


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _duration(seconds: float) -> str:
    m, s = divmod(float(seconds), 60)
    return f"{int(m)} min {s:.0f} s" if m else f"{s:.1f} s"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def _img(name: str, alt: str) -> str:
    """A relative Markdown image link: the report folder can be moved or zipped whole."""
    return f"![{alt}]({name})"


def _note(text: str) -> str:
    return f"> **Note:** {text}"


def _short_name(path: str) -> str:
    """'#163' for WBC-Malignant-Early-163.jpg (the row already names the class)."""
    from leukray.split import file_number

    n = file_number(Path(path).name)
    return f"#{n:03d}" if n is not None else Path(path).stem[:18]


def pick_samples(split: pd.DataFrame, classes: list[str], per_class: int, data_root: str | None, seed: int = 0
                 ) -> dict[str, list[str]]:
    """`per_class` train-split paths per class, spread over the file list, reproducibly."""
    train = split[split["split"] == "train"] if "split" in split else split
    out = {}
    for c in classes:
        rows = train[train["label"].astype(str).map(class_key) == class_key(c)]
        if len(rows) > per_class:
            rows = rows.sample(per_class, random_state=seed).sort_values("path")
        relpaths = rows["relpath"] if "relpath" in rows else [None] * len(rows)
        out[c] = [_resolve_image(p, r, data_root) for p, r in zip(rows["path"], relpaths)]
    return out


def section_samples(run: Run, out: Path, per_class: int) -> str:
    if run.split is None:
        return _note(f"no {SPLIT_FILE}, so no sample images.")
    if per_class <= 0:
        return _note("sample grid disabled (samples_per_class=0).")
    items = pick_samples(run.split, run.classes, per_class, _data_root(run))
    if not any(items.values()):
        return _note("the train split holds no images of the model's classes.")
    tiles = {c: [(_short_name(p), load_thumbnail(p)) for p in paths] for c, paths in items.items()}
    train = run.split[run.split["split"] == "train"]
    plot_samples(tiles, out / "samples.png", train["label"].astype(str).value_counts().to_dict())
    text = _img("samples.png", "sample training images per class")
    missing = sum(a is None for v in tiles.values() for _, a in v)
    if missing:
        text += "\n\n" + _note(f"{missing} sample file(s) could not be read (moved data?); shown as blank tiles.")
    return text


def section_model(run: Run, out: Path) -> str:
    """Layer table, parameters and FLOPs. The network is built here, only for this section:
    `load_run` reads the model file's metadata alone."""
    from leukray.model import load_model

    if run.meta is None:
        return _note(f"no {MODEL_FILE}, so no model summary.")
    size = int(run.meta.get("image_size") or 224)
    s = model_summary(load_model(run.dir / MODEL_FILE)[0], size)
    text = format_summary(s)
    (out / "model_summary.txt").write_text(
        f"arch {run.meta.get('arch')}   model_id {run.meta.get('model_id')}\n\n{text}\n\n{s['repr']}\n")
    return (f"Architecture `{run.meta.get('arch')}`, input {s['input']} (normalization is inside the model). "
            f"**{s['params']:,} parameters**, **{si(s['flops'])}FLOPs** per image "
            f"(`FlopCounterMode`, multiply-add = 2 FLOPs). Full `print(model)` in "
            f"[model_summary.txt](model_summary.txt).\n\n```text\n{text}\n```")


def best_epoch_index(history: list[dict]) -> int:
    """Index of the epoch training kept: highest val accuracy, ties to lower val loss, then
    the earliest (the same rule as `train.py`, which only replaces on strict improvement)."""
    return max(range(len(history)), key=lambda i: (history[i].get("val_accuracy", -1.0),
                                                    -history[i].get("val_loss", math.inf), -i))


def section_curves(run: Run, out: Path) -> str:
    if not run.history:
        return _note(f"no usable {HISTORY_FILE}, so no training curves.")
    plot_curves(run.history, out / "curves.png", best_epoch_index(run.history))
    text = _img("curves.png", "training curves")
    train = (run.config or {}).get("train", {})
    if train.get("augment") or train.get("label_smoothing") or train.get("class_weights"):
        text += ("\n\nTrain loss and accuracy are running averages over each epoch's augmented batches "
                 "(with label smoothing and class weights when set), so they can sit above val loss / "
                 "below val accuracy without meaning anything is wrong.")
    return text


def section_metrics(run: Run, out: Path) -> str:
    """Per-class table and the confusion matrix (from metrics.json)."""
    m = run.metrics
    if not m:
        return _note(f"no {METRICS_FILE} and no predictions, so no test metrics.")
    classes = list(m.get("classes") or run.classes)
    rows = []
    for c in classes:
        v = (m.get("per_class") or {}).get(c, {})
        rows.append([c, _fmt(v.get("precision")), _fmt(v.get("recall")), _fmt(v.get("f1")),
                     _fmt(v.get("roc_auc")), str(v.get("support", "n/a"))])
    pcs = [(m.get("per_class") or {}).get(c, {}) for c in classes]
    aucs = [v.get("roc_auc") for v in pcs if v.get("roc_auc") is not None]
    rows.append(["**macro avg**"] + [_fmt(float(np.mean([v.get(k, 0.0) for v in pcs]))) for k in ("precision", "recall")]
                + [_fmt(m.get("macro_f1")), _fmt(float(np.mean(aucs))) if aucs else "n/a",
                   str(sum(v.get("support", 0) for v in pcs))])
    text = (f"Test split: accuracy **{_fmt(m.get('accuracy'))}**, macro-F1 **{_fmt(m.get('macro_f1'))}**, "
            f"log loss {_fmt(m.get('loss'))}, n = {m.get('n')}"
            + (f", {m['errors']} file(s) failed to decode and are left out" if m.get("errors") else "") + ".\n\n")
    text += _md_table(["class", "precision", "recall", "F1", "ROC-AUC", "support"], rows)
    if m.get("confusion_matrix"):
        plot_confusion(m["confusion_matrix"], classes, out / "confusion.png")
        text += "\n\n" + _img("confusion.png", "confusion matrix")
    return text


def section_calibration(run: Run, out: Path) -> str:
    """Temperature, ECE / Brier / log loss before and after, the reliability diagram (from
    metrics.json's `calibration`, written by `evaluate` for a model with trust metadata)."""
    cal = (run.metrics or {}).get("calibration")
    if not cal:
        return _note(f"no `calibration` in {METRICS_FILE} (a model without trust metadata, or evaluated by an "
                     "older leukray): probabilities are not calibrated.")
    rows = [[name, _fmt(cal["before"][key]), _fmt(cal["after"][key])]
            for name, key in (("ECE (%d bins)" % cal.get("bins", 15), "ece"), ("Brier score", "brier"),
                              ("log loss", "log_loss"), ("mean confidence", "mean_confidence"),
                              ("accuracy", "accuracy"))]
    text = (f"Temperature **{cal['temperature']:.3f}**, fitted on the validation split; the table and the "
            "diagram are on the test split.\n\n"
            + _md_table(["metric", "before", "after"], rows))
    if cal.get("reliability"):
        plot_reliability(cal["reliability"], {k: cal[k]["ece"] for k in ("before", "after")}, out / "reliability.png")
        text += "\n\n" + _img("reliability.png", "reliability diagram")
    return text


def section_roc(run: Run, out: Path) -> str:
    if run.predictions is None:
        return _note(f"no {TEST_PREDICTIONS_DIR}/*.parquet, so no ROC curves.")
    rows, y, probs = valid_predictions(run.predictions, run.classes)
    if not len(y):
        return _note("the test predictions hold no decoded rows with a known label, so no ROC curves.")
    plot_roc(y, probs, run.classes, out / "roc.png")
    return _img("roc.png", "ROC curves")


def misclassified(preds: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Wrong test predictions, most confident first: confident mistakes are the ones worth a
    look (label noise, duplicates across classes, artefacts)."""
    rows, y, probs = valid_predictions(preds, classes)
    pred = probs.argmax(1)
    wrong = rows[pred != y].copy()
    wrong["true"] = [classes[i] for i in y[pred != y]]
    wrong["pred"] = [classes[i] for i in pred[pred != y]]
    wrong["p"] = probs[pred != y].max(1)
    return wrong.sort_values(["p", "path"], ascending=[False, True])


def section_misclassified(run: Run, out: Path, limit: int) -> str:
    target = out / "misclassified.png"
    if run.predictions is None:
        return _note(f"no {TEST_PREDICTIONS_DIR}/*.parquet, so no misclassified gallery.")
    wrong = misclassified(run.predictions, run.classes)
    if not len(wrong):
        return "No test image is misclassified."
    shown = wrong.head(max(0, limit)).copy()
    if "relpath" not in shown and run.split is not None:
        shown = shown.merge(run.split[["path", "relpath"]], on="path", how="left")
    data_root = _data_root(run)
    shown["path"] = [_resolve_image(p, r, data_root) for p, r in
                     zip(shown["path"], shown.get("relpath", pd.Series([None] * len(shown))))]
    text = f"{len(wrong)} of {len(run.predictions)} test images are misclassified"
    if not len(shown):
        return text + " (gallery disabled: max_misclassified=0)."
    plot_misclassified(shown, target)
    text += f"; the {len(shown)} most confident are shown." if len(shown) < len(wrong) else "; all are shown."
    pairs = wrong.groupby(["true", "pred"]).size().sort_values(ascending=False)
    text += "\n\n" + _md_table(["true", "predicted", "count"], [[t, p, str(k)] for (t, p), k in pairs.items()])
    return text + "\n\n" + _img("misclassified.png", "misclassified test images")


def _data_root(run: Run) -> str | None:
    """The data folder: config's --data (relative to where training ran), else the common
    folder of split.csv's paths minus the class folder."""
    if run.split is not None and len(run.split) and "relpath" in run.split:
        p, rel = str(run.split["path"].iloc[0]), str(run.split["relpath"].iloc[0])
        if p.endswith(rel):
            return p[: -len(rel)].rstrip("/") or "/"
    return run.config.get("data", {}).get("data") if run.config else None


def _split_policy(run: Run) -> str:
    data = (run.config or {}).get("data", {})
    policy = data.get("split", "n/a")
    if run.split is not None and "relpath" in run.split:
        from leukray.split import resolve_policy

        try:
            resolved = resolve_policy(policy, run.split["relpath"].astype(str).tolist())
            if resolved != policy:
                policy = f"{policy} -> {resolved}"
        except ValueError:
            pass
    parts = [f"`{policy}`", f"split_seed {data.get('split_seed', 'n/a')}", f"group_size {data.get('group_size', 'n/a')}"]
    if data.get("val_fraction") is not None:
        parts.append(f"val/test fractions {data['val_fraction']}/{data.get('test_fraction')}")
    if run.split is not None and "group" in run.split:
        parts.append(f"{run.split['group'].nunique()} groups")
    return ", ".join(parts)


def split_counts(run: Run) -> str:
    """Images per split and class, with totals: the first check that the split is sane."""
    if run.split is None:
        return _note(f"no {SPLIT_FILE}: counts per split unknown.")
    classes = run.classes
    rows = []
    for s in SPLITS:
        part = run.split[run.split["split"] == s]
        counts = part["label"].astype(str).value_counts()
        rows.append([s] + [str(int(counts.get(c, 0))) for c in classes] + [f"**{len(part)}**"])
    total = run.split["label"].astype(str).value_counts()
    rows.append(["**all**"] + [str(int(total.get(c, 0))) for c in classes] + [f"**{len(run.split)}**"])
    return _md_table(["split"] + classes + ["total"], rows)


def _best_epoch(run: Run) -> str:
    """The kept epoch from history.json, else as model.pt recorded it."""
    if run.history:
        best = best_epoch_index(run.history)
        h = run.history[best]
        return f"{h.get('epoch', best + 1)} (val accuracy {_fmt(h.get('val_accuracy'))}, val loss {_fmt(h.get('val_loss'))})"
    meta = run.meta or {}
    return f"{meta['best_epoch']} (from {MODEL_FILE})" if meta.get("best_epoch") else "n/a"


def _epochs(run: Run) -> str:
    t = run.timings
    epochs = t.get("epochs_run") if t else None
    if epochs is None and run.history:
        epochs = len(run.history)
    max_epochs = (run.config or {}).get("train", {}).get("epochs")
    return f"{epochs if epochs is not None else 'n/a'}" + (f" of {max_epochs} max" if max_epochs else "")


def _training_time(run: Run) -> str:
    """From timings.json; without it, the sum of history's epoch times says at least something."""
    t = run.timings
    if t:
        return (f"{_duration(t['fit_s'])} fit" if "fit_s" in t else "fit n/a") + (
            f", {_duration(t['total_s'])} total incl. split/ingest/evaluation" if "total_s" in t else "")
    text = f"n/a (no {TIMINGS_FILE})"
    if run.history and all("epoch_time_s" in h for h in run.history):
        text += f"; sum of epoch times {_duration(sum(h['epoch_time_s'] for h in run.history))}"
    return text


def _data_path(run: Run) -> str:
    data = (run.config or {}).get("data", {})
    text = f"`{data.get('data', 'n/a')}`"
    root = _data_root(run)
    return text + (f" (files under `{root}`)" if root and root != data.get("data") else "")


def _check_model_id(run: Run) -> None:
    """Notes when the test predictions come from another model than model.pt (a re-train
    without re-evaluation): their metrics would describe the wrong weights."""
    meta = run.meta or {}
    if run.predictions is None or "model_id" not in run.predictions:
        return
    scored = sorted(set(run.predictions["model_id"].dropna().astype(str)))
    if meta.get("model_id") and scored and scored != [meta["model_id"]]:
        run.notes.append(f"{TEST_PREDICTIONS_DIR} were scored by model {', '.join(scored)}, not by {MODEL_FILE} "
                         f"({meta['model_id']}): re-run `leukray evaluate` before trusting the metrics")


def header(run: Run) -> str:
    """The numbers someone asks for first, in one list; 'n/a' says which file was missing.
    May add a note to `run.notes` (model id mismatch), so build it before listing the notes."""
    from leukray.predictors import BENIGN  # the scoring path's Benign name (torch loads lazily)

    cfg, m, meta = run.config or {}, run.metrics or {}, run.meta or {}
    data = cfg.get("data", {})
    benign = next((c for c in (m.get("per_class") or {}) if class_key(c) == BENIGN), None)
    benign_recall = _fmt(m["per_class"][benign]["recall"]) if benign else "n/a (no Benign class or no metrics)"
    _check_model_id(run)
    lines = [
        f"- **Run**: `{run.dir.resolve()}`",
        f"- **Model**: `{meta.get('arch', cfg.get('train', {}).get('arch', 'n/a'))}`, id `{meta.get('model_id', 'n/a')}`, "
        f"image size {meta.get('image_size', data.get('image_size', 'n/a'))}, classes {', '.join(run.classes) or 'n/a'}",
        f"- **Data**: {_data_path(run)}",
        f"- **Split policy**: {_split_policy(run)}",
        f"- **Test accuracy**: {_fmt(m.get('accuracy'))}   **macro-F1**: {_fmt(m.get('macro_f1'))}   "
        f"**Benign recall**: {benign_recall}",
        f"- **Epochs run**: {_epochs(run)}   **Best epoch**: {_best_epoch(run)}",
        f"- **Training time**: {_training_time(run)}",
    ]
    return "\n".join(lines)


def complete_metrics(run: Run) -> None:
    """Without (a readable) metrics.json, recompute the test metrics from predictions/test,
    with the same `compute_metrics` that `leukray evaluate` uses."""
    if run.metrics is None and run.predictions is not None and run.classes:
        from leukray.evaluate import compute_metrics

        run.metrics = compute_metrics(run.predictions, run.classes)
        run.notes.append(f"test metrics recomputed from {TEST_PREDICTIONS_DIR} ({METRICS_FILE} missing or unreadable)")


def guarded(title: str, build: Callable[[], str]) -> str:
    """One section's markdown; a malformed input file costs that section, not the report."""
    try:
        return build()
    except Exception as e:  # noqa: BLE001
        return _note(f"{title.lower()} could not be drawn ({type(e).__name__}: {e}).")


def build_sections(run: Run, out: Path, max_misclassified: int = 48, samples_per_class: int = 8
                   ) -> list[tuple[str, str]]:
    """(title, markdown) of every section in report order, figures drawn into `out`; what a
    report writer (Markdown today, HTML next) lays out."""
    builders = (
        ("Sample training images", lambda: section_samples(run, out, samples_per_class)),
        ("Model", lambda: section_model(run, out)),
        ("Training curves", lambda: section_curves(run, out)),
        ("Test metrics", lambda: section_metrics(run, out)),
        ("Calibration", lambda: section_calibration(run, out)),
        ("ROC curves", lambda: section_roc(run, out)),
        ("Misclassified test images", lambda: section_misclassified(run, out, max_misclassified)),
    )
    return [(title, guarded(title, build)) for title, build in builders]
