"""A test set of images that are NOT blood smears, made offline.

What a lab's archive really contains besides smears: blank or black scans, sensor noise,
gradients, scanned text, thumbnails, strips cut off a slide, grayscale exports of smears and
ordinary photographs. The classifier must say "cannot assess" for all of them; this module
makes such a set reproducibly (one seed) without any download: the photographs are the
samples that scikit-image ships inside its wheel (skimage.data, no network fetch).

`generate` yields (name, kind, image) in memory for the tests; `write_nonsmears` writes the
files plus a manifest (kind per file) for the command line and benchmarks.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from leukray.synthetic import draw_smear

MANIFEST = "manifest.csv"
KINDS = ("blank_white", "blank_black", "noise", "gradient", "landscape", "text", "tiny",
         "strip", "grayscale", "photo", "photo_gray")
# Colour and grayscale photographs bundled in scikit-image's wheel (loaded from disk).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina",
          "immunohistochemistry", "colorwheel", "logo", "stereo_motorcycle")
GRAY_PHOTOS = ("camera", "coins", "moon", "page", "text", "clock")
# Lossless PNG where the exact pixels matter (blank, tiny, strips), JPEG elsewhere as in the wild.
_PNG_KINDS = frozenset({"blank_white", "blank_black", "gradient", "text", "tiny", "strip"})
_SIZES = ((224, 224), (640, 480), (480, 640), (1024, 768), (300, 300))
_TINY = (1, 2, 8, 16, 32)
_STRIPS = ((224, 32), (32, 224), (1000, 120), (120, 800), (600, 150))
_WORDS = ("specimen", "patient", "report", "leukocyte", "count", "normal", "the", "of", "and",
          "date", "sample", "result", "page", "laboratory", "signed", "reference", "range")


def _size(i: int) -> tuple[int, int]:
    return _SIZES[i % len(_SIZES)]


def _blank(rng, i, level: int) -> np.ndarray:
    """Uniform field; every other one with faint sensor noise, as a mis-scan has."""
    w, h = _size(i)
    img = np.full((h, w, 3), level, np.float32) + rng.normal(0, 3, 3)
    if i % 2:
        img += rng.normal(0, 2.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _noise(rng, i) -> np.ndarray:
    w, h = _size(i)
    if i % 2:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return np.clip(rng.normal(rng.uniform(60, 200, 3), rng.uniform(20, 60), (h, w, 3)), 0, 255).astype(np.uint8)


def _gradient(rng, i) -> np.ndarray:
    """Linear blend between two random colours along a random direction."""
    w, h = _size(i)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = xx * np.cos(angle) + yy * np.sin(angle)
    t = ((t - t.min()) / max(float(np.ptp(t)), 1.0))[..., None]
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    return (a * (1 - t) + b * t).astype(np.uint8)


def _landscape(rng, i) -> np.ndarray:
    """Blue sky over green grass, with a wavy horizon and some texture."""
    w, h = _size(i)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    horizon = h * rng.uniform(0.4, 0.65) + 10 * np.sin(xx / w * rng.uniform(2, 8))
    sky = np.array([90, 150, 235]) + (yy / h)[..., None] * np.array([80, 60, 10])
    grass = np.array([60, 140, 50]) + rng.normal(0, 18, (h, w, 3))
    img = np.where((yy < horizon)[..., None], sky, grass)
    return np.clip(img, 0, 255).astype(np.uint8)


def _text(rng, i) -> np.ndarray:
    """A page of random words in Pillow's default font, black on (off-)white paper."""
    w, h = _size(i)
    paper = tuple(int(v) for v in rng.integers(235, 256, 3))
    im = Image.new("RGB", (w, h), paper)
    draw = ImageDraw.Draw(im)
    for y in range(12, h - 16, 16):
        line = " ".join(rng.choice(_WORDS, size=int(rng.integers(4, 12))))
        draw.text((12, y), line, fill=(20, 20, 20))
    return np.asarray(im)


def _smear(rng, i, smears: Sequence[np.ndarray] | None) -> np.ndarray:
    if smears:
        return np.asarray(smears[i % len(smears)])[..., :3]
    return draw_smear(i % 4, rng, 224)


