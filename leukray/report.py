"""A human-readable report of one training run: `leukray report RUN_DIR`.

Reads only what a run directory already holds (split.csv, config.json, model.pt,
history.json, metrics.json, timings.json, predictions/test/*.parquet) and writes
RUN_DIR/report/ with report.md and the PNGs it links. Nothing is re-scored and Ray is
not started, so a report takes seconds on a laptop.

Every input is optional: a missing or unreadable file turns its section into a note in
the report instead of failing the whole report (a run killed before evaluation still
gets its sample grid and model summary).

Figures are drawn on `matplotlib.figure.Figure` objects rendered by the Agg canvas: no
pyplot global state, no display needed, nothing left open after a figure is saved.

Extension point: `write_report(..., extra_sections=[(title, markdown), ...])` appends
sections to report.md, e.g. Grad-CAM overlays whose PNGs a later feature writes into
the same report folder (`report_dir(run_dir)`) and links relatively.
"""

from __future__ import annotations

import io
import json
import math
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from leukray.data import class_key, read_bytes

REPORT_DIRNAME = "report"
SPLITS = ("train", "val", "test")
BENIGN = "benign"
THUMB_PX = 160  # longest side of an image shown in a gallery
DPI = 100


# --------------------------------------------------------------------------- inputs

@dataclass
class Run:
    """Everything a report reads from a run directory; None where a file is missing."""

    dir: Path
    config: dict | None = None
    split: pd.DataFrame | None = None
    history: list[dict] | None = None
    metrics: dict | None = None
    timings: dict | None = None
    predictions: pd.DataFrame | None = None
    model: Any = None  # torch.nn.Module
    meta: dict | None = None
    notes: list[str] = field(default_factory=list)  # what could not be read, for the report header

    @property
    def classes(self) -> list[str]:
        for source in (self.metrics, self.meta, self.config):
            if source and source.get("classes"):
                return list(source["classes"])
        if self.split is not None:
            return sorted(self.split["label"].astype(str).unique())
        return []


def _optional(run: Run, name: str, what: str, reader: Callable[[Path], Any]) -> Any:
    """Read RUN_DIR/name with `reader`; on failure record a note saying what is lost."""
    path = run.dir / name
    try:
        if not path.exists():
            raise FileNotFoundError(path)
        return reader(path)
    except FileNotFoundError:  # also an empty predictions folder
        run.notes.append(f"no `{name}`: {what} not shown")
        return None
    except Exception as e:  # noqa: BLE001 - a broken file must not sink the report
        run.notes.append(f"`{name}` unreadable ({type(e).__name__}: {e}): {what} not shown")
        return None


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _read_history(path: Path) -> list[dict]:
    history = json.loads(path.read_text())
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise ValueError("expected a list of per-epoch objects")
    return history


def _read_predictions(folder: Path) -> pd.DataFrame:
    """All part files of a predictions folder as one table (parts hold disjoint paths)."""
    parts = sorted(folder.glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no part-*.parquet in {folder}")
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


def _read_model(path: Path):
    from leukray.model import load_model

    return load_model(path)


def load_run(run_dir: str | Path) -> Run:
    """Read every file a report uses; missing ones become notes, never exceptions."""
    run = Run(Path(run_dir))
    if not run.dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: not a run directory")
    run.config = _optional(run, "config.json", "data path and split settings", _read_json)
    run.split = _optional(run, "split.csv", "split counts and sample images", pd.read_csv)
    loaded = _optional(run, "model.pt", "model summary", _read_model)
    if loaded is not None:
        run.model, run.meta = loaded
    run.history = _optional(run, "history.json", "training curves", _read_history)
    run.timings = _optional(run, "timings.json", "training time", _read_json)
    run.predictions = _optional(run, "predictions/test", "ROC curves and misclassified images", _read_predictions)
    run.metrics = _optional(run, "metrics.json", "test metrics", _read_json)
    if run.metrics is None and run.predictions is not None and run.classes:
        from leukray.evaluate import compute_metrics

        run.metrics = compute_metrics(run.predictions, run.classes)
        run.notes.append("test metrics recomputed from predictions/test (metrics.json missing or unreadable)")
    return run


def report_dir(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Where a report goes: `output`, else RUN_DIR/report (also for add-on sections)."""
    return Path(output) if output is not None else Path(run_dir) / REPORT_DIRNAME


# --------------------------------------------------------------------------- helpers

def _new_figure(width: float, height: float):
    """A figure drawn by the Agg canvas, detached from pyplot (headless, thread-safe)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    """Save and release the figure's memory (the Figure is not registered with pyplot)."""
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    fig.clear()
    return path


def _resolve_image(path: str, relpath: str | None, data_root: str | None) -> str:
    """The file as recorded, or DATA/relpath when the recorded absolute path moved."""
    if "://" in path or os.path.exists(path) or not (relpath and data_root):
        return path
    alt = os.path.join(data_root, relpath)
    return alt if os.path.exists(alt) else path


def load_thumbnail(path: str, max_px: int = THUMB_PX) -> np.ndarray | None:
    """The image at its own aspect ratio, scaled down to fit `max_px`; None if unreadable.

    Galleries show the file as a person would see it, not the model's resized square.
    """
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(read_bytes(path)))
        im.draft("RGB", (max_px, max_px))  # JPEG: decode at a reduced scale, much faster
        im = im.convert("RGB")
        im.thumbnail((max_px, max_px))
        return np.asarray(im)
    except Exception:  # noqa: BLE001 - shown as a blank tile with a label
        return None


def _show_tile(ax, image: np.ndarray | None, title: str, fontsize: float = 8, color: str = "black") -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if image is None:
        ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=fontsize, color="grey")
    else:
        ax.imshow(image)
    ax.set_title(title, fontsize=fontsize, color=color)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


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


