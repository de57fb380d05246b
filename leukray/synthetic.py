"""Synthetic smear-like images for the demo and the tests (no real images ship with leukray).

Each image is a pale pink field of red blood cells with one white blood cell in the
middle. The four classes differ the way the real subtypes roughly do to the eye: cell
size, how much of the cell the nucleus fills, nucleus shape (round, indented, lobed) and
stain colour, with random jitter, so a small CNN can learn them in a few epochs but not
from a single pixel.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

CLASSES = ("Benign", "Early", "Pre", "Pro")

# Per class: cell radius (fraction of the image), nucleus/cell radius ratio, nucleus
# shape ("round", "indented", "lobed"), nucleus RGB, cytoplasm RGB.
_STYLES = {
    0: (0.14, 0.80, "round", (70, 30, 110), (175, 165, 215)),
    1: (0.20, 0.70, "round", (120, 70, 160), (160, 175, 225)),
    2: (0.25, 0.62, "indented", (95, 60, 170), (150, 190, 230)),
    3: (0.30, 0.58, "lobed", (150, 50, 140), (200, 170, 220)),
}


def draw_smear(label: int, rng: np.random.Generator, size: int = 224) -> np.ndarray:
    """Draw one RGB uint8 image of class `label` (0..3; larger labels reuse styles)."""
    radius, ratio, shape, nuc_rgb, cyto_rgb = _STYLES[label % len(_STYLES)]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.empty((size, size, 3), np.float32)
    img[:] = np.array([235, 205, 210]) + rng.normal(0, 6, 3)

    # Red blood cells: pale discs with a lighter centre, scattered around.
    for _ in range(rng.integers(8, 16)):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.06, 0.09)
        d = np.hypot(yy - cy, xx - cx) / r
        rbc = np.clip(1.0 - d, 0, 1) ** 0.3 * (0.6 + 0.4 * np.clip(d, 0, 1))
        img = img * (1 - rbc[..., None]) + np.array([215, 120, 130]) * rbc[..., None]

    # The white blood cell: cytoplasm disc, then the nucleus.
    cy, cx = 0.5 + rng.normal(0, 0.03, 2)
    r = radius * rng.uniform(0.9, 1.1)
    angle = np.arctan2(yy - cy, xx - cx)
    dist = np.hypot(yy - cy, xx - cx)
    wobble = 1 + 0.04 * np.sin(angle * rng.integers(3, 6) + rng.uniform(0, 6.3))
    cyto = np.clip((r * wobble - dist) / 0.01, 0, 1)
    img = img * (1 - cyto[..., None]) + (np.array(cyto_rgb) + rng.normal(0, 8, 3)) * cyto[..., None]

    rn = r * ratio
    if shape == "round":
        edge = rn * (1 + 0.05 * np.sin(angle * 2 + rng.uniform(0, 6.3)))
    elif shape == "indented":  # kidney: a notch on one side
        notch = rng.uniform(0, 2 * np.pi)
        edge = rn * (1 - 0.35 * np.exp(-((np.angle(np.exp(1j * (angle - notch)))) ** 2) / 0.25))
    else:  # lobed
        edge = rn * (0.8 + 0.25 * np.cos(angle * rng.integers(3, 5) + rng.uniform(0, 6.3)))
    nucleus = np.clip((edge - dist) / 0.008, 0, 1)
    texture = rng.normal(0, 12, (size, size, 1))
    nuc = np.array(nuc_rgb) + rng.normal(0, 10, 3) + texture
    img = img * (1 - nucleus[..., None]) + nuc * nucleus[..., None]

    img += rng.normal(0, 4, img.shape)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return np.asarray(out.filter(ImageFilter.GaussianBlur(radius=size / 300)))


def check_synth_args(per_class: int, size: int) -> None:
    """ValueError unless the set would hold images a model can be trained on."""
    if per_class < 1 or size < 16:
        raise ValueError(f"--per-class must be at least 1 and --size at least 16, got {per_class} and {size}")


def make_dataset(
    root: str | os.PathLike,
    per_class: int = 40,
    size: int = 224,
    seed: int = 0,
    classes: tuple[str, ...] = CLASSES,
) -> Path:
    """Write `per_class` JPEGs per class under `root/<class>/WBC-<class>-NNN.jpg`.

    File numbers run 001..N per class like the public dataset, so the grouped
    (leakage-aware) split has numbers to group by. Existing files are overwritten.
    """
    check_synth_args(per_class, size)
    root = Path(root)
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(1, per_class + 1):
            arr = draw_smear(label, rng, size)
            Image.fromarray(arr).save(folder / f"WBC-{name}-{i:03d}.jpg", quality=90)
    return root
