"""Grad-CAM heatmaps: which part of a smear drove a prediction.

Grad-CAM (Selvaraju et al., 2017) weights the feature maps of a convolution layer by the
mean gradient of the target class logit and keeps the positive part. We use the last
convolution of the network by default: its maps are the most class-specific that still
have a spatial layout. Works for every model of `leukray.model.create_model`, on the
uint8 NHWC input the models take, on CPU or GPU.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def find_target_layer(model: nn.Module) -> str:
    """Name of the last Conv2d in `model` (e.g. "net.layer4.1.conv2" for resnet18).

    Module registration order is execution order for all our architectures, so the last
    registered convolution is the last one applied; pass `layer=` to gradcam otherwise.
    """
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not names:
        raise ValueError("model has no Conv2d layer; pass layer= explicitly")
    return names[-1]


def gradcam(model: nn.Module, images: np.ndarray, target_class: int | Sequence[int] | None = None,
            layer: str | None = None) -> np.ndarray:
    """Grad-CAM heatmaps for uint8 images (N, H, W, 3) -> float32 (N, H, W) in [0, 1].

    `target_class`: None explains each image's predicted class; an int, the same class for
    all images; a sequence, one class per image. Each map is scaled by its own maximum
    (0 = no positive evidence; all zeros when the layer has none). The model is run in
    eval mode and left as it was found: no hooks, no .grad on parameters.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
    module = model.get_submodule(layer or find_target_layer(model))
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        # Cut the graph here and make the activation a leaf: the backward pass then stops at
        # this layer (cheaper, and works with frozen weights). Downstream gets a clone, so an
        # in-place op after the layer cannot modify the leaf.
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf.clone()

    modes = [(m, m.training) for m in model.modules()]
    handle = module.register_forward_hook(hook)
    try:
        model.eval()
        # Also works when the caller is inside torch.no_grad() or torch.inference_mode().
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.from_numpy(np.require(images, requirements=["C", "W"])).to(device)  # copies only read-only input
            logits = model(x).float()
            n = logits.shape[0]
            if target_class is None:
                target = logits.argmax(1)
            else:
                target = torch.as_tensor(target_class, device=device).long().expand(n)
            score = logits[torch.arange(n, device=device), target].sum()
            (act,) = captured
            (grad,) = torch.autograd.grad(score, act)
    finally:
        handle.remove()
        for m, training in modes:
            m.training = training
    act, grad = act.detach().float(), grad.float()
    weights = grad.mean((2, 3), keepdim=True)  # one weight per channel per image
    cam = F.relu((weights * act).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[1:3], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(1).values.clamp_min(1e-12).view(-1, 1, 1)
    return (cam / peak).clamp_(0, 1).cpu().numpy().astype(np.float32)


def _colormap(values: np.ndarray, cmap: str) -> np.ndarray:
    """float [0, 1] (H, W) -> RGB float [0, 1] (H, W, 3)."""
    try:
        import matplotlib

        return matplotlib.colormaps[cmap](values)[..., :3]
    except ImportError:
        # Matplotlib's "jet" in three lines: blue -> cyan -> yellow -> red.
        v = values[..., None]
        centres = np.array([0.75, 0.5, 0.25])  # r, g, b
        return np.clip(1.5 - np.abs(4 * (v - centres)), 0, 1)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """Blend a colored heatmap (H, W) in [0, 1] over a uint8 image (H, W, 3) -> uint8 (H, W, 3).

    A heatmap of another size (e.g. a model-size map over the original file) is resized.
    """
    image = np.asarray(image, dtype=np.uint8)
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.shape != image.shape[:2]:
        from PIL import Image

        heat = np.asarray(Image.fromarray(heat).resize(image.shape[1::-1], Image.BILINEAR))
    colors = _colormap(np.clip(np.nan_to_num(heat), 0, 1), cmap) * 255
    return np.round((1 - alpha) * image + alpha * colors).clip(0, 255).astype(np.uint8)


def save_overlay(path: str | os.PathLike, image: np.ndarray, heatmap: np.ndarray, title: str | None = None) -> None:
    """Write a PNG: the image and its overlay side by side (the cell stays visible without
    color), with `title` (e.g. "Pro 0.93") in a strip above when given."""
    from PIL import Image, ImageDraw

    image = np.asarray(image, dtype=np.uint8)
    panel = np.concatenate([image, overlay(image, heatmap)], axis=1)
    if title:
        strip = Image.new("RGB", (panel.shape[1], 16), "white")
        ImageDraw.Draw(strip).text((3, 2), title, fill="black")
        panel = np.concatenate([np.asarray(strip), panel], axis=0)
    Image.fromarray(panel).save(path, format="PNG")


def explain_files(model_path: str | os.PathLike, paths: list[str], output: str | os.PathLike,
                  target: str | None = None, names: list[str] | None = None, batch: int = 32) -> list[str]:
    """Grad-CAM overlays for image files -> OUTPUT/<name>.png, titled "<class> <probability>".

    Uses the shared preprocessing, so the heatmap explains exactly the input the model
    scored. Files that fail to decode are skipped (scoring reports them)."""
    from pathlib import Path

    from leukray.data import ImageError, preprocess, read_bytes
    from leukray.model import load_model
    from leukray.model import probabilities

    model, meta = load_model(model_path)
    classes = list(meta["classes"])
    target_index = None
    if target is not None:
        lower = [c.casefold() for c in classes]
        if target.casefold() not in lower:
            raise ValueError(f"--target {target!r} is not one of the model's classes {classes}")
        target_index = lower.index(target.casefold())
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    names = names or [Path(p).stem for p in paths]
    written: list[str] = []
    for start in range(0, len(paths), batch):
        chunk, chunk_names, images = [], [], []
        for p, name in zip(paths[start:start + batch], names[start:start + batch]):
            try:
                images.append(preprocess(read_bytes(p), meta["image_size"])[0])
            except (ImageError, OSError):
                continue
            chunk.append(p)
            chunk_names.append(name)
        if not images:
            continue
        x = np.stack(images)
        with torch.no_grad():
            probs = probabilities(model(torch.from_numpy(x))).numpy()
        cls = probs.argmax(1) if target_index is None else np.full(len(x), target_index)
        cams = gradcam(model, x, [int(c) for c in cls])
        for img, cam, c, pr, name in zip(x, cams, cls, probs, chunk_names):
            path = out / f"{name}.png"
            save_overlay(path, img, cam, title=f"{classes[c]} {pr[c]:.2f}")
            written.append(str(path))
    return written


def gradcam_section(run_dir: str | os.PathLike, report_folder: str | os.PathLike,
                    per_class: int = 4) -> tuple[str, str] | None:
    """Grad-CAM overlays for the report: `per_class` test images of each class and every
    misclassified one. Returns a (title, markdown) report section, or None without data."""
    from pathlib import Path

    import pandas as pd

    from leukray.rundir import TEST_PREDICTIONS_DIR

    run_dir, report_folder = Path(run_dir), Path(report_folder)
    pred_dir = run_dir / TEST_PREDICTIONS_DIR
    if not pred_dir.is_dir():
        return None
    df = pd.read_parquet(pred_dir)
    df = df[df["error"].isna()].sort_values("path")
    if df.empty:
        return None
    wrong = df[df["predicted_label"] != df["label"]]
    sample = df.groupby("label", group_keys=False).head(per_class)
    rows = pd.concat([sample.assign(kind="sample"), wrong.assign(kind="misclassified")])
    names = [f"{k}-{lab}-{Path(p).stem}" for k, lab, p in zip(rows["kind"], rows["label"], rows["path"])]
    written = explain_files(run_dir, rows["path"].tolist(), report_folder / "gradcam", names=names)
    lines = ["Heatmaps of the last convolution's evidence for the predicted class (Grad-CAM); left the "
             "model input, right the overlay. Title: predicted class and probability.", ""]
    for kind, title in (("sample", "Test images per class"), ("misclassified", "Every misclassified test image")):
        shown = [w for w in written if Path(w).name.startswith(kind + "-")]
        lines.append(f"**{title}** ({len(shown)})")
        lines.append("")
        lines += [f"![{Path(w).stem}](gradcam/{Path(w).name})" for w in shown] or ["none"]
        lines.append("")
    return "Grad-CAM explanations", "\n".join(lines)