# --------------------------------------------------------------------------- samples

def plot_samples(tiles: dict[str, list[tuple[str, np.ndarray | None]]], path: Path,
                 counts: dict[str, int] | None = None) -> Path:
    """One row per class of training images: a quick look at what the model learned from
    (stain, framing, resolution) before trusting any number below."""
    classes = list(tiles)
    cols = max(1, max(len(v) for v in tiles.values()))
    fig = _new_figure(1.5 * cols + 1.2, 1.6 * len(classes))
    axes = fig.subplots(len(classes), cols, squeeze=False)
    for r, c in enumerate(classes):
        for k in range(cols):
            if k < len(tiles[c]):
                _show_tile(axes[r][k], tiles[c][k][1], tiles[c][k][0], fontsize=7)
            else:
                axes[r][k].axis("off")
        label = c if counts is None else f"{c}\n(n={counts.get(c, 0)})"
        axes[r][0].axis("on")  # keep the row label even when the row has no image
        axes[r][0].set_ylabel(label, fontsize=11, rotation=0, ha="right", va="center", labelpad=10)
    fig.suptitle("Training images per class (original aspect, scaled down)", fontsize=12)
    return _save(fig, path)


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
        return _note("no split.csv, so no sample images.")
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


# --------------------------------------------------------------------------- model summary

def _display_modules(model) -> list[tuple[str, Any, int]]:
    """(name, module, depth) rows for the layer table: the root's children, the network's
    children, and one more level inside plain containers (Sequential, ModuleList), so
    LeukNet shows its conv blocks and torchvision models their stages, not every BatchNorm."""
    from torch import nn

    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    rows = []

    def visit(prefix: str, module, depth: int) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            rows.append((full, child, depth))
            has_children = any(True for _ in child.children())
            if has_children and (depth == 0 or (depth == 1 and type(child) in containers)):
                visit(full, child, depth + 1)

    visit("", model, 0)
    return rows


