"""`leukray cv`: grouped cross-validation, out-of-fold predictions and honest error bars.

One test split of ~400 images puts one image at 0.26 accuracy points and seeds move the
result by +-0.5 point, so a single number cannot tell 98.5 % from 99 %. Here every image is
scored once by a model that never saw it or its group (`split.fold_ids`: the same groups and
splitter as `train`), and every metric gets a 95 % interval two ways:

- across folds: mean +- Student-t interval of the K per-fold values (how much a retrained
  model moves);
- pooled out-of-fold: Wilson intervals for proportions (accuracy, per-class recall), a
  percentile bootstrap over split *groups* for macro-F1 and ECE (images of one group are
  correlated, so resampling images would give too narrow an interval).

Each fold is a normal `train` run directory, CV_DIR/fold-K (`train --folds N --fold K`):
re-running `cv` skips finished folds and resumes an interrupted one from its checkpoint.

Concurrency rule (`concurrent_folds`): folds run at once only when each gets a whole share
of the cluster: on GPUs, `workers` GPUs per fold; on CPUs, CPUS_PER_WORKER per worker plus
one CPU for Ray Data's decode tasks. A 2-CPU machine runs folds one after another; a 16-CPU
node with 1 worker per fold runs 5 at once. Ray Train runs the concurrent trainers (one
driver thread each); each fold's workers then reserve their share of CPUs.
"""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from leukray.config import CvConfig, DataConfig, RayConfig, TrainConfig
from leukray.rundir import (CV_METRICS_FILE, METRICS_FILE, MODEL_FILE, OOF_FILE, SPLIT_FILE, TEST_PREDICTIONS_DIR,
                            fold_dir_name, read_predictions, valid_predictions)

DEFAULT_FOLDS = 5
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
# A CPU training worker with fewer cores trains so much slower that running folds side by
# side gains nothing; one more CPU per fold is left to Ray Data.
CPUS_PER_WORKER = 2


# --------------------------------------------------------------------------- intervals

