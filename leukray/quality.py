"""Can this image be assessed at all? Model-free checks, a learnt colour model, an OOD score.

A classifier trained on four kinds of blood smear answers one of those four for anything it
is shown: a blank scan, a 1-pixel file, a photo of a cat. These checks run on the decoded
image before (or without) the network and say, with named flags, why a row should not get a
verdict. They are read off histograms of the decoded image (Pillow counts, NumPy reads the
counts), so they cost little next to decoding, and they need no model except the colour
model, which is a handful of numbers learnt from the training images and stored with the
network.

The colour model is a plain dict of floats and lists (no NumPy, no pickled objects) because
it goes into the model file, which is read with torch.load(weights_only=True).

`energy_score`/`choose_threshold` are the network side: an out-of-distribution score on
(calibrated) logits and a threshold set on validation smears so that a chosen share of real
smears stays assessable, with a stated confidence for smears not seen yet.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image

# Flag names: what a row's `quality_flags` can contain, in this order.
TOO_SMALL = "too_small"
EXTREME_ASPECT = "extreme_aspect"
UNIFORM = "uniform"
GRAYSCALE = "grayscale"
COLOUR_OUTLIER = "colour_outlier"
# The network's own verdict (energy above the model's threshold), added by the predictor
# after the model-free checks: it needs the logits.
OUT_OF_DISTRIBUTION = "out_of_distribution"
FLAGS = (TOO_SMALL, EXTREME_ASPECT, UNIFORM, GRAYSCALE, COLOUR_OUTLIER, OUT_OF_DISTRIBUTION)

# A side shorter than this cannot show a white blood cell's nucleus in any detail.
MIN_SIDE = 64
# Microscope cameras give 1:1 to 16:9 (1.78); a 3:1 image is a strip, a banner or a scan edge.
MAX_ASPECT = 3.0
# Statistics are taken on a copy subsampled (every k-th pixel, no smoothing, so noise keeps
# its strength) to at most this side: cost is bounded and the result barely depends on size.
WORK_SIDE = 256
# A pixel "differs" when some channel is this many levels (of 255) away from the reference:
# well above sensor noise and JPEG ringing, well below the contrast of a stained cell.
LEVEL_TOLERANCE = 24
# Near-uniform: fewer than this share of pixels differ from the median colour. Grayscale:
# fewer than this share of pixels have any chroma (max - min channel > LEVEL_TOLERANCE).
# Real smears have >= 17 % (Original) differing; a few segmented images that are black
# but for a handful of pixels fall below this too, and cannot be assessed either.
MIN_CONTENT_SHARE = 0.0005

# Colour model: per-image statistics and a shrunk Gaussian over the clean training images. The
# threshold is an order statistic (`choose_threshold`) of *cross-fitted* distances: each image's
# distance from a model fitted without its group (COLOUR_FOLDS folds of groups; the split's
# groups, runs of neighbouring file numbers, stand in for slides). New smears come from new
# slides, and stain colour varies between slides far more than within one; a quantile of
# in-sample distances (the rule until session 7) cannot see that, and whole test slides fell
# outside it. COLOUR_KEEP is high because this check is for images that are not smears, which
# lie well beyond any slide; the share of smears a lab may lose belongs to the network's OOD
# check. The bound counts images, and images of one group move together: with the ~100 groups
# of a training split here the threshold is the largest cross-fitted distance, in effect "no
# farther than the farthest held-out group" (README, "Predictions a lab can trust").
COLOUR_MODEL_VERSION = 1
FEATURES = ("mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b", "chroma_mean", "chroma_p99")
COLOUR_KEEP = 0.998
COLOUR_CONFIDENCE = 0.95
COLOUR_FOLDS = 20


class _Hist:
    """Histogram of integer levels in [0, 255] (a plane or the chroma): median, percentile,
    mean and spread exactly as NumPy gives them, from 256 counts instead of repeated passes
    and partitions over every pixel."""

    LEVELS = np.arange(256, dtype=np.float64)

    def __init__(self, counts: np.ndarray):
        self.counts = counts
        self.cum = np.cumsum(counts)
        self.n = int(self.cum[-1])

    def sorted_at(self, positions: list[int]) -> np.ndarray:
        """`np.sort(values)[positions]`."""
        return np.searchsorted(self.cum, np.asarray(positions), side="right").astype(np.float64)

    def median(self) -> float:
        return float(self.sorted_at([(self.n - 1) // 2, self.n // 2]).mean())

    def percentile(self, q: float) -> float:
        """np.percentile's default (linear) interpolation."""
        pos = (self.n - 1) * q / 100
        lo = int(np.floor(pos))
        a, b = self.sorted_at([lo, min(lo + 1, self.n - 1)])
        return float(a + (b - a) * (pos - lo))

    def mean(self) -> float:
        return float(self.counts @ self.LEVELS / self.n)

    def std(self) -> float:
        return float(np.sqrt(self.counts @ (self.LEVELS - self.mean()) ** 2 / self.n))

    def share_above(self, level: int) -> float:
        return float(self.n - self.cum[level]) / self.n

    def outside(self, lo: int, hi: int) -> int:
        """How many values are < lo or > hi (lo <= 256, hi >= 0)."""
        below = int(self.cum[lo - 1]) if lo >= 1 else 0
        return below + (self.n - int(self.cum[hi]) if hi <= 255 else 0)


