"""The run directory: what `leukray train` writes and every later command reads.

This module is the one home of the run directory's layout. Other modules import the
file names from here; this module imports none of them (only `storage`, `output`'s
part-file prefix and `data.class_key`, none of which reads a run), so no import circle
can form around it. It also reads a run back: `load_run` for everything a
report or a later command shows, `read_predictions` / `valid_predictions` for the scored
Parquet parts (one reader, so metrics, ROC curves and galleries count the same rows).

Layout of RUN_DIR (a local folder, or a URI mirrored by `leukray.storage`):

    config.json        data and training configuration, class list, split id
    split.csv          the split manifest: path, relpath, sha256, label, split, group
    model.pt           the model file (see `leukray.model`)
    history.json       per-epoch metrics
    metrics.json       test metrics
    timings.json       where the time went
    predictions/test/  the test split scored by the production scoring path (Parquet)
    export/            `leukray export` outputs
    report/            `leukray report` outputs
    model_card.md      the model card (`leukray.modelcard`)
    ray/               Ray Train checkpoints (resume state)

Layout of CV_DIR (`leukray cv`): fold-K/ (each a run directory as above), oof.parquet
(every image's out-of-fold prediction, with `fold` and `group`), cv_metrics.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from leukray.data import class_key
from leukray.modelfile import MODEL_FILENAME as MODEL_FILE
from leukray.modelfile import read_model_meta
from leukray.output import PART_PREFIX
from leukray.storage import RAY_SUBDIR  # noqa: F401 - RAY_SUBDIR: Ray Train's folder, synced by Ray

CONFIG_FILE = "config.json"
SPLIT_FILE = "split.csv"
HISTORY_FILE = "history.json"
METRICS_FILE = "metrics.json"
TIMINGS_FILE = "timings.json"
TEST_PREDICTIONS_DIR = "predictions/test"
EXPORT_DIR = "export"
REPORT_DIR = "report"
MODEL_CARD_FILE = "model_card.md"
OOF_FILE = "oof.parquet"
CV_METRICS_FILE = "cv_metrics.json"


def fold_dir_name(fold: int) -> str:
    """The run directory of fold `fold` inside CV_DIR."""
    return f"fold-{fold}"


# --------------------------------------------------------------------------- reading a run

@dataclass
class Run:
    """What a run directory holds, read once; None where a file is missing or unreadable.

    `notes` says, per missing file, what a reader loses (a report prints them in its
    header), so a run killed before evaluation is still readable.
    """

    dir: Path
    config: dict | None = None
    split: pd.DataFrame | None = None
    meta: dict | None = None  # the model file's metadata; the network itself is not built
    history: list[dict] | None = None
    timings: dict | None = None
    metrics: dict | None = None
    predictions: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        """The model's class order: from metrics, the model file, or config; else split.csv's labels."""
        for source in (self.metrics, self.meta, self.config):
            if source and source.get("classes"):
                return list(source["classes"])
        if self.split is not None:
            return sorted(self.split["label"].astype(str).unique())
        return []


def read_predictions(folder: str | Path) -> pd.DataFrame:
    """All Parquet parts of a predictions folder as one table (parts hold disjoint paths).

    Only `part-*.parquet` files count: a killed writer's temporary files are never read.
    """
    parts = sorted(Path(folder).glob(f"{PART_PREFIX}*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no {PART_PREFIX}*.parquet in {folder}")
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


def valid_predictions(preds: pd.DataFrame, classes: list[str]) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Decoded rows whose label is one of `classes`: (rows, true class index, probabilities N x C).

    Labels match case-insensitively, as class folders do (`class_key`).
    """
    index = {class_key(c): i for i, c in enumerate(classes)}
    ok = preds["error"].isna() if "error" in preds else pd.Series(True, index=preds.index)
    rows = preds[ok]
    y = rows["label"].map(lambda s: index.get(class_key(str(s)), -1)).to_numpy()
    rows = rows[y >= 0]
    probs = rows[[f"prob_{c}" for c in classes]].to_numpy(np.float64)
    return rows, y[y >= 0], probs


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _read_history(path: Path) -> list[dict]:
    history = json.loads(path.read_text())
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise ValueError("expected a list of per-epoch objects")
    return history


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
    except Exception as e:  # noqa: BLE001 - a broken file must not sink the whole run
        run.notes.append(f"`{name}` unreadable ({type(e).__name__}: {e}): {what} not shown")
        return None


def load_run(run_dir: str | Path) -> Run:
    """Read every file of a local run directory; missing or broken ones become notes, never
    exceptions (only a missing folder raises). Nothing is re-scored, no network is built."""
    run = Run(Path(run_dir))
    if not run.dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: not a run directory")
    run.config = _optional(run, CONFIG_FILE, "data path and split settings", _read_json)
    run.split = _optional(run, SPLIT_FILE, "split counts and sample images", pd.read_csv)
    run.meta = _optional(run, MODEL_FILE, "model summary", read_model_meta)
    run.history = _optional(run, HISTORY_FILE, "training curves", _read_history)
    run.timings = _optional(run, TIMINGS_FILE, "training time", _read_json)
    run.predictions = _optional(run, TEST_PREDICTIONS_DIR, "ROC curves and misclassified images", read_predictions)
    run.metrics = _optional(run, METRICS_FILE, "test metrics", _read_json)
    return run