def _crop(img: np.ndarray, rng, w: int, h: int) -> np.ndarray:
    """A w x h crop of `img`, tiled first when `img` is smaller."""
    reps = (-(-h // img.shape[0]), -(-w // img.shape[1]), 1)
    big = np.tile(img, reps)
    y = int(rng.integers(0, big.shape[0] - h + 1))
    x = int(rng.integers(0, big.shape[1] - w + 1))
    return np.ascontiguousarray(big[y:y + h, x:x + w])


def _gray(img: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(img).convert("L").convert("RGB"))


def _photos(names: Sequence[str], gray: bool) -> Iterator[tuple[str, np.ndarray]]:
    """scikit-image's bundled samples as uint8 RGB (RGBA flattened on white, gray expanded)."""
    from skimage import data as skdata  # imported here: only this generator needs it

    for name in names:
        img = getattr(skdata, name)()
        img = img[0] if isinstance(img, tuple) else img  # stereo pairs: the left view
        img = np.asarray(img)
        if img.ndim == 3 and img.shape[2] == 4:
            alpha = img[..., 3:].astype(np.float32) / 255
            img = (img[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        yield name, (_gray(img) if gray else img).astype(np.uint8)


def generate(seed: int = 0, per_kind: int = 5, smears: Sequence[np.ndarray] | None = None,
             kinds: Sequence[str] = KINDS) -> Iterator[tuple[str, str, np.ndarray]]:
    """Yield (name, kind, uint8 HxWx3 image) for every kind in KINDS.

    `per_kind` images of each generated kind; the photo kinds give every bundled sample once.
    `smears` (real smear images) are the source of the grayscale copies, tiny crops and
    strips; without them, synthetic smears are drawn. `kinds` picks a subset of KINDS.
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown non-smear kinds {sorted(unknown)}; known: {KINDS}")
    rng = np.random.default_rng(seed)
    makers = {
        "blank_white": lambda i: _blank(rng, i, 250),
        "blank_black": lambda i: _blank(rng, i, 4),
        "noise": lambda i: _noise(rng, i),
        "gradient": lambda i: _gradient(rng, i),
        "landscape": lambda i: _landscape(rng, i),
        "text": lambda i: _text(rng, i),
        "tiny": lambda i: _crop(_smear(rng, i, smears), rng, _TINY[i % 5], _TINY[i % 5]),
        "strip": lambda i: _crop(_smear(rng, i, smears), rng, *_STRIPS[i % 5]),
        "grayscale": lambda i: _gray(_smear(rng, i, smears)),
    }
    for kind, make in makers.items():
        for i in range(per_kind if kind in kinds else 0):
            yield f"{kind}-{i:02d}", kind, make(i)
    for name, img in _photos(PHOTOS if "photo" in kinds else (), gray=False):
        yield f"photo-{name}", "photo", img
    for name, img in _photos(GRAY_PHOTOS if "photo_gray" in kinds else (), gray=True):
        yield f"photo_gray-{name}", "photo_gray", img


def write_nonsmears(folder: str | os.PathLike, seed: int = 0, per_kind: int = 5,
                    smears: Sequence[np.ndarray] | None = None) -> Path:
    """Write the set as PNG/JPEG files into `folder` plus MANIFEST (file, kind, width,
    height). Returns the manifest's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, kind, img in generate(seed, per_kind, smears):
        fname = f"{name}.png" if kind in _PNG_KINDS else f"{name}.jpg"
        Image.fromarray(img).save(folder / fname, **({} if fname.endswith(".png") else {"quality": 92}))
        rows.append({"file": fname, "kind": kind, "width": img.shape[1], "height": img.shape[0]})
    path = folder / MANIFEST
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "kind", "width", "height"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_manifest(folder: str | os.PathLike) -> list[dict]:
    """The rows of `folder`/MANIFEST, with the file's full path under "path"."""
    folder = Path(folder)
    with open(folder / MANIFEST, newline="") as f:
        return [{**row, "path": str(folder / row["file"])} for row in csv.DictReader(f)]


def rejection_table(kinds: Sequence[str], flagged: Sequence[bool]) -> list[dict]:
    """Per kind (and "all"): images, how many were flagged, and the share, for a report."""
    table = []
    for kind in list(dict.fromkeys(kinds)) + ["all"]:
        hits = [f for k, f in zip(kinds, flagged) if kind in ("all", k)]
        table.append({"kind": kind, "images": len(hits), "flagged": int(sum(hits)),
                      "share": sum(hits) / len(hits) if hits else 0.0})
    return table


def check(model: str, output: str, engine: str = "torch", seed: int = 0, per_kind: int = 5, log=print) -> dict:
    """The rejection table of a trained run, through the real `score` path.

    Writes the non-smear set (its grayscale copies, tiny crops and strips cut from the
    run's own test smears) into OUTPUT/nonsmears, scores it and the run's test split with
    `engine` into OUTPUT/scores-*, and returns {"table": per kind (and "all") the share
    not assessable, "test": share of the test smears assessable}.
    """
    import pandas as pd

    from leukray.config import ScoreConfig
    from leukray.data import decode, read_bytes
    from leukray.infer import score_paths
    from leukray.rundir import SPLIT_FILE, read_predictions

    out = Path(output)
    split = pd.read_csv(Path(model) / SPLIT_FILE)
    test = split[split["split"] == "test"]
    smears = [np.asarray(decode(read_bytes(p), 10_000)[0]) for p in test["path"].head(per_kind)]
    rows = read_manifest(write_nonsmears(out / "nonsmears", seed, per_kind, smears).parent)
    results = {}
    for name, items in (("nonsmears", [{"path": r["path"]} for r in rows]),
                        ("test", [{"path": p} for p in test["path"]])):
        dest = str(out / f"scores-{name}-{engine}")
        score_paths(items, ScoreConfig(model=model, output=dest, engine=engine, overwrite=True), log=log)
        results[name] = read_predictions(dest).set_index("path")
    verdict = results["nonsmears"]["assessable"]
    table = rejection_table([r["kind"] for r in rows], [not bool(verdict[r["path"]]) for r in rows])
    decoded = results["test"][results["test"]["error"].isna()]
    return {"table": table, "test": {"images": int(len(decoded)), "assessable": int(decoded["assessable"].sum()),
                                     "share": float(decoded["assessable"].mean())}, "engine": engine,
            "colour": colour_margins(model, results["nonsmears"], decoded)}


def colour_margins(model: str, nonsmears, test) -> dict | None:
    """How far the colour check's decisions lie from its threshold, as distance / threshold,
    among the images no model-free check flags: the nearest non-smear (only the colour check,
    or the network's OOD score, stands between it and a verdict) and the farthest test smear
    (above 1: rejected as a colour outlier). `nonsmears`/`test`: score tables indexed by
    path. The files are decoded again as scoring decodes them (the scores do not carry the
    distance). None for a model without a colour model."""
    from leukray import quality, trust
    from leukray.data import decode, read_bytes
    from leukray.modelfile import read_model_meta

    meta = read_model_meta(model)
    colour = trust.decode_checks(meta)
    if not isinstance(colour, dict):
        return None
    model_free = set(quality.FLAGS) - {quality.COLOUR_OUTLIER, quality.OUT_OF_DISTRIBUTION}

    def ratios(paths) -> dict[str, float]:
        images = (decode(read_bytes(p), int(meta["image_size"]))[0] for p in paths)
        return {p: quality.colour_distance(im, colour) / colour["threshold"] for p, im in zip(paths, images)}

    def model_free_pass(scores) -> list[str]:  # decoded, and no model-free flag
        decoded = scores[scores["error"].isna()]
        return [p for p, f in decoded["quality_flags"].items() if not set(str(f).split(";")) & model_free]

    only, smears = ratios(model_free_pass(nonsmears)), ratios(model_free_pass(test))
    near = min(only, key=only.get, default=None)
    far = max(smears, key=smears.get, default=None)
    return {"threshold": float(colour["threshold"]),
            "nearest_nonsmear": {"path": near, "ratio": only[near]} if near else None,
            "farthest_test_smear": {"path": far, "ratio": smears[far]} if far else None}


def format_check(result: dict) -> str:
    """The rejection table as the terminal (and the README) shows it."""
    lines = ["| kind | images | not assessable | share |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {t['kind']} | {t['images']} | {t['flagged']} | {t['share']:.1%} |" for t in result["table"]]
    t = result["test"]
    lines.append(f"test-split smears assessable ({result['engine']}): {t['assessable']}/{t['images']} "
                 f"({t['share']:.2%})")
    colour = result.get("colour")
    if colour:
        line = [f"colour distance / threshold ({colour['threshold']:.2f})"]
        for key, what in (("nearest_nonsmear", "nearest non-smear past the model-free checks"),
                          ("farthest_test_smear", "farthest test smear past them")):
            if colour[key]:
                line.append(f"{what}: {colour[key]['ratio']:.2f}x ({Path(colour[key]['path']).name})")
        lines.append("; ".join(line))
    return "\n".join(lines)


def _parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m leukray.nonsmears",
                                description="The offline non-smear set: write it, or score it and a run's test split.")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the set (image files and manifest.csv) into a folder")
    w.add_argument("output", help="folder to write into")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--per-kind", type=int, default=5, help="images of each generated kind")
    c = sub.add_parser("check", help="score the set and the run's test split; print the rejection table")
    c.add_argument("--model", required=True, help="run directory (local) written by `leukray train`")
    c.add_argument("--output", help="working folder (default: RUN_DIR/nonsmear-check)")
    c.add_argument("--engine", default="torch", choices=("torch", "onnx"))
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--per-kind", type=int, default=5, help="images of each generated kind")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m leukray.nonsmears write OUT_DIR` writes the set; `... check --model RUN_DIR`
    prints a run's rejection table. Subcommands, so that a stray `--help` or typo is an
    argparse message and never a folder of that name full of images."""
    args = _parser().parse_args(argv)
    if args.command == "write":
        print(write_nonsmears(args.output, seed=args.seed, per_kind=args.per_kind))
        return
    from leukray import stderrfilter

    stderrfilter.install_for_command()  # as the `leukray` command: Ray's one harmless C++ line out of stderr
    result = check(args.model, args.output or str(Path(args.model) / "nonsmear-check"), args.engine, args.seed,
                   args.per_kind)
    print(format_check(result))


if __name__ == "__main__":
    main()
