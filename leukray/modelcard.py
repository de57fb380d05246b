"""The model card: what a model is for, what it was trained on, how good it is, where it fails.

A lab that receives `model.pt` (or `export/model.json`) should not need the run directory
or the README to know that it is a research and triage aid, which data and licence it
comes from, what input it expects, how the test split was chosen and how sure the
metrics are. So the same facts are written twice (as MONAI bundles do): a `card` dict of
plain types in the model file's metadata (`export` copies the metadata into model.json),
and RUN_DIR/model_card.md for people. `train` writes both at its end; `write_model_card`
regenerates them from a run directory, optionally with `leukray cv` intervals.

Calibration and "assessable" thresholds are read from the model's trust metadata
(`leukray.trust`: temperature, colour model, OOD and review thresholds) and metrics.json
(test-split ECE and assessable share); a model without trust metadata says "not
calibrated" / "no assessability checks stored".
"""

from __future__ import annotations

import io
import json
import platform
from pathlib import Path

from leukray import trust
from leukray.export import JSON_FILENAME, model_json_text
from leukray.rundir import (CONFIG_FILE, CV_METRICS_FILE, EXPORT_DIR, METRICS_FILE, MODEL_CARD_FILE, MODEL_FILE,
                            fold_dir_name, read_model_meta)

INTENDED_USE = ("Research, and triage support in a laboratory that bulk-scores archived peripheral blood smear "
                "images: ranking images for expert review. It is not a diagnosis: every result must be confirmed by a "
                "qualified haematologist, and the model has not been validated on any clinical population.")
OUT_OF_SCOPE = ("Diagnosis or treatment decisions; images that are not Wright-Giemsa-stained peripheral blood smears "
                "of the kind it was trained on; other microscopes, stains or scanners without re-validation.")
KNOWN_FAILURE_MODES = [
    "Benign (hematogones) <-> Early Pre-B confusions: the two look alike and cause most errors.",
    "Images unlike the training set (other stains, magnifications, blank or mis-scanned images, non-smears) still "
    "get a confident class unless the assessability checks are on; raw softmax confidence is not a probability "
    "of being right unless the model is calibrated.",
    "The colour model and normalization are tied to the training folder (Original vs Segmented images differ).",
    "Metrics come from one hospital's 89 patients; groups of consecutive file numbers approximate patients, "
    "so leakage between splits is reduced, not excluded.",
]
# Public dataset this package was developed on, recognised by its folder name.
KNOWN_DATA = {
    "all-taleqani": {
        "source": "Aria M, Ghaderzadeh M, Bashash D, Abolghasemi H, Asadi F, Hosseini A. \"Acute Lymphoblastic "
                  "Leukemia (ALL) image dataset\". Mendeley Data, 2021 (Taleqani Hospital, Tehran; 3,256 images, "
                  "89 patients; Kaggle mehradaria/leukemia)",
        "licence": "CC BY 4.0",
    },
}


def _data_facts(data_path: str | None) -> dict:
    facts = {"path": data_path}
    for key, info in KNOWN_DATA.items():
        if data_path and key in str(data_path):
            return {**facts, **info}
    return {**facts, "source": "user data (see path)", "licence": "unknown: see the data owner's terms"}


def _versions() -> dict:
    import torch

    import leukray

    try:
        import ray
        ray_version = str(ray.__version__)
    except ImportError:
        ray_version = None
    # str(): torch.__version__ is a TorchVersion, which torch.load(weights_only=True) refuses
    return {"leukray": str(leukray.__version__), "torch": str(torch.__version__), "ray": ray_version,
            "python": platform.python_version()}


def _calibration(meta: dict, metrics: dict | None) -> dict | str:
    """Temperature and validation ECE from the model's trust metadata; test ECE from metrics.json."""
    t = trust.of(meta)
    if t is None:
        return "not calibrated"
    val = t.get("validation") or {}
    out = {"method": "temperature scaling, fitted on the validation split", "temperature": t["temperature"],
           "validation_ece_before": val.get("ece_before"), "validation_ece_after": val.get("ece_after")}
    cal = (metrics or {}).get("calibration")
    for when in ("before", "after"):
        if isinstance(cal, dict) and isinstance(cal.get(when), dict):
            out[f"test_ece_{when}"] = cal[when].get("ece")
    return out


