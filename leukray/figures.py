"""The report's figures: matplotlib functions that take plain data and save one PNG.

They read no run directory and know no report format, so the Markdown report
(`leukray.report`) and any other writer (an HTML page embedding the same PNGs) draw the
same pictures from the same numbers.

Figures are drawn on `matplotlib.figure.Figure` objects rendered by the Agg canvas: no
pyplot global state, no display needed, nothing left open after a figure is saved.
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from leukray.data import read_bytes

THUMB_PX = 160  # longest side of an image shown in a gallery
DPI = 100


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


def plot_curves(history: list[dict], path: Path, best: int) -> Path:
    """Loss and accuracy per epoch, train vs val: over- or under-fitting shows as a gap, and
    the dashed line is epoch index `best`, the one whose weights became model.pt."""
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
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


def plot_reliability(reliability: dict, ece: dict, path: Path) -> Path:
    """Reliability diagram, before and after temperature scaling: per confidence bin, the
    accuracy against the mean confidence (on the diagonal = calibrated), marker area by the
    bin's share of images; the bins come from metrics.json (`calibration.reliability_bins`)."""
    fig = _new_figure(5.6, 5.2)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=1, label="perfectly calibrated")
    for key, style in (("before", "o--"), ("after", "s-")):
        bins = reliability[key]
        total = max(1, sum(bins["count"]))
        pts = [(c, a, n) for c, a, n in zip(bins["confidence"], bins["accuracy"], bins["count"]) if n]
        if not pts:
            continue
        conf, acc, n = (np.array(v, dtype=float) for v in zip(*pts))
        line = ax.plot(conf, acc, style, linewidth=1.2, markersize=3,
                       label=f"{key} temperature scaling (ECE {ece[key]:.4f})")[0]
        ax.scatter(conf, acc, s=600 * n / total, color=line.get_color(), alpha=0.35)
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("mean confidence in bin (top class)")
    ax.set_ylabel("accuracy in bin")
    ax.set_title("Reliability diagram, test split")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


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


def plot_probability_histogram(values: np.ndarray, path, bins: int = 50) -> None:
    """Histogram of malignant_probability over [0, 1], log counts when the bins differ by
    more than 100x (a scored archive is mostly near 0 or 1, and the middle is what needs a
    look). `path` may be a file-like object (the HTML report embeds the bytes)."""
    counts, edges = np.histogram(np.clip(values, 0.0, 1.0), bins=bins, range=(0.0, 1.0))
    fig = _new_figure(9, 3.4)
    ax = fig.subplots()
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4c78a8", edgecolor="white", linewidth=0.4)
    nonzero = counts[counts > 0]
    if len(nonzero) and nonzero.max() > 100 * nonzero.min():
        ax.set_yscale("log")
        ax.set_ylabel("images (log scale)")
    else:
        ax.set_ylabel("images")
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("malignant_probability = 1 - P(Benign)")
    ax.set_title(f"Malignant probability of {len(values):,} scored images")
    ax.grid(True, axis="y", alpha=0.3)
    _save(fig, path)