def model_summary(model, image_size: int) -> dict:
    """Layer table with output shapes, parameter count and FLOPs for one (1, S, S, 3) uint8
    image. FLOPs come from `torch.utils.flop_counter.FlopCounterMode` (a multiply-add is
    2 FLOPs), i.e. the cost of scoring one image at the size the model was trained on."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    rows = _display_modules(model)
    shapes: dict[str, str] = {}
    hooks = []
    for name, module, _ in rows:
        def hook(_m, _inp, output, name=name):
            if isinstance(output, torch.Tensor):
                shapes[name] = "x".join(map(str, output.shape))
        hooks.append(module.register_forward_hook(hook))
    x = torch.zeros((1, image_size, image_size, 3), dtype=torch.uint8)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    per_module = counter.get_flop_counts()
    root = type(model).__name__
    table = []
    for name, module, depth in rows:
        flops = sum(per_module.get(f"{root}.{name}", {}).values())
        table.append({
            "name": "  " * depth + name, "type": type(module).__name__, "output": shapes.get(name, "-"),
            "params": sum(p.numel() for p in module.parameters()), "flops": flops,
        })
    return {
        "input": f"1x{image_size}x{image_size}x3 uint8",
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "flops": int(counter.get_total_flops()),
        "layers": table,
        "repr": repr(model),
    }


def format_summary(s: dict) -> str:
    """The layer table as fixed-width text (used in model_summary.txt and the report)."""
    w = max([len(r["name"]) for r in s["layers"]] + [5])
    t = max([len(r["type"]) for r in s["layers"]] + [4])
    o = max([len(r["output"]) for r in s["layers"]] + [6])
    lines = [f"{'layer':<{w}}  {'type':<{t}}  {'output':<{o}}  {'params':>10}  {'FLOPs':>10}"]
    for r in s["layers"]:
        lines.append(f"{r['name']:<{w}}  {r['type']:<{t}}  {r['output']:<{o}}  {r['params']:>10,}  "
                     f"{_si(r['flops']) if r['flops'] else '-':>10}")
    lines += [
        "",
        f"input       {s['input']}",
        f"parameters  {s['params']:,} ({s['trainable']:,} trainable)",
        f"FLOPs       {s['flops']} ({_si(s['flops'])}FLOPs per image; {_si(s['flops'] / 2)}MACs)",
    ]
    return "\n".join(lines)


def section_model(run: Run, out: Path) -> str:
    if run.model is None:
        return _note("no model.pt, so no model summary.")
    size = int(run.meta.get("image_size") or 224)
    s = model_summary(run.model, size)
    text = format_summary(s)
    (out / "model_summary.txt").write_text(
        f"arch {run.meta.get('arch')}   model_id {run.meta.get('model_id')}\n\n{text}\n\n{s['repr']}\n")
    return (f"Architecture `{run.meta.get('arch')}`, input {s['input']} (normalization is inside the model). "
            f"**{s['params']:,} parameters**, **{_si(s['flops'])}FLOPs** per image "
            f"(`FlopCounterMode`, multiply-add = 2 FLOPs). Full `print(model)` in "
            f"[model_summary.txt](model_summary.txt).\n\n```text\n{text}\n```")


# --------------------------------------------------------------------------- curves

def best_epoch_index(history: list[dict]) -> int:
    """Index of the epoch training kept: highest val accuracy, ties to lower val loss, then
    the earliest (the same rule as `train.py`, which only replaces on strict improvement)."""
    return max(range(len(history)), key=lambda i: (history[i].get("val_accuracy", -1.0),
                                                    -history[i].get("val_loss", math.inf), -i))


def plot_curves(history: list[dict], path: Path) -> Path:
    """Loss and accuracy per epoch, train vs val: over- or under-fitting shows as a gap, and
    the dashed line is the epoch whose weights became model.pt."""
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    best = best_epoch_index(history)
    fig = _new_figure(11, 4)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, key, title in ((ax_loss, "loss", "Loss (log scale)"), (ax_acc, "accuracy", "Accuracy")):
        for split, style in (("train", "-"), ("val", "-")):
            ys = [h.get(f"{split}_{key}", np.nan) for h in history]
            ax.plot(epochs, ys, style, marker="o", markersize=3, label=split)
        ax.axvline(epochs[best], color="grey", linestyle="--", linewidth=1)
        yb = history[best].get(f"val_{key}", np.nan)
        ax.plot([epochs[best]], [yb], marker="*", color="red", markersize=12, zorder=5,
                label=f"best epoch {epochs[best]} (val {yb:.3f})")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=9)
    losses = [h.get(k) for h in history for k in ("train_loss", "val_loss")]
    if all(v is not None and v > 0 for v in losses):
        ax_loss.set_yscale("log")  # epoch-1 val loss is often 10x the rest; log keeps both readable
    else:
        ax_loss.set_title("Loss")
    ax_acc.set_ylim(top=1.01)
    return _save(fig, path)


def section_curves(run: Run, out: Path) -> str:
    if not run.history:
        return _note("no usable history.json, so no training curves.")
    plot_curves(run.history, out / "curves.png")
    text = _img("curves.png", "training curves")
    train = (run.config or {}).get("train", {})
    if train.get("augment") or train.get("label_smoothing") or train.get("class_weights"):
        text += ("\n\nTrain loss and accuracy are running averages over each epoch's augmented batches "
                 "(with label smoothing and class weights when set), so they can sit above val loss / "
                 "below val accuracy without meaning anything is wrong.")
    return text


# --------------------------------------------------------------------------- confusion

def plot_confusion(matrix: list[list[int]], classes: list[str], path: Path) -> Path:
    """Counts and row-normalized % (= recall per true class): colour by % so a small class's
    errors are as visible as a large one's."""
    cm = np.asarray(matrix, dtype=np.int64)
    rows = cm.sum(1, keepdims=True)
    pct = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0) * 100
    n = len(classes)
    side = max(4.0, 1.1 * n + 1.5)
    fig = _new_figure(side + 1, side)
    ax = fig.subplots()
    im = ax.imshow(pct, cmap="Blues", vmin=0, vmax=100)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{cm[i, j]}\n{pct[i, j]:.1f}%", ha="center", va="center", fontsize=10,
                    color="white" if pct[i, j] > 55 else "black")
    ax.set_xticks(range(n), classes, rotation=30 if n > 5 else 0)
    ax.set_yticks(range(n), [f"{c} ({int(r)})" for c, r in zip(classes, rows[:, 0])])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (n)")
    ax.set_title(f"Confusion matrix, test split (n={int(cm.sum())})")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="% of true class")
    return _save(fig, path)


