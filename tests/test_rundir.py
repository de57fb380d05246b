"""leukray.rundir: reading a run directory back (no Ray, no training: seconds)."""

import numpy as np
import pandas as pd
import pytest
from test_report import make_run

import leukray.model
from leukray import rundir
from leukray.evaluate import compute_metrics, evaluate_items
from leukray.synthetic import CLASSES


def _no_network(monkeypatch):
    """Make building any network fail: reading a run must need only the model's metadata."""
    def boom(*args, **kwargs):
        raise AssertionError("the network was built")

    monkeypatch.setattr(leukray.model, "create_model", boom)


def test_load_run_reads_a_complete_run(tmp_path, monkeypatch):
    run_dir, metrics = make_run(tmp_path)
    _no_network(monkeypatch)
    run = rundir.load_run(run_dir)
    assert run.notes == []
    assert run.classes == list(CLASSES) and run.meta["arch"] == "leuknet" and run.meta["image_size"] == 64
    assert len(run.split) == 24 and (run.split["split"] == "test").sum() == 8
    assert [h["epoch"] for h in run.history] == [1, 2, 3] and run.timings["fit_s"] == 3.5
    assert run.metrics["accuracy"] == metrics["accuracy"] and run.config["data"]["split"] == "grouped"
    assert len(run.predictions) == 8 and set(run.predictions["model_id"]) == {run.meta["model_id"]}
    assert rundir.read_model_meta((run_dir / rundir.MODEL_FILE).as_uri()) == run.meta  # a URI reads the same


def test_load_run_on_a_partial_run_gives_notes_not_exceptions(tmp_path, monkeypatch):
    run_dir, _ = make_run(tmp_path)
    for name in (rundir.MODEL_FILE, rundir.METRICS_FILE, rundir.TIMINGS_FILE):
        (run_dir / name).unlink()
    (run_dir / rundir.HISTORY_FILE).write_text('{"not": "a list"}')
    (run_dir / rundir.TEST_PREDICTIONS_DIR / "part-x.parquet").unlink()  # the folder stays, empty
    _no_network(monkeypatch)
    run = rundir.load_run(run_dir)
    assert (run.meta, run.history, run.timings, run.metrics, run.predictions) == (None,) * 5
    assert len(run.split) == 24 and run.config["classes"] == list(CLASSES)  # what is there is still read
    assert run.notes == [
        "no `model.pt`: model summary not shown",
        "`history.json` unreadable (ValueError: expected a list of per-epoch objects): training curves not shown",
        "no `timings.json`: training time not shown",
        "no `predictions/test`: ROC curves and misclassified images not shown",
        "no `metrics.json`: test metrics not shown",
    ]
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        rundir.load_run(tmp_path / "nowhere")


def _predictions(labels, errors, classes=CLASSES):
    probs = np.full((len(labels), len(classes)), 0.1, np.float32)
    probs[:, 1] = 0.7
    df = pd.DataFrame({"path": [f"/x/{i}.jpg" for i in range(len(labels))], "label": labels, "error": errors})
    for i, c in enumerate(classes):
        df[f"prob_{c}"] = probs[:, i]
    return df


def test_read_predictions_reads_only_whole_parts(tmp_path):
    _predictions(["Benign"], [None]).to_parquet(tmp_path / "part-a.parquet")
    _predictions(["Pre", "Pro"], [None, None]).to_parquet(tmp_path / "part-b.parquet")
    _predictions(["Early"], [None]).to_parquet(tmp_path / ".tmp-c-123.parquet")  # a killed writer's leftover
    assert sorted(rundir.read_predictions(tmp_path)["label"]) == ["Benign", "Pre", "Pro"]
    with pytest.raises(FileNotFoundError, match="no part-"):
        rundir.read_predictions(tmp_path / "empty")


def test_valid_predictions_and_metrics_count_the_same_rows():
    labels = ["benign", "Pro", "Unknown-class", "Pre"]  # lower-case label: same class as "Benign"
    df = _predictions(labels, [None, None, None, "decode: broken file"])
    rows, y, probs = rundir.valid_predictions(df, list(CLASSES))
    assert list(rows["label"]) == ["benign", "Pro"] and list(y) == [CLASSES.index("Benign"), CLASSES.index("Pro")]
    assert probs.shape == (2, len(CLASSES))
    m = compute_metrics(df, list(CLASSES))
    assert (m["n"], m["errors"], m["unknown_labels"]) == (2, 1, 1)


def test_evaluate_reads_classes_without_building_the_network(tmp_path, monkeypatch):
    run_dir, _ = make_run(tmp_path)
    labels = ["Early", "Benign"]  # _predictions always predicts Early: accuracy 0.5

    def fake_score_paths(items, cfg, ray_cfg, log):  # stands in for the Ray scoring job
        _predictions([it["label"] for it in items], [None] * len(items)).to_parquet(
            f"{cfg.output}/part-0.parquet")

    monkeypatch.setattr("leukray.evaluate.score_paths", fake_score_paths)
    _no_network(monkeypatch)
    out = tmp_path / "eval"
    out.mkdir()
    m = evaluate_items([{"path": f"/x/{i}", "label": lab} for i, lab in enumerate(labels)], str(run_dir), str(out), None)
    assert m["classes"] == list(CLASSES) and m["n"] == 2 and m["accuracy"] == 0.5