def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion (SciPy's `binomtest`): unlike the normal
    approximation it stays inside [0, 1] and is sound near 0 and 1, where accuracy is."""
    from scipy.stats import binomtest

    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def t_interval(values, confidence: float = CONFIDENCE) -> dict:
    """Mean and Student-t interval of per-fold values (few folds: t, not normal, quantiles)."""
    from scipy.stats import t

    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "low": None, "high": None, "values": []}
    mean = float(v.mean())
    if len(v) < 2:
        return {"mean": mean, "low": None, "high": None, "values": v.tolist()}
    half = float(t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return {"mean": mean, "low": mean - half, "high": mean + half, "values": v.tolist()}


def bootstrap_interval(statistic, groups, confidence: float = CONFIDENCE, n_resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap of `statistic(row_indices)`, resampling whole groups (SciPy's
    `bootstrap` over the group ids). `groups`: one group id per row."""
    from scipy.stats import bootstrap

    groups = np.asarray(groups)
    ids, inverse = np.unique(groups, return_inverse=True)
    rows_of = [np.flatnonzero(inverse == g) for g in range(len(ids))]

    def stat(sample):
        return statistic(np.concatenate([rows_of[int(g)] for g in sample]))

    res = bootstrap((np.arange(len(ids)),), stat, n_resamples=n_resamples, confidence_level=confidence,
                    method="percentile", vectorized=False, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


# --------------------------------------------------------------------------- metrics

def _macro_f1(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, pred, labels=list(range(n_classes)), average="macro", zero_division=0))


def _ece(probs: np.ndarray, y: np.ndarray) -> float:
    from leukray.calibration import expected_calibration_error

    return expected_calibration_error(probs, y)


def fold_metrics(preds: pd.DataFrame, classes: list[str]) -> dict:
    """Accuracy, macro-F1, recall per class and ECE of one fold's test predictions."""
    _, y, probs = valid_predictions(preds, classes)
    pred = probs.argmax(1)
    out = {"n": int(len(y)), "accuracy": float((pred == y).mean()), "macro_f1": _macro_f1(y, pred, len(classes)),
           "ece": _ece(probs, y)}
    for i, c in enumerate(classes):
        out[f"recall_{c}"] = float((pred[y == i] == i).mean()) if (y == i).any() else None
    return out


def pooled_metrics(oof: pd.DataFrame, classes: list[str], seed: int = 0) -> dict:
    """Point value and 95 % interval of each metric on the pooled out-of-fold predictions."""
    rows, y, probs = valid_predictions(oof, classes)
    pred = probs.argmax(1)
    groups = rows["group"].to_numpy() if "group" in rows else np.arange(len(y))
    correct = pred == y
    out = {"accuracy": _proportion(int(correct.sum()), len(y))}
    for i, c in enumerate(classes):
        out[f"recall_{c}"] = _proportion(int(correct[y == i].sum()), int((y == i).sum()))
    for name, fn in (("macro_f1", lambda idx: _macro_f1(y[idx], pred[idx], len(classes))),
                     ("ece", lambda idx: _ece(probs[idx], y[idx]))):
        low, high = bootstrap_interval(fn, groups, seed=seed)
        out[name] = {"value": fn(np.arange(len(y))), "low": low, "high": high, "method": "group bootstrap"}
    return out


def _proportion(k: int, n: int) -> dict:
    low, high = wilson_interval(k, n)
    return {"value": k / n if n else None, "low": low, "high": high, "n": n, "method": "wilson"}


# --------------------------------------------------------------------------- running the folds

def concurrent_folds(folds: int, cluster_cpus: float, cluster_gpus: float, workers: int, gpu: bool) -> int:
    """How many folds train at once (see the module docstring for the rule)."""
    room = cluster_gpus // workers if gpu else cluster_cpus // (workers * CPUS_PER_WORKER + 1)
    return int(max(1, min(folds, room)))


def _fold_train_cfg(train_cfg: TrainConfig, cv_dir: Path, k: int, at_once: int, cluster_cpus: float) -> TrainConfig:
    """Fold K's training config: its own run directory and, when folds share the cluster,
    its share of CPUs (unless --cpus-per-worker / --threads-per-worker say otherwise)."""
    cfg = dataclasses.replace(train_cfg, output=str(cv_dir / fold_dir_name(k)))
    if at_once > 1 and not train_cfg.gpu and train_cfg.cpus_per_worker is None:
        # a fraction when --concurrent asks for more than fits: Ray Data must keep a CPU
        share = round(max(0.25, (cluster_cpus / at_once - 1) / train_cfg.workers), 2)
        cfg = dataclasses.replace(cfg, cpus_per_worker=share, threads_per_worker=train_cfg.threads_per_worker
                                  or max(1, int(share)))
    return cfg


def is_finished(run_dir: Path) -> bool:
    """A fold is done when its model, test predictions and metrics are all written."""
    return (run_dir / MODEL_FILE).is_file() and (run_dir / METRICS_FILE).is_file() and \
        any((run_dir / TEST_PREDICTIONS_DIR).glob("part-*.parquet"))


def run_folds(data_cfg: DataConfig, train_cfg: TrainConfig, cv_cfg: CvConfig, ray_cfg: RayConfig | None) -> list[Path]:
    """Train every unfinished fold (`train.fit`), `concurrent_folds` at a time."""
    import ray

    from leukray import runtime
    from leukray.train import check_train_config, fit

    folds = data_cfg.folds or DEFAULT_FOLDS
    check_train_config(dataclasses.replace(data_cfg, folds=folds), train_cfg)  # before Ray starts
    runtime.init_ray(ray_cfg)
    cv_dir = Path(train_cfg.output).resolve()
    cpus = runtime.ClusterCPUs.current().total
    gpus = float(ray.cluster_resources().get("GPU", 0))
    at_once = cv_cfg.concurrent or concurrent_folds(folds, cpus, gpus, train_cfg.workers, train_cfg.gpu)
    dirs = [cv_dir / fold_dir_name(k) for k in range(folds)]
    todo = [k for k in range(folds) if not is_finished(dirs[k])]
    print(f"[leukray] cv: {folds} folds, {folds - len(todo)} already finished, {len(todo)} to train, "
          f"{at_once} at a time ({cpus:g} CPUs, {gpus:g} GPUs)", flush=True)

    def one(k: int):
        return fit(dataclasses.replace(data_cfg, folds=folds, fold=k),
                   _fold_train_cfg(train_cfg, cv_dir, k, at_once, cpus), ray_cfg)

    with ThreadPoolExecutor(max_workers=at_once) as pool:
        list(pool.map(one, todo))  # re-raises the first failure
    return dirs


def out_of_fold(dirs: list[Path]) -> pd.DataFrame:
    """Every fold's test predictions, with `fold` and the split `group` of each image."""
    parts = []
    for k, d in enumerate(dirs):
        preds = read_predictions(d / TEST_PREDICTIONS_DIR)
        groups = pd.read_csv(d / SPLIT_FILE).set_index("path")["group"]
        parts.append(preds.assign(fold=k, group=preds["path"].map(groups)))
    oof = pd.concat(parts, ignore_index=True)
    dup = oof["path"][oof["path"].duplicated()]
    if len(dup):
        raise ValueError(f"{len(dup)} images are in more than one test fold, e.g. {dup.iloc[0]}")
    return oof


def summarize(dirs: list[Path], oof: pd.DataFrame, classes: list[str]) -> dict:
    """cv_metrics.json: per-fold metrics, their mean +- t interval, pooled OOF intervals."""
    per_fold = [fold_metrics(oof[oof["fold"] == k], classes) for k in range(len(dirs))]
    names = [k for k in per_fold[0] if k != "n"]
    return {"folds": len(dirs), "classes": classes, "n": int(len(oof)), "confidence": CONFIDENCE,
            "per_fold": per_fold, "across_folds": {m: t_interval([f[m] for f in per_fold]) for m in names},
            "pooled": pooled_metrics(oof, classes)}


def cross_validate(data_cfg: DataConfig, train_cfg: TrainConfig, cv_cfg: CvConfig,
                   ray_cfg: RayConfig | None = None) -> dict:
    """`leukray cv`: train the folds, write CV_DIR/oof.parquet and CV_DIR/cv_metrics.json."""
    from leukray.rundir import read_model_meta

    dirs = run_folds(data_cfg, train_cfg, cv_cfg, ray_cfg)
    classes = read_model_meta(dirs[0] / MODEL_FILE)["classes"]
    oof = out_of_fold(dirs)
    cv_dir = Path(train_cfg.output)
    oof.drop(columns=[c for c in ("image",) if c in oof]).to_parquet(cv_dir / OOF_FILE, index=False)
    summary = summarize(dirs, oof, classes)
    (cv_dir / CV_METRICS_FILE).write_text(json.dumps(summary, indent=2))
    from leukray.modelcard import write_model_card

    for d in dirs:  # each fold's model card shows the intervals of the whole cross-validation
        write_model_card(d, cv_dir / CV_METRICS_FILE)
    print(format_summary(summary), flush=True)
    return summary


def format_summary(s: dict) -> str:
    """The terminal table: mean [interval] across folds, pooled value [interval]."""
    def fmt(v, lo, hi):
        return "-" if v is None else f"{v:.4f} [{lo:.4f}, {hi:.4f}]" if lo is not None else f"{v:.4f}"

    lines = [f"[leukray] cv: {s['folds']} folds, {s['n']} out-of-fold predictions, {s['confidence']:.0%} intervals",
             f"{'metric':<18}{'mean across folds':>30}{'pooled out-of-fold':>30}"]
    for m, a in s["across_folds"].items():
        p = s["pooled"].get(m, {})
        lines.append(f"{m:<18}{fmt(a['mean'], a['low'], a['high']):>30}"
                     f"{fmt(p.get('value'), p.get('low'), p.get('high')):>30}")
    return "\n".join(lines)
