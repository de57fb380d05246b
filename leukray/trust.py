"""Trust: what the end of training learns so that `score` can say how far to believe a row.

A bare classifier answers one of its classes for anything and reports a raw softmax as
its confidence. At the end of `train` (on the best model) this module fits, on data the
weights never trained on where it matters:
- the temperature T (`leukray.calibration`) on the validation logits, so that every
  probability leukray reports is calibrated;
- the colour model (`leukray.quality`) on up to COLOUR_IMAGES training images, decoded
  as scoring decodes them, its threshold cross-fitted over the split's groups (slides);
- the OOD threshold: the energy of the calibrated logits that OOD_KEEP of smears passing
  the quality checks stay under, with OOD_CONFIDENCE, bounded from the validation split;
- the review threshold: the calibrated confidence below which an assessable row is
  referred to an expert (REVIEW_CONFIDENCE; `score --review-threshold` overrides it).
All of it is one plain dict (floats, lists, strings) stored as `meta["trust"]` in the
model file (read with `torch.load(weights_only=True)`) and copied into exports.

At scoring time `verdicts` turns a batch's calibrated logits and quality flags into the
columns `assessable`, `quality_flags`, `ood_score` and `needs_review`. Model files
without `trust` (trained before it existed) score as before: every decoded row is
assessable, nothing is flagged (`missing_warning` says so once).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from leukray import calibration, quality

TRUST_VERSION = 1
# The OOD threshold keeps this share of clean smears (those that pass the quality checks)
# not seen in training, with OOD_CONFIDENCE (a bound on the validation split, see
# quality.choose_threshold). 0.99 rather than the 0.98 target: the quality checks take their
# own share (blank or black files, a rare slide beyond every training group's colours), and
# the rejections add up on new smears. Until session 6 it was the plain 99th percentile of the
# validation energies; on a CV fold that kept 96 % of its test smears (README, "Predictions a
# lab can trust"): a quantile of ~440 scores is a coin flip around the target.
OOD_KEEP = 0.99
OOD_CONFIDENCE = 0.95
# Calibrated confidence below which an assessable row `needs_review`: a 1 in 10 chance of
# being wrong is too much for triage without a second look.
REVIEW_CONFIDENCE = 0.9
# Training images the colour model is fitted on (a deterministic sample when there are more):
# its threshold needs many slides, since a high share of new slides is what it bounds (see
# leukray.quality); each image costs one decode and the statistics, ~1.5 ms on one core.
COLOUR_IMAGES = 4000
BATCH = 128


def fit(model, run_dir: str | Path, classes: list[str], image_size: int, seed: int = 0) -> dict:
    """The trust dict of `model` for the run in `run_dir` (its split.csv): colour model on
    training images, temperature and thresholds on the validation split."""
    from leukray.rundir import SPLIT_FILE

    split = pd.read_csv(Path(run_dir) / SPLIT_FILE)
    train = split[split["split"] == "train"]
    train = train.sample(n=min(COLOUR_IMAGES, len(train)), random_state=seed)
    colour_model = colour_model_of(train["path"], image_size, train["group"] if "group" in train else None)
    val = split[split["split"] == "val"]
    index = {c: i for i, c in enumerate(classes)}
    images, labels, clean = [], [], []
    for path, label in zip(val["path"], val["label"]):
        row = _preprocessed(path, image_size, colour_model if colour_model is not None else True)
        if row is not None and label in index:
            images.append(row[0])
            labels.append(index[label])
            clean.append(not row[1])
    if not images:
        raise ValueError("no readable validation images to calibrate the model on")
    logits = network_logits(model, np.stack(images))
    return fit_arrays(logits, np.array(labels), np.array(clean, bool), colour_model)


def colour_model_of(paths, size: int, groups=None) -> dict | None:
    """The colour model of the image files `paths` (with their groups, if known), decoded as
    scoring decodes them, one at a time, and fitted on those that pass the model-free checks;
    None, with a warning, when too few do (unreadable files are skipped)."""
    feats, kept = [], []
    for path, group in zip(paths, range(len(paths)) if groups is None else groups, strict=True):
        decoded = _decoded(path, size)
        row = None if decoded is None else quality.clean_features(decoded[0], *decoded[1])
        if row is not None:
            feats.append(row)
            kept.append(group)
    try:
        return quality.colour_model_from_features(np.stack(feats) if feats else np.empty((0, len(quality.FEATURES))),
                                                  kept)
    except quality.TooFewImages as e:  # e.g. a tiny dataset, or one group holding nearly all images
        print(f"[leukray] warning: no colour check for this model ({len(feats)} clean images of {len(paths)}): {e}",
              flush=True)
        return None


def _decoded(path: str, size: int) -> tuple[Image.Image, tuple[int, int]] | None:
    """The decoded (not resized) image and the file's own (width, height), or None. A PIL
    image, as scoring hands it to the checks (`leukray.quality` reads Pillow's histogram)."""
    from leukray.data import ImageError, decode, read_bytes

    try:
        image, info = decode(read_bytes(path), size)
    except (ImageError, OSError):
        return None
    return image, (info["width"], info["height"])


def _preprocessed(path: str, size: int, checks) -> tuple[np.ndarray, list[str]] | None:
    from leukray.data import ImageError, preprocess, read_bytes

    try:
        image, info = preprocess(read_bytes(path), size, checks)
    except (ImageError, OSError):
        return None
    return image, info["quality_flags"]


def network_logits(model, images: np.ndarray) -> np.ndarray:
    """Raw logits (float64) of uint8 NHWC `images`, in batches, on the model's device."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), BATCH):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + BATCH])).to(device)
            out.append(model(x).float().cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def fit_arrays(logits, labels, clean, colour_model: dict | None, keep: float = OOD_KEEP,
               review: float = REVIEW_CONFIDENCE, confidence: float = OOD_CONFIDENCE) -> dict:
    """The trust dict from validation logits/labels and which rows passed the quality checks."""
    logits = np.asarray(logits, dtype=np.float64)
    clean = np.asarray(clean, dtype=bool)
    t = calibration.fit_temperature(logits, labels)
    energy = quality.energy_score(calibration.apply_temperature(logits, t))
    threshold = quality.choose_threshold(energy[clean], keep, confidence) if clean.any() else None
    achieved = (quality.threshold_confidence(int(clean.sum()), int((energy[clean] <= threshold).sum()), keep)
                if threshold is not None else None)
    probs = calibration.probabilities(logits, t)
    assessable = clean & (energy <= threshold) if threshold is not None else clean
    return {
        "version": TRUST_VERSION, "temperature": float(t), "colour_model": colour_model,
        "ood_score": "energy", "ood_threshold": threshold, "ood_keep": float(keep),
        "ood_confidence": float(confidence), "ood_confidence_achieved": achieved,
        "review_threshold": float(review),
        "validation": {
            "images": int(len(clean)), "pass_quality_checks": int(clean.sum()),
            "assessable_share": float(assessable.mean()),
            "needs_review_share": float((assessable & (probs.max(1) < review)).mean()),
            "ece_before": calibration.expected_calibration_error(calibration.probabilities(logits), labels),
            "ece_after": calibration.expected_calibration_error(probs, labels),
        },
    }


# --------------------------------------------------------------------------- scoring side

def of(meta: dict) -> dict | None:
    """The model's trust dict, None for model files from before it (or of another version)."""
    trust = meta.get("trust")
    return trust if isinstance(trust, dict) and trust.get("version") == TRUST_VERSION else None


def temperature(meta: dict) -> float:
    """T to divide the logits by (1.0 without trust: probabilities as before)."""
    trust = of(meta)
    return float(trust["temperature"]) if trust else 1.0


def decode_checks(meta: dict) -> bool | dict:
    """The `quality` argument of `data.preprocess_batch` for this model: its colour model,
    True (model-free checks only) or False (no trust: no checks)."""
    trust = of(meta)
    if trust is None:
        return False
    return trust["colour_model"] if trust.get("colour_model") else True


def confidence_warning(trust: dict) -> str | None:
    """The line(s) `train` prints when a split was too small for a bound's confidence: the
    validation split for the OOD threshold (fewer than ~300 clean smears for 99 % at 95 %),
    the training split for the colour threshold (fewer than ~1,500 clean images for 99.8 %);
    the threshold is then the largest score seen, and new smears are kept with less certainty."""
    lines = []
    achieved, asked = trust.get("ood_confidence_achieved"), trust.get("ood_confidence")
    if achieved is not None and asked is not None and achieved < asked:
        n = trust["validation"]["pass_quality_checks"]
        lines.append(f"[leukray] warning: {n} clean validation smears are too few to keep {trust['ood_keep']:.0%} of "
                     f"new smears with {asked:.0%} confidence; the OOD threshold does so with {achieved:.0%} (a larger "
                     "validation split, --val-fraction, tightens it)")
    colour = trust.get("colour_model") or {}
    achieved, asked = colour.get("confidence_achieved"), colour.get("confidence")
    if achieved is not None and asked is not None and achieved < asked:
        lines.append(f"[leukray] warning: {colour['n_images']} clean training images are too few to keep "
                     f"{colour['keep']:.1%} of new smears inside the colour model with {asked:.0%} confidence; its "
                     f"threshold does so with {achieved:.0%}")
    return "\n".join(lines) or None


def missing_warning(meta: dict) -> str | None:
    """The one line `score` prints for a model without trust metadata."""
    if of(meta) is not None:
        return None
    return (f"[leukray] warning: model {meta.get('model_id')} has no calibration or quality metadata (trained by an "
            "older leukray): probabilities are uncalibrated and every decoded image counts as assessable; "
            "`leukray refit --model RUN_DIR` adds them to a local run")


def verdicts(probs: np.ndarray, logits: np.ndarray, ok: np.ndarray, flags, meta: dict,
             review_threshold: float | None = None) -> dict[str, np.ndarray]:
    """Per row: assessable, quality_flags (`;`-joined or None), ood_score, needs_review.

    `probs`/`logits` are calibrated (NaN rows where `ok` is False: failed decodes, which are
    never assessable); `flags` the decode stage's `quality_flags` column (None: no checks).
    """
    n = len(ok)
    trust = of(meta)
    ood = np.full(n, np.nan, np.float32)
    if trust is None:
        return {"assessable": ok.copy(), "quality_flags": np.full(n, None, dtype=object), "ood_score": ood,
                "needs_review": np.zeros(n, bool)}
    ood[ok] = quality.energy_score(logits[ok])
    names = [f.split(";") if ok[i] and isinstance(f, str) else []
             for i, f in enumerate(flags if flags is not None else [None] * n)]
    threshold = trust.get("ood_threshold")
    for i in np.flatnonzero(ok & (ood > threshold)) if threshold is not None else ():
        names[i].append(quality.OUT_OF_DISTRIBUTION)
    assessable = ok & np.array([not f for f in names], bool)
    review = trust["review_threshold"] if review_threshold is None else review_threshold
    confidence = np.nan_to_num(probs, nan=0.0).max(1, initial=0.0)
    return {"assessable": assessable, "quality_flags": np.array([";".join(f) or None for f in names], dtype=object),
            "ood_score": ood, "needs_review": assessable & (confidence < review)}


def refit(run_dir: str | Path, seed: int = 0) -> dict:
    """Fit trust for the model of an existing local run (e.g. one trained before trust
    existed) and store it in its model file; the weights and model_id stay the same. Its
    export, metrics.json and model card then describe the old metadata: `leukray refit`
    redoes them too (`train.finish_run`)."""
    from leukray.model import load_model, save_model
    from leukray.modelfile import MODEL_FILENAME

    run_dir = Path(run_dir)
    model, meta = load_model(run_dir)
    meta = {k: v for k, v in meta.items() if k not in ("format", "model_id", "leukray_version", "saved_at")}
    meta["trust"] = fit(model, run_dir, meta["classes"], int(meta["image_size"]), seed)
    return save_model(run_dir / MODEL_FILENAME, model, meta)
