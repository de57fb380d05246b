"""Temperature scaling and calibration metrics: does a probability of 0.9 mean 90 %?

A network trained with cross-entropy is usually over-confident: its softmax says 0.97 where
it is right far less often. Temperature scaling (Guo et al., "On Calibration of Modern Neural
Networks", 2017) divides the logits by one scalar T > 0 fitted on held-out (validation)
logits. It cannot change any prediction (the arg-max is the same for every T), so it is safe
to apply after model selection, and one float is easy to store in the model file and to bake
into ONNX/TorchScript exports.

Everything here is pure NumPy/SciPy on arrays (no Ray, no torch), so training, evaluation,
export and the tests share one implementation. Labels are integer class indices.
"""

from __future__ import annotations

import numpy as np

# Equal-width confidence bins of the expected calibration error, as in Guo et al. (2017).
ECE_BINS = 15
# Search range of log T: T in [e^-4, e^4] ~ [0.018, 55] covers any sane network.
LOG_T_BOUNDS = (-4.0, 4.0)
# Probabilities are clipped here before taking logs, so one confident mistake gives a large
# but finite log loss.
_EPS = 1e-12


def _as_logits(logits) -> np.ndarray:
    arr = np.asarray(logits, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty (n, classes) array, got shape {arr.shape}")
    return arr


def _as_labels(labels, n: int) -> np.ndarray:
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    if lab.shape[0] != n:
        raise ValueError(f"{lab.shape[0]} labels for {n} rows")
    return lab


def nll(logits, labels, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / temperature)."""
    z = _as_logits(logits)
    lab = _as_labels(labels, z.shape[0])
    from scipy.special import log_softmax  # fitting and evaluation only: scoring actors never import SciPy

    logp = log_softmax(z / temperature, axis=1)
    return float(-logp[np.arange(z.shape[0]), lab].mean())


def fit_temperature(logits, labels) -> float:
    """The T > 0 minimising the validation NLL of softmax(logits / T).

    Optimised over log T (so T stays positive and the search is symmetric in scale) with
    SciPy's bounded Brent search: one-dimensional, derivative-free and deterministic, so the
    same validation logits always give the same T.
    """
    z = _as_logits(logits)
    lab = _as_labels(labels, z.shape[0])
    from scipy.optimize import minimize_scalar  # only where a temperature is fitted: scoring never does

    res = minimize_scalar(lambda log_t: nll(z, lab, float(np.exp(log_t))),
                          bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-6})
    return float(np.exp(res.x))


def apply_temperature(logits, temperature: float):
    """Calibrated logits: logits / T. Works on NumPy arrays and torch tensors alike, so the
    export wrappers can call it inside the traced graph."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logits / temperature


def probabilities(logits, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T) as float64."""
    from scipy.special import softmax  # as in `nll`

    return softmax(_as_logits(logits) / temperature, axis=1)


def _top_label(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    lab = _as_labels(labels, p.shape[0])
    return p.max(axis=1), (p.argmax(axis=1) == lab).astype(np.float64)


def reliability_bins(probs, labels, bins: int = ECE_BINS) -> dict[str, list]:
    """Per equal-width confidence bin: edges, mean confidence, accuracy and count.

    Bin i holds top-label confidences in (i/bins, (i+1)/bins] (a confidence of exactly 0
    goes to the first bin). Empty bins keep confidence/accuracy None so a plot can skip them
    while the edges stay regular. Plain lists: this goes straight into metrics.json.
    """
    conf, correct = _top_label(probs, labels)
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    out: dict[str, list] = {"lower": [], "upper": [], "confidence": [], "accuracy": [], "count": []}
    for i in range(bins):
        members = idx == i
        n = int(members.sum())
        out["lower"].append(i / bins)
        out["upper"].append((i + 1) / bins)
        out["count"].append(n)
        out["confidence"].append(float(conf[members].mean()) if n else None)
        out["accuracy"].append(float(correct[members].mean()) if n else None)
    return out


def expected_calibration_error(probs, labels, bins: int = ECE_BINS) -> float:
    """Top-label ECE: sum over bins of (bin share) * |accuracy - mean confidence|."""
    rel = reliability_bins(probs, labels, bins)
    total = sum(rel["count"])
    return float(sum(n / total * abs(a - c)
                     for n, a, c in zip(rel["count"], rel["accuracy"], rel["confidence"]) if n))


def brier_score(probs, labels) -> float:
    """Multi-class Brier score (Brier, 1950): mean over rows of sum_k (p_k - [y = k])^2.

    Ranges 0 (perfect) to 2; unlike ECE it also rewards sharpness, so it cannot be gamed by
    predicting the class frequencies.
    """
    p = np.asarray(probs, dtype=np.float64)
    lab = _as_labels(labels, p.shape[0])
    onehot = np.zeros_like(p)
    onehot[np.arange(p.shape[0]), lab] = 1.0
    return float(((p - onehot) ** 2).sum(axis=1).mean())


def log_loss(probs, labels) -> float:
    """Mean -log p(true class), with p clipped at 1e-12."""
    p = np.asarray(probs, dtype=np.float64)
    lab = _as_labels(labels, p.shape[0])
    return float(-np.log(np.clip(p[np.arange(p.shape[0]), lab], _EPS, 1.0)).mean())


def calibration_metrics(probs, labels, bins: int = ECE_BINS) -> dict[str, float]:
    """ECE, Brier score, log loss and accuracy of one set of probabilities."""
    conf, correct = _top_label(probs, labels)
    return {
        "ece": expected_calibration_error(probs, labels, bins),
        "brier": brier_score(probs, labels),
        "log_loss": log_loss(probs, labels),
        "accuracy": float(correct.mean()),
        "mean_confidence": float(conf.mean()),
    }


def calibration_summary(logits, labels, temperature: float, bins: int = ECE_BINS) -> dict:
    """Before/after metrics and reliability-diagram data, as plain types for metrics.json.

    `logits` are raw (uncalibrated) network outputs of the split being reported (normally
    the test split), `temperature` the one fitted on the validation split.
    """
    before = probabilities(logits)
    after = probabilities(logits, temperature)
    return {
        "temperature": float(temperature),
        "bins": bins,
        "before": calibration_metrics(before, labels, bins),
        "after": calibration_metrics(after, labels, bins),
        "reliability": {"before": reliability_bins(before, labels, bins),
                        "after": reliability_bins(after, labels, bins)},
    }
