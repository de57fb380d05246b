"""End to end on an embedded Ray: train (2 workers) -> model file -> evaluate -> score to Parquet."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from leukray.config import ScoreConfig
from leukray.infer import score
from leukray.inputs import list_inputs
from leukray.model import load_model


def test_training_writes_an_auditable_run(trained_run):
    run = Path(trained_run["run_dir"])
    split = pd.read_csv(run / "split.csv")
    assert set(split["split"]) == {"train", "val", "test"}
    assert len(split) == 120 and split["sha256"].str.len().eq(64).all()
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(0 <= h["val_accuracy"] <= 1 and h["train_loss"] > 0 for h in history)
    model, meta = load_model(run)
    assert meta["classes"] == ["Benign", "Early", "Pre", "Pro"] and meta["image_size"] == 64
    assert meta["split_id"] == json.loads((run / "config.json").read_text())["split_id"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n"] == (split["split"] == "test").sum()
    assert np.array(metrics["confusion_matrix"]).sum() == metrics["n"]
    assert set(metrics["per_class"]) == set(meta["classes"])
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["macro_f1"] <= 1.0


def test_score_writes_one_row_per_file_with_probabilities(trained_run, synth_data, tmp_path):
    out = tmp_path / "pred"
    stats = score(ScoreConfig(model=trained_run["run_dir"], input=str(synth_data), output=str(out)))
    df = pd.read_parquet(out)
    files = sorted(str(p) for p in Path(synth_data).rglob("*.jpg"))
    assert sorted(df["path"]) == files and stats["scored"] == len(files)
    classes = ["Benign", "Early", "Pre", "Pro"]
    probs = df[[f"prob_{c}" for c in classes]].to_numpy()
    assert np.allclose(probs.sum(1), 1.0, atol=1e-4)
    # a row the trust checks cannot assess keeps its probabilities but has no predicted label
    fine = df["assessable"].to_numpy(dtype=bool)
    assert fine.mean() >= 0.9, df.loc[~fine, ["path", "quality_flags"]]
    assert (df["predicted_label"][fine] == np.array(classes)[probs[fine].argmax(1)]).all()
    assert df["predicted_label"][~fine].isna().all()
    assert np.allclose(df["malignant_probability"], 1 - df["prob_Benign"], atol=1e-6)
    assert df["error"].isna().all() and df["model_id"].nunique() == 1
    assert df["sha256"].str.len().eq(64).all() and (df["width"] == 224).all()

    # re-running skips everything; nothing is appended twice
    again = score(ScoreConfig(model=trained_run["run_dir"], input=str(synth_data), output=str(out)))
    assert again["scored"] == 0 and again["already_scored"] == len(files)
    assert len(pd.read_parquet(out)) == len(files)


def test_score_keeps_bad_files_as_error_rows(trained_run, tmp_path):
    src = tmp_path / "in"
    (src / "nested dir").mkdir(parents=True)
    from leukray.synthetic import draw_smear
    from PIL import Image

    Image.fromarray(draw_smear(0, np.random.default_rng(0), 64)).save(src / "nested dir" / "ok é.jpg")
    (src / "empty.jpg").write_bytes(b"")
    (src / "text.jpg").write_text("not an image")
    (src / "readme.txt").write_text("skipped, not scored")
    out = tmp_path / "pred"
    stats = score(ScoreConfig(model=trained_run["run_dir"], input=str(src), output=str(out)))
    df = pd.read_parquet(out).set_index("path")
    assert len(df) == 3 and stats["skipped_non_images"] == 1
    assert df.loc[str(src / "empty.jpg"), "error"] == "empty file"
    assert df.loc[str(src / "text.jpg"), "error"] == "not an image"
    assert pd.isna(df.loc[str(src / "text.jpg"), "prob_Benign"])  # null, not a made-up number
    ok = df.loc[str(src / "nested dir" / "ok é.jpg")]
    assert pd.isna(ok["error"]) and ok["predicted_label"] in ("Benign", "Early", "Pre", "Pro")
    # the Parquet schema is explicit: probabilities are float32 with nulls
    assert str(pq.read_schema(next(Path(out).glob("part-*.parquet"))).field("prob_Benign").type) == "float"


def test_changed_file_is_rescored_and_overwrite_starts_over(trained_run, tmp_path):
    from leukray.synthetic import draw_smear
    from PIL import Image

    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.fromarray(draw_smear(i, np.random.default_rng(i), 64)).save(src / f"{i}.jpg")
    out = tmp_path / "pred"
    cfg = ScoreConfig(model=trained_run["run_dir"], input=str(src), output=str(out))
    score(cfg)
    Image.fromarray(draw_smear(3, np.random.default_rng(9), 64)).save(src / "1.jpg")  # new bytes
    again = score(cfg)
    assert again["scored"] == 1 and again["already_scored"] == 2
    df = pd.read_parquet(out)
    assert sorted(df["path"]) == sorted(str(p) for p in src.glob("*.jpg"))
    fresh = score(ScoreConfig(model=trained_run["run_dir"], input=str(src), output=str(out), overwrite=True))
    assert fresh["scored"] == 3 and len(pd.read_parquet(out)) == 3


def test_list_inputs_handles_lists_and_symlink_loops(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"1")
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a")
    found = list_inputs(str(tmp_path))
    assert [Path(p).name for p in found.paths] == ["x.jpg"]
    pd.DataFrame({"path": [str(tmp_path / "a" / "x.jpg"), "notes.txt"]}).to_csv(tmp_path / "list.csv", index=False)
    listed = list_inputs(str(tmp_path / "list.csv"))
    assert listed.paths == [str(tmp_path / "a" / "x.jpg")] and listed.skipped == ["notes.txt"]
    with pytest.raises(FileNotFoundError):
        list_inputs(str(tmp_path / "missing"))


@pytest.mark.slow  # two more Ray Train start-ups
def test_rerun_of_a_finished_run_resumes_instead_of_restarting(trained_run, synth_data):
    from leukray.config import DataConfig, TrainConfig
    from leukray.train import fit

    run = Path(trained_run["run_dir"])
    again = fit(DataConfig(data=str(synth_data), image_size=64, group_size=4),
                TrainConfig(output=str(run), epochs=2, workers=2, batch_size=32))
    assert again["timings"]["epochs_run"] == 2  # history restored from the checkpoint, no new epochs
    with pytest.raises(ValueError, match="another --output"):
        fit(DataConfig(data=str(synth_data), image_size=96, group_size=4), TrainConfig(output=str(run), epochs=2))