def _work_image(image: np.ndarray | Image.Image) -> Image.Image:
    """`image` (a PIL image or a uint8 HxW, HxWx3 or HxWx4 array) as an RGB PIL image,
    subsampled by an integer stride to <= WORK_SIDE a side. A decoded RGB image that small
    (every smear here) is used as it is: converting it to NumPy alone cost ~0.15 ms a file."""
    if isinstance(image, Image.Image) and image.mode == "RGB" and max(image.size) <= WORK_SIDE:
        return image
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected 8-bit levels (uint8), got {arr.dtype}")
    step = max(1, -(-max(arr.shape[:2]) // WORK_SIDE))
    sub = arr[::step, ::step]
    sub = np.repeat(sub, 3, axis=2) if sub.shape[2] == 1 else sub[..., :3]
    return Image.fromarray(np.ascontiguousarray(sub))


def _statistics(im: Image.Image) -> tuple[list[_Hist], _Hist, list[np.ndarray]]:
    """Histograms of the R, G, B planes and of the chroma (per pixel max - min channel: 0 for
    grays, large for stained pixels) of a work image, and its planes (uint8).

    Pillow counts the channel levels (one pass over the interleaved pixels, ~4x faster here
    than NumPy's bincount over three strided planes); the chroma is elementwise NumPy over
    contiguous planes (NumPy reduces over a last axis of length 3 one pixel at a time).
    """
    counts = np.array(im.histogram(), dtype=np.int64).reshape(3, 256)
    planes = [np.asarray(band) for band in im.split()]
    chroma = np.maximum(np.maximum(planes[0], planes[1]), planes[2])
    chroma -= np.minimum(np.minimum(planes[0], planes[1]), planes[2])  # uint8: max >= min
    return [_Hist(c) for c in counts], _Hist(np.array(Image.fromarray(chroma).histogram(), np.int64)), planes


def _features(planes: list[_Hist], chroma: _Hist) -> np.ndarray:
    return np.array([*(p.mean() for p in planes), *(p.std() for p in planes), chroma.mean(), chroma.percentile(99)])


def image_features(image: np.ndarray | Image.Image) -> np.ndarray:
    """The per-image colour statistics named in FEATURES (float64 vector).

    Channel means and spreads capture the stain (violet nuclei, pink/blue-white background,
    or black background for segmented images); chroma separates stained from gray or washed
    out; its 99th percentile catches the few strongly stained pixels of sparse images.
    """
    hists, chroma, _ = _statistics(_work_image(image))
    return _features(hists, chroma)


class TooFewImages(ValueError):
    """The images cannot fit a colour model: too few of them, or too few outside a held-out fold."""


def fit_colour_model(images: Iterable[np.ndarray], groups=None, keep: float = COLOUR_KEEP,
                     confidence: float = COLOUR_CONFIDENCE, folds: int = COLOUR_FOLDS) -> dict:
    """Learn where training images lie in FEATURES space. Returns plain types only.

    `groups` (one id per image, e.g. the split's groups, which stand in for slides; default:
    every image its own) decides what "new" means for the threshold: it keeps `keep` of images
    from *new groups* with `confidence` (see `cross_fitted_distances`, `choose_threshold`).
    Ledoit-Wolf shrinkage keeps the covariance invertible and stable with a few hundred images.
    Pass smears that pass the model-free checks (`clean_features`): a blank training file
    would otherwise set the threshold.
    """
    return colour_model_from_features(np.stack([image_features(im) for im in images]), groups, keep, confidence,
                                      folds)


def colour_model_from_features(feats: np.ndarray, groups=None, keep: float = COLOUR_KEEP,
                               confidence: float = COLOUR_CONFIDENCE, folds: int = COLOUR_FOLDS) -> dict:
    """`fit_colour_model` from the images' FEATURES (rows of `image_features`), so that a
    caller can decode thousands of files one at a time.

    The bound counts images, not groups; images of one group move together, so with G groups
    the threshold is, in effect, "no farther than the farthest of G held-out groups". With
    fewer than ~1,500 images it is simply the largest cross-fitted distance, and
    `confidence_achieved` (stored) says how sure that is (`threshold_confidence`).
    """
    n = feats.shape[0]
    groups = np.arange(n) if groups is None else np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"got {n} images but {groups.size} group ids")
    n_groups = len(np.unique(groups))
    held_out = np.sort(cross_fitted_distances(feats, groups, folds))
    threshold = choose_threshold(held_out, keep, confidence)
    model = _ledoit_wolf(feats)
    return {
        "version": COLOUR_MODEL_VERSION,
        "features": list(FEATURES),
        "mean": [float(v) for v in model.location_],
        "precision": [[float(v) for v in row] for row in model.precision_],
        "threshold": threshold,
        "keep": float(keep), "confidence": float(confidence),
        "confidence_achieved": threshold_confidence(n, int(np.searchsorted(held_out, threshold, "right")), keep),
        "folds": int(min(folds, n_groups)), "n_images": int(n), "n_groups": int(n_groups),
    }


def cross_fitted_distances(feats: np.ndarray, groups: np.ndarray, folds: int = COLOUR_FOLDS) -> np.ndarray:
    """Mahalanobis distance of every row of `feats` from a model fitted on the other folds,
    where whole `groups` are held out together (min(folds, number of groups) folds)."""
    from sklearn.model_selection import GroupKFold

    n, n_groups = feats.shape[0], len(np.unique(groups))
    if min(folds, n_groups) < 2:
        raise TooFewImages(f"the colour model's threshold needs images in at least 2 groups, got {n_groups}")
    out = np.empty(n)
    for fit, held in GroupKFold(n_splits=min(folds, n_groups)).split(feats, groups=groups):
        if fit.size <= len(FEATURES):
            raise TooFewImages(f"need more than {len(FEATURES)} images outside every held-out fold of groups to "
                               f"fit the colour model; one fold leaves {fit.size} of {n} ({n_groups} groups)")
        out[held] = np.sqrt(np.maximum(_ledoit_wolf(feats[fit]).mahalanobis(feats[held]), 0.0))
    return out


def _ledoit_wolf(feats: np.ndarray):
    from sklearn.covariance import LedoitWolf  # here: every decode imports this module, few fit

    if feats.shape[0] <= len(FEATURES):
        raise TooFewImages(f"need more than {len(FEATURES)} images to fit the colour model, got {feats.shape[0]}")
    return LedoitWolf().fit(feats)


def colour_distance(image: np.ndarray | Image.Image, colour_model: dict) -> float:
    """Mahalanobis distance of the image's FEATURES from the training images'."""
    return _distance(image_features(image), colour_model)


def _distance(feats: np.ndarray, colour_model: dict) -> float:
    if colour_model.get("version") != COLOUR_MODEL_VERSION or list(colour_model.get("features", ())) != list(FEATURES):
        raise ValueError("colour model was made by another leukray version (features differ)")
    diff = feats - np.asarray(colour_model["mean"], dtype=np.float64)
    return float(np.sqrt(max(diff @ np.asarray(colour_model["precision"], dtype=np.float64) @ diff, 0.0)))


def quality_flags(image: np.ndarray | Image.Image, width: int | None = None, height: int | None = None,
                  colour_model: dict | None = None) -> list[str]:
    """Names (from FLAGS, in that order) of the checks `image` fails; [] means assessable.

    `image` is the decoded image (PIL, or a uint8 HxWx3 array), best before resizing;
    `width`/`height` are the file's own size (pass them when `image` was already resized).
    Without `colour_model` the colour check is skipped.
    """
    flags, feats = _checked(image, width, height)
    if colour_model is not None and _distance(feats, colour_model) > colour_model["threshold"]:
        flags.append(COLOUR_OUTLIER)
    return flags


def clean_features(image: np.ndarray | Image.Image, width: int | None = None,
                   height: int | None = None) -> np.ndarray | None:
    """FEATURES of `image` if it passes the model-free checks, else None (one pass for both):
    what a colour model is fitted on."""
    flags, feats = _checked(image, width, height)
    return None if flags else feats


def _checked(image: np.ndarray | Image.Image, width: int | None, height: int | None) -> tuple[list[str], np.ndarray]:
    """The model-free flags of `image` and its FEATURES, from one set of histograms."""
    if width and height:
        w, h = width, height
    else:
        w, h = image.size if isinstance(image, Image.Image) else np.asarray(image).shape[1::-1]
    hists, chroma, planes = _statistics(_work_image(image))
    flags = []
    if min(w, h) < MIN_SIDE:
        flags.append(TOO_SMALL)
    if max(w, h) > MAX_ASPECT * min(w, h):
        flags.append(EXTREME_ASPECT)
    if _uniform(hists, planes):
        flags.append(UNIFORM)
    if chroma.share_above(LEVEL_TOLERANCE) < MIN_CONTENT_SHARE:
        flags.append(GRAYSCALE)
    return flags, _features(hists, chroma)


def _uniform(hists: list[_Hist], planes: list[np.ndarray]) -> bool:
    """Fewer than MIN_CONTENT_SHARE of the pixels have some channel more than LEVEL_TOLERANCE
    from that channel's median. Read off the histograms where they decide it: the pixels off
    in some channel are at least as many as those off in the channel with the most, and at
    most the sum over the three channels. Only a nearly blank image falls between the two and
    is counted pixel by pixel."""
    n = hists[0].n
    bounds = []
    for hist in hists:
        m = hist.median()  # integer bounds: the same pixels as |p - m| > LEVEL_TOLERANCE
        bounds.append((int(np.ceil(m - LEVEL_TOLERANCE)), int(np.floor(m + LEVEL_TOLERANCE))))
    outside = [hist.outside(lo, hi) for hist, (lo, hi) in zip(hists, bounds)]
    if max(outside) / n >= MIN_CONTENT_SHARE:
        return False
    if sum(outside) / n < MIN_CONTENT_SHARE:
        return True
    differs = np.zeros(planes[0].shape, bool)
    for p, (lo, hi) in zip(planes, bounds):
        levels = p.astype(np.int16)  # the bounds may lie outside 0..255
        differs |= (levels > hi) | (levels < lo)
    return float(differs.mean()) < MIN_CONTENT_SHARE


def energy_score(logits) -> np.ndarray:
    """Out-of-distribution score per row: the free energy -logsumexp(logits).

    Higher means less like the training data (Liu et al., "Energy-based Out-of-distribution
    Detection", 2020); unlike the max softmax it keeps the logits' overall scale, which a
    confident answer on a blank image does not fake as easily. Pass calibrated logits.
    NumPy's logaddexp reduction, not SciPy's logsumexp (equal to 4e-15 here): every scoring
    actor calls this, and importing scipy.special cost each one ~0.17 s of a CPU.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits must be (n, classes), got shape {z.shape}")
    return -np.logaddexp.reduce(z, axis=1)


def choose_threshold(scores, keep: float = 0.98, confidence: float | None = None) -> float:
    """A threshold such that at least `keep` of real smears score <= it; rows above it are
    not assessable.

    Without `confidence`: the empirical quantile rounded up (method "higher"), so at least
    `keep` of `scores` themselves are kept. With `confidence`: the smallest order statistic
    that keeps `keep` of *new* smears from the same distribution with that probability
    (distribution-free: the share of the population below the k-th of n scores follows
    Beta(k, n + 1 - k), so P(share >= keep) = P(Binomial(n, keep) <= k - 1)). The plain
    quantile keeps `keep` only about half the time on new smears (it is a median estimate);
    with a few hundred validation smears the bound asks for a higher order statistic, up to
    the largest score when n is too small for the confidence (then the guarantee is weaker,
    `threshold_confidence` says how much). The bound assumes new smears are exchangeable with
    the validation ones; smears from other slides, or a temperature and epoch chosen on these
    same validation smears, make it optimistic (README, "Predictions a lab can trust").
    """
    s = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
    if s.size == 0 or not 0 < keep <= 1 or (confidence is not None and not 0 < confidence < 1):
        raise ValueError("need at least one score, 0 < keep <= 1 and 0 < confidence < 1")
    if confidence is None:
        return float(np.quantile(s, keep, method="higher"))
    from scipy.stats import binom  # fitting only: scoring actors never import it

    k = int(binom.ppf(confidence, s.size, keep)) + 1
    return float(s[min(k, s.size) - 1])


def threshold_confidence(n: int, kept: int, keep: float) -> float:
    """P(the `kept`-th smallest of `n` scores keeps at least `keep` of new smears)."""
    from scipy.stats import binom

    return float(binom.cdf(kept - 1, n, keep))