def section_metrics(run: Run, out: Path) -> str:
    """Per-class table and the confusion matrix (from metrics.json)."""
    m = run.metrics
    if not m:
        return _note("no metrics.json and no predictions, so no test metrics.")
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


# --------------------------------------------------------------------------- ROC

def _valid_predictions(preds: pd.DataFrame, classes: list[str]) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Decoded rows with a known label: (rows, true index, probabilities N x C)."""
    index = {class_key(c): i for i, c in enumerate(classes)}
    ok = preds["error"].isna() if "error" in preds else pd.Series(True, index=preds.index)
    rows = preds[ok]
    y = rows["label"].map(lambda s: index.get(class_key(str(s)), -1)).to_numpy()
    rows = rows[y >= 0]
    probs = rows[[f"prob_{c}" for c in classes]].to_numpy(np.float64)
    return rows, y[y >= 0], probs


def plot_roc(y: np.ndarray, probs: np.ndarray, classes: list[str], path: Path) -> Path:
    """One-vs-rest ROC per class, plus a zoom on the top-left corner: with AUCs near 1 the
    full plot shows only overlapping lines in the corner, the zoom shows the differences."""
    from sklearn.metrics import auc, roc_curve

    fig = _new_figure(11, 4.8)
    ax_full, ax_zoom = fig.subplots(1, 2)
    curves = []
    for i, c in enumerate(classes):
        binary = (y == i).astype(int)
        if not 0 < binary.sum() < len(binary):
            continue  # ROC needs both positives and negatives
        fpr, tpr, _ = roc_curve(binary, probs[:, i])
        curves.append((fpr, tpr))
        label = f"{c} (AUC {auc(fpr, tpr):.4f}, n={int(binary.sum())})"
        for ax in (ax_full, ax_zoom):
            ax.plot(fpr, tpr, drawstyle="steps-post", linewidth=1.6, label=label)
    ax_full.plot([0, 1], [0, 1], ":", color="grey", linewidth=1, label="chance")
    ax_full.set_xlim(0, 1)
    ax_full.set_ylim(0, 1.02)
    ax_full.set_title("ROC, one-vs-rest (test split)")
    ax_full.legend(fontsize=8, loc="lower right")
    # Zoom window: wide enough for every curve to reach TPR 1, tall enough to show each curve
    # from 5% of that width on (the first vertical rise at FPR ~0 is not interesting).
    x_hi = max([float(f[np.argmax(t >= 1.0)]) for f, t in curves] + [0.0])
    x_hi = min(1.0, max(0.02, 1.3 * x_hi))
    y_lo = min([float(t[f <= 0.05 * x_hi].max()) for f, t in curves] + [1.0])
    y_lo = max(0.0, min(0.9, math.floor((y_lo - 0.02) * 20) / 20))
    ax_zoom.set_xlim(-0.01 * x_hi, x_hi)
    ax_zoom.set_ylim(y_lo, 1.0 + 0.01 * (1 - y_lo))
    ax_zoom.set_title(f"Zoom: FPR <= {x_hi:.2g}, TPR >= {y_lo:.2f}")
    for ax in (ax_full, ax_zoom):
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.grid(True, alpha=0.3)
    return _save(fig, path)


def section_roc(run: Run, out: Path) -> str:
    if run.predictions is None:
        return _note("no predictions/test/*.parquet, so no ROC curves.")
    rows, y, probs = _valid_predictions(run.predictions, run.classes)
    if not len(y):
        return _note("the test predictions hold no decoded rows with a known label, so no ROC curves.")
    plot_roc(y, probs, run.classes, out / "roc.png")
    return _img("roc.png", "ROC curves")


# --------------------------------------------------------------------------- misclassified

def misclassified(preds: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Wrong test predictions, most confident first: confident mistakes are the ones worth a
    look (label noise, duplicates across classes, artefacts)."""
    rows, y, probs = _valid_predictions(preds, classes)
    pred = probs.argmax(1)
    wrong = rows[pred != y].copy()
    wrong["true"] = [classes[i] for i in y[pred != y]]
    wrong["pred"] = [classes[i] for i in pred[pred != y]]
    wrong["p"] = probs[pred != y].max(1)
    return wrong.sort_values(["p", "path"], ascending=[False, True])