def _assessable(meta: dict, metrics: dict | None) -> dict | str:
    """The thresholds behind `assessable`/`needs_review`, and the test split's assessable share."""
    t = trust.of(meta)
    if t is None:
        return "no assessability checks stored"
    out = {}
    colour = t.get("colour_model")
    if isinstance(colour, dict) and colour.get("threshold") is not None:
        out["colour_distance_threshold"] = colour["threshold"]
        out.update({f"colour_{k}": colour[k] for k in ("keep", "confidence") if colour.get(k) is not None})
    for key in ("ood_score", "ood_threshold", "ood_keep", "ood_confidence", "ood_confidence_achieved",
                "review_threshold"):
        if t.get(key) is not None:
            out[key] = t[key]
    test = (metrics or {}).get("assessable")
    if isinstance(test, dict) and test.get("share") is not None:
        out["test_assessable_share"] = test["share"]
    return out


def _metrics(meta: dict, metrics: dict | None, cv: dict | None) -> dict:
    out = {"selection": {"best_epoch": meta.get("best_epoch"), "val_accuracy": meta.get("val_accuracy"),
                         "weights": "exponential moving average" if (meta.get("train_config") or {}).get(
                             "train", {}).get("ema") else "raw weights of the best epoch"}}
    if metrics:
        out["test"] = {"n": metrics.get("n"), "accuracy": metrics.get("accuracy"), "macro_f1": metrics.get("macro_f1"),
                       "recall": {c: v.get("recall") for c, v in (metrics.get("per_class") or {}).items()}}
    if cv:
        out["cv"] = {"folds": cv.get("folds"), "n": cv.get("n"), "confidence": cv.get("confidence"),
                     "across_folds": {m: {k: a.get(k) for k in ("mean", "low", "high")}
                                      for m, a in cv.get("across_folds", {}).items()},
                     "pooled": {m: {k: p.get(k) for k in ("value", "low", "high", "method")}
                                for m, p in cv.get("pooled", {}).items()}}
    return out


def build_card(meta: dict, metrics: dict | None = None, cv: dict | None = None) -> dict:
    """The card's facts as plain types (JSON- and `torch.load(weights_only=True)`-safe)."""
    cfg = meta.get("train_config") or {}
    data = cfg.get("data", {})
    size = meta.get("image_size")
    return {
        "intended_use": INTENDED_USE,
        "out_of_scope": OUT_OF_SCOPE,
        "model": {"arch": meta.get("arch"), "model_id": meta.get("model_id")},
        "data": _data_facts(data.get("data")),
        "classes": list(meta.get("classes", [])),
        "input": {"dtype": "uint8", "channels": "RGB", "layout": "NHWC", "size": [size, size],
                  "preprocessing": "whole image decoded and resized (bilinear) to size x size, no crop; scaling "
                                   "and normalization happen inside the model"},
        "split": {k: data.get(k) for k in ("split", "group_size", "val_fraction", "test_fraction", "split_seed",
                                           "folds", "fold")} | {"split_id": meta.get("split_id"),
                                                                "rule": "groups (byte-identical files; with "
                                                                        "'grouped', runs of consecutive file numbers) "
                                                                        "never straddle train/val/test"},
        "metrics": _metrics(meta, metrics, cv),
        "calibration": _calibration(meta, metrics),
        "assessable": _assessable(meta, metrics),
        "known_failure_modes": list(KNOWN_FAILURE_MODES),
        "versions": _versions(),
    }


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _metric_lines(m: dict) -> list[str]:
    lines = [f"- Selected: epoch {_fmt(m['selection']['best_epoch'])} by validation accuracy "
             f"({_fmt(m['selection']['val_accuracy'])}), {m['selection']['weights']}."]
    if "test" in m:
        t = m["test"]
        lines.append(f"- Test split (n = {t['n']}): accuracy {_fmt(t['accuracy'])}, macro-F1 {_fmt(t['macro_f1'])}; "
                     "recall " + ", ".join(f"{c} {_fmt(r)}" for c, r in t["recall"].items()) + ".")
    if "cv" in m:
        c = m["cv"]
        lines.append(f"- Cross-validation ({c['folds']} grouped folds, {c['n']} out-of-fold predictions, "
                     f"{c['confidence']:.0%} intervals):")
        lines += ["", "| metric | mean across folds [interval] | pooled out-of-fold [interval] |", "| --- | --- | --- |"]
        for name, a in c["across_folds"].items():
            p = c["pooled"].get(name, {})
            lines.append(f"| {name} | {_fmt(a['mean'])} [{_fmt(a['low'])}, {_fmt(a['high'])}] | "
                         f"{_fmt(p.get('value'))} [{_fmt(p.get('low'))}, {_fmt(p.get('high'))}] |")
    return lines


