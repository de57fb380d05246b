"""Train/val/test splits that do not leak.

In the public ALL dataset neighbouring file numbers come from the same slide and 40 Pro
pairs are byte-identical. A random image-level split puts near-copies on both sides and
measures memory of slides. So images are first put into *groups* that must not be
separated, then whole groups are assigned to splits, stratified by class:

- always: byte-identical files (same sha256) form one group;
- `grouped`: also runs of `group_size` consecutive file numbers within a class
  (`WBC-Malignant-Pro-011.jpg` -> number 11 -> group (Pro, 0) with group_size 20);
- `random`: no more than the duplicate rule (comparable with published work);
- `auto` (default): `grouped` when almost all file names end in a number, else `random`.

Assignment uses scikit-learn's `StratifiedGroupKFold` with a fixed seed: the test split
is its first fold over all groups, the val split the first fold over the rest.

Cross-validation (`leukray cv`, `train --folds N --fold K`) uses the same groups and the
same splitter with N folds over all groups: fold K is the test split (so each image is in
exactly one test fold), and the val split is carved from the rest as above.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter

import numpy as np
import pandas as pd

POLICIES = ("auto", "grouped", "random")
_NUMBER = re.compile(r"(\d+)\D*$")


def file_number(name: str) -> int | None:
    """The last number in a file's stem (`WBC-Benign-017.jpg` -> 17), or None."""
    stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    m = _NUMBER.search(stem)
    return int(m.group(1)) if m else None


def resolve_policy(policy: str, relpaths: list[str]) -> str:
    if policy not in POLICIES:
        raise ValueError(f"--split {policy!r}: choose one of {', '.join(POLICIES)}")
    if policy != "auto":
        return policy
    numbered = sum(file_number(p) is not None for p in relpaths)
    return "grouped" if relpaths and numbered >= 0.9 * len(relpaths) else "random"


def make_groups(df: pd.DataFrame, policy: str, group_size: int) -> np.ndarray:
    """Group id per row: rows sharing a sha256, or (grouped) a number block, share an id."""
    parent = list(range(len(df)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union_all(keys) -> None:
        first: dict = {}
        for i, key in enumerate(keys):
            if key is None:
                continue
            j = first.setdefault(key, i)
            if j != i:
                parent[find(i)] = find(j)

    union_all(df["sha256"].tolist())
    if policy == "grouped":
        nums = [file_number(p) for p in df["relpath"]]
        union_all([(lab, n // group_size) if n is not None else None for lab, n in zip(df["label"], nums)])
    roots = [find(i) for i in range(len(df))]
    _, ids = np.unique(roots, return_inverse=True)
    return ids


def _first_fold(labels, groups, fraction: float, seed: int) -> np.ndarray:
    """Indices of the first fold of a StratifiedGroupKFold sized to `fraction`."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = max(2, round(1.0 / fraction))
    for label in sorted(set(labels)):
        n_groups = len(set(groups[labels == label]))
        if n_groups < n_splits:
            raise ValueError(
                f"class {label!r} has only {n_groups} groups, too few for a {fraction:.0%} split "
                f"(needs {n_splits}); lower --group-size, add images, or use --split random"
            )
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, fold = next(cv.split(np.zeros(len(labels)), labels, groups))
    return fold


def fold_ids(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Test-fold index (0..folds-1) of every row: StratifiedGroupKFold over all groups, so
    groups never straddle folds and each row is in exactly one fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    if folds < 2:
        raise ValueError(f"--folds {folds}: need at least 2")
    for label in sorted(set(labels)):
        n_groups = len(set(groups[labels == label]))
        if n_groups < folds:
            raise ValueError(f"class {label!r} has only {n_groups} groups, too few for {folds} folds; lower "
                             "--group-size or --folds, or use --split random")
    out = np.full(len(labels), -1)
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, test) in enumerate(cv.split(np.zeros(len(labels)), labels, groups)):
        out[test] = k
    return out


def assign_splits(
    df: pd.DataFrame,
    policy: str = "auto",
    group_size: int = 20,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    folds: int | None = None,
    fold: int = 0,
) -> pd.DataFrame:
    """Return `df` (columns relpath, label, sha256) with `group` and `split` columns added.

    With `folds`, the test split is fold `fold` of `fold_ids` (and `test_fraction` unused)."""
    policy = resolve_policy(policy, df["relpath"].tolist())
    df = df.reset_index(drop=True).copy()
    df["group"] = make_groups(df, policy, group_size)
    split = np.array(["train"] * len(df), dtype=object)
    labels = df["label"].to_numpy()
    groups = df["group"].to_numpy()

    if folds:
        if not 0 <= fold < folds:
            raise ValueError(f"--fold {fold}: must be in 0..{folds - 1}")
        test = np.flatnonzero(fold_ids(labels, groups, folds, seed) == fold)
    else:
        test = _first_fold(labels, groups, test_fraction, seed)
    split[test] = "test"
    rest = np.flatnonzero(split == "train")
    val_share_of_rest = val_fraction / (1.0 - len(test) / len(df))
    val = rest[_first_fold(labels[rest], groups[rest], val_share_of_rest, seed + 1)]
    split[val] = "val"
    df["split"] = split
    df.attrs["policy"] = policy
    return df


def split_summary(df: pd.DataFrame) -> dict:
    """Counts per split and class, for the log and the run directory."""
    counts = Counter(zip(df["split"], df["label"]))
    return {
        "policy": df.attrs.get("policy"),
        "groups": int(df["group"].nunique()),
        "counts": {s: {lab: counts[(s, lab)] for lab in sorted(df["label"].unique())} for s in ("train", "val", "test")},
    }


def manifest_hash(df: pd.DataFrame) -> str:
    """Hash of (relpath, sha256, label, split): the identity of a split."""
    h = hashlib.sha256()
    for row in df.sort_values("relpath")[["relpath", "sha256", "label", "split"]].itertuples(index=False):
        h.update("\t".join(map(str, row)).encode() + b"\n")
    return h.hexdigest()[:16]