def plot_misclassified(wrong: pd.DataFrame, path: Path, cols: int = 6) -> Path:
    """A gallery of wrong predictions titled 'true X / pred Y (p=...)'."""
    n = len(wrong)
    cols = min(cols, n)
    nrows = math.ceil(n / cols)
    fig = _new_figure(2.3 * cols, 2.5 * nrows + 0.4)
    axes = np.atleast_1d(fig.subplots(nrows, cols, squeeze=False)).ravel()
    for ax, row in zip(axes, wrong.itertuples(index=False)):
        title = textwrap.fill(f"true {row.true} / pred {row.pred} (p={row.p:.2f})", 26)
        _show_tile(ax, load_thumbnail(row.path), title, fontsize=8.5, color="darkred")
        ax.set_xlabel(Path(row.path).name, fontsize=7)
    for ax in axes[n:]:
        ax.axis("off")
    fig.suptitle(f"Misclassified test images (most confident first, {n} shown)", fontsize=12)
    return _save(fig, path)


def section_misclassified(run: Run, out: Path, limit: int) -> str:
    target = out / "misclassified.png"
    if run.predictions is None:
        return _note("no predictions/test/*.parquet, so no misclassified gallery.")
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


# --------------------------------------------------------------------------- header

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


def _split_counts(run: Run) -> str:
    if run.split is None:
        return _note("no split.csv: counts per split unknown.")
    classes = run.classes
    rows = []
    for s in SPLITS:
        part = run.split[run.split["split"] == s]
        counts = part["label"].astype(str).value_counts()
        rows.append([s] + [str(int(counts.get(c, 0))) for c in classes] + [f"**{len(part)}**"])
    total = run.split["label"].astype(str).value_counts()
    rows.append(["**all**"] + [str(int(total.get(c, 0))) for c in classes] + [f"**{len(run.split)}**"])
    return _md_table(["split"] + classes + ["total"], rows)