def render_markdown(card: dict) -> str:
    """model_card.md: the card's facts in the order a reader asks for them."""
    d, i, s = card["data"], card["input"], card["split"]
    lines = [f"# Model card: {card['model']['arch']} {card['model']['model_id']}", "",
             "## Intended use", card["intended_use"], "", f"Out of scope: {card['out_of_scope']}", "",
             "## Data", f"- Source: {d['source']}", f"- Licence: {d['licence']}", f"- Path: `{d['path']}`",
             f"- Classes: {', '.join(card['classes'])}", "",
             "## Input", f"- {i['dtype']} {i['channels']} {i['layout']}, {i['size'][0]} x {i['size'][1]} pixels; "
             f"{i['preprocessing']}.", "",
             "## Split", f"- Policy {s['split']} (group size {s['group_size']}, seed {s['split_seed']}"
             + (f", fold {s['fold']} of {s['folds']}" if s.get("folds") else
                f", val {s['val_fraction']}, test {s['test_fraction']}") + f"), split id {s['split_id']}.",
             f"- {s['rule']}.", "",
             "## Metrics", *_metric_lines(card["metrics"]), "",
             "## Calibration", _as_text(card["calibration"]), "",
             "## Assessability thresholds", _as_text(card["assessable"]), "",
             "## Known failure modes", *[f"- {f}" for f in card["known_failure_modes"]], "",
             "## Versions", ", ".join(f"{k} {v}" for k, v in card["versions"].items()), ""]
    return "\n".join(lines)


def _as_text(v) -> str:
    return v if isinstance(v, str) else ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())


def attach_card(model_file: Path, card: dict) -> None:
    """Store `card` in the model file's metadata (same weights, same model_id), atomically."""
    import torch

    blob = torch.load(model_file, map_location="cpu", weights_only=True)
    blob["meta"]["card"] = card
    buf = io.BytesIO()
    torch.save(blob, buf)
    tmp = Path(str(model_file) + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(model_file)


def _attach_to_export(model_json: Path, card: dict, model_id: str | None) -> None:
    """The card into the run's export/model.json too, when that export is of this model:
    `train` exports before it scores the test split, so the export's metadata has no card
    (and no test metrics) until now."""
    doc = _read(model_json)
    if doc is None or model_id is None or doc.get("model_id") != model_id:
        return
    doc["card"] = card
    tmp = model_json.with_name(model_json.name + ".tmp")
    tmp.write_text(model_json_text(doc))
    tmp.replace(model_json)


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _cv_above_fold(run_dir: Path, meta: dict) -> dict | None:
    """The cv_metrics.json of the CV directory that holds `run_dir` as its fold-K (the layout
    `leukray cv` writes), when it is of as many folds as this run was trained for."""
    data = (meta.get("train_config") or {}).get("data") or {}
    folds, fold = data.get("folds"), data.get("fold")
    if folds is None or run_dir.name != fold_dir_name(fold):
        return None
    cv = _read(run_dir.parent / CV_METRICS_FILE)
    return cv if cv and cv.get("folds") == folds else None


def write_model_card(run_dir: str | Path, cv_metrics: str | Path | None = None) -> Path:
    """(Re)write RUN_DIR/model_card.md and the model file's `card` from what the run holds:
    model metadata, metrics.json and, if given (or a cv_metrics.json in the run directory, or
    in the CV directory above a fold run), `leukray cv` intervals. Cheap: no network is built,
    nothing is scored."""
    run_dir = Path(run_dir)
    meta = read_model_meta(run_dir / MODEL_FILE)
    if not (meta.get("train_config") or {}).get("data") and (run_dir / CONFIG_FILE).is_file():
        meta = {**meta, "train_config": _read(run_dir / CONFIG_FILE)}
    if cv_metrics:
        cv = _read(Path(cv_metrics))
    else:
        cv = _read(run_dir / CV_METRICS_FILE) or _cv_above_fold(run_dir, meta)
    card = build_card(meta, _read(run_dir / METRICS_FILE), cv)
    attach_card(run_dir / MODEL_FILE, card)
    _attach_to_export(run_dir / EXPORT_DIR / JSON_FILENAME, card, meta.get("model_id"))
    path = run_dir / MODEL_CARD_FILE
    path.write_text(render_markdown(card))
    return path
