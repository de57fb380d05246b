"""The run directory: what `leukray train` writes and every later command reads.

This module is the one home of the run directory's layout. Other modules import the
file names from here; this module imports none of them (only `storage` for URIs), so no
import circle can form around it.

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
    ray/               Ray Train checkpoints (resume state)
"""

from __future__ import annotations

CONFIG_FILE = "config.json"
SPLIT_FILE = "split.csv"
MODEL_FILE = "model.pt"
HISTORY_FILE = "history.json"
METRICS_FILE = "metrics.json"
TIMINGS_FILE = "timings.json"
TEST_PREDICTIONS_DIR = "predictions/test"
EXPORT_DIR = "export"
REPORT_DIR = "report"