def header(run: Run) -> str:
    """The numbers someone asks for first, in one list; 'n/a' says which file was missing."""
    cfg, m, t, meta = run.config or {}, run.metrics or {}, run.timings, run.meta or {}
    data = cfg.get("data", {})
    benign = next((c for c in (m.get("per_class") or {}) if class_key(c) == BENIGN), None)
    benign_recall = _fmt(m["per_class"][benign]["recall"]) if benign else "n/a (no Benign class or no metrics)"
    best = (best_epoch_index(run.history) if run.history else None)
    best_txt = "n/a"
    if best is not None:
        h = run.history[best]
        best_txt = f"{h.get('epoch', best + 1)} (val accuracy {_fmt(h.get('val_accuracy'))}, val loss {_fmt(h.get('val_loss'))})"
    elif meta.get("best_epoch"):
        best_txt = f"{meta['best_epoch']} (from model.pt)"
    epochs = t.get("epochs_run") if t else None
    if epochs is None and run.history:
        epochs = len(run.history)
    max_epochs = cfg.get("train", {}).get("epochs")
    if t:
        train_time = (f"{_duration(t['fit_s'])} fit" if "fit_s" in t else "fit n/a") + (
            f", {_duration(t['total_s'])} total incl. split/ingest/evaluation" if "total_s" in t else "")
    else:
        train_time = "n/a (no timings.json)"
        if run.history and all("epoch_time_s" in h for h in run.history):
            train_time += f"; sum of epoch times {_duration(sum(h['epoch_time_s'] for h in run.history))}"
    data_path = f"`{data.get('data', 'n/a')}`"
    root = _data_root(run)
    if root and root != data.get("data"):
        data_path += f" (files under `{root}`)"
    model_id = meta.get("model_id", "n/a")
    if run.predictions is not None and "model_id" in run.predictions:
        scored = sorted(set(run.predictions["model_id"].dropna().astype(str)))
        if meta.get("model_id") and scored and scored != [meta["model_id"]]:
            run.notes.append(f"predictions/test were scored by model {', '.join(scored)}, not by model.pt "
                             f"({meta['model_id']}): re-run `leukray evaluate` before trusting the metrics")
    lines = [
        f"- **Run**: `{run.dir.resolve()}`",
        f"- **Model**: `{meta.get('arch', cfg.get('train', {}).get('arch', 'n/a'))}`, id `{model_id}`, "
        f"image size {meta.get('image_size', data.get('image_size', 'n/a'))}, classes {', '.join(run.classes) or 'n/a'}",
        f"- **Data**: {data_path}",
        f"- **Split policy**: {_split_policy(run)}",
        f"- **Test accuracy**: {_fmt(m.get('accuracy'))}   **macro-F1**: {_fmt(m.get('macro_f1'))}   "
        f"**Benign recall**: {benign_recall}",
        f"- **Epochs run**: {epochs if epochs is not None else 'n/a'}"
        + (f" of {max_epochs} max" if max_epochs else "") + f"   **Best epoch**: {best_txt}",
        f"- **Training time**: {train_time}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- report

def _guarded(title: str, build: Callable[[], str]) -> str:
    """One section's markdown; a malformed input file costs that section, not the report."""
    try:
        return build()
    except Exception as e:  # noqa: BLE001
        return _note(f"{title.lower()} could not be drawn ({type(e).__name__}: {e}).")


def write_report(
    run_dir: str | Path,
    output: str | Path | None = None,
    max_misclassified: int = 48,
    samples_per_class: int = 8,
    extra_sections: list[tuple[str, str]] | None = None,
) -> Path:
    """Write report.md and its PNGs into RUN_DIR/report (or `output`); returns report.md.

    `extra_sections` are (title, markdown) pairs appended at the end; markdown may link
    files that the caller wrote into the same folder (see `report_dir`). Figures from a
    previous report that cannot be drawn this time are deleted, so no stale PNG is left.
    """
    try:
        import matplotlib  # noqa: F401 - fail once, clearly, not as a note in every section
    except ImportError:
        raise ImportError("leukray report needs matplotlib: pip install 'leukray[report]'") from None
    run = load_run(run_dir)
    out = report_dir(run_dir, output)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("samples.png", "curves.png", "confusion.png", "roc.png", "misclassified.png", "model_summary.txt"):
        (out / stale).unlink(missing_ok=True)

    sections = [(title, _guarded(title, build)) for title, build in (
        ("Sample training images", lambda: section_samples(run, out, samples_per_class)),
        ("Model", lambda: section_model(run, out)),
        ("Training curves", lambda: section_curves(run, out)),
        ("Test metrics", lambda: section_metrics(run, out)),
        ("ROC curves", lambda: section_roc(run, out)),
        ("Misclassified test images", lambda: section_misclassified(run, out, max_misclassified)),
    )]
    sections += list(extra_sections or [])
    head = _guarded("Header", lambda: header(run))  # after the sections: it may add notes (model_id mismatch)
    parts = [f"# leukray run report: {run.dir.resolve().name}", "", head, "", "### Images per split", "",
             _split_counts(run)]
    if run.notes:
        parts += ["", "### Missing or inconsistent inputs", ""] + [f"- {n}" for n in run.notes]
    for title, body in sections:
        parts += ["", f"## {title}", "", body.rstrip()]
    path = out / "report.md"
    path.write_text("\n".join(parts) + "\n")
    return path
