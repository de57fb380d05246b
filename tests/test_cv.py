"""Cross-validation: grouped folds, interval functions, out-of-fold summary, end to end (slow)."""

import json

import numpy as np
import pandas as pd
import pytest

from leukray import cv
from leukray.data import list_labeled_images, sha256_file
from leukray.split import assign_splits
from leukray.synthetic import make_dataset


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("cvdata"), per_class=20, size=32, seed=3)
    df = pd.DataFrame(list_labeled_images(root).records)
    df["sha256"] = [sha256_file(p) for p in df["path"]]
    return df


def test_folds_together_cover_each_image_exactly_once(manifest):
    folds = 5
    runs = [assign_splits(manifest, "grouped", 2, 0.15, 0.15, 0, folds=folds, fold=k) for k in range(folds)]
    tested = pd.concat([r.loc[r["split"] == "test", "path"] for r in runs])
    assert len(tested) == len(manifest) and set(tested) == set(manifest["path"])  # once each, none missing
    plain = assign_splits(manifest, "grouped", 2, 0.15, 0.15, 0)
    for r in runs:
        assert (r["group"] == plain["group"]).all()  # the same grouping as `train`
        assert set(r["split"]) == {"train", "val", "test"}
        for _, g in r.groupby("group"):
            assert g["split"].nunique() == 1  # no group straddles two splits
        assert r[r["split"] == "test"]["label"].nunique() == 4  # stratified


def test_fold_out_of_range_and_too_few_groups_are_refused(manifest):
    with pytest.raises(ValueError, match="--fold 5"):
        assign_splits(manifest, "grouped", 2, folds=5, fold=5)
    with pytest.raises(ValueError, match="too few for 6 folds"):
        assign_splits(manifest, "grouped", 5, folds=6, fold=0)  # numbers 1..20 // 5: 5 groups a class


def test_wilson_interval_hand_checked():
    # 8/10, z = 1.95996: centre (0.8 + z^2/20) / (1 + z^2/10) = 0.71682, half-width 0.22657
    low, high = cv.wilson_interval(8, 10)
    assert low == pytest.approx(0.49016, abs=1e-4) and high == pytest.approx(0.94334, abs=1e-4)
    low, high = cv.wilson_interval(0, 10)  # upper end z^2 / (n + z^2) = 0.27753
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.27753, abs=1e-4)


def test_t_interval_hand_checked():
    # mean 3, sd 1.5811, se 0.7071, t(0.975, 4) = 2.7764 -> +-1.9632
    r = cv.t_interval([1, 2, 3, 4, 5])
    assert r["mean"] == 3 and r["low"] == pytest.approx(1.0368, abs=1e-4) and r["high"] == pytest.approx(4.9632,
                                                                                                           abs=1e-4)
    assert cv.t_interval([0.9])["low"] is None and cv.t_interval([])["mean"] is None


def test_bootstrap_resamples_whole_groups():
    groups = np.repeat(np.arange(10), 3)  # 10 groups of 3 rows
    seen = []

    def stat(idx):
        seen.append(np.bincount(groups[idx], minlength=10))
        return float(len(idx))

    low, high = cv.bootstrap_interval(stat, groups, n_resamples=50)
    assert low == high == 30.0  # 10 groups drawn, 3 rows each
    counts = np.stack(seen)
    assert (counts % 3 == 0).all() and (counts.max(1) > 3).any()  # whole groups, some drawn twice
    value = np.repeat(np.linspace(0, 1, 10), 3)
    low, high = cv.bootstrap_interval(lambda idx: float(value[idx].mean()), groups, n_resamples=500)
    assert low < 0.5 < high and high - low < 0.6


@pytest.mark.parametrize("folds, cpus, gpus, workers, gpu, expected", [
    (5, 2, 0, 1, False, 1),    # this 2-core machine: one after another
    (5, 16, 0, 1, False, 5),   # 16 CPUs: 5 folds x (2 + 1)
    (5, 16, 0, 2, False, 3),   # 2 workers a fold: 5 CPUs each
    (5, 8, 4, 1, True, 4),     # GPUs: one per worker
    (3, 64, 8, 1, True, 3),    # never more than the folds
])
def test_concurrency_rule(folds, cpus, gpus, workers, gpu, expected):
    assert cv.concurrent_folds(folds, cpus, gpus, workers, gpu) == expected


def test_pooled_and_per_fold_metrics_of_known_predictions():
    classes = ["Benign", "Pro"]
    # 10 Benign (8 right), 10 Pro (10 right); folds 0/1 alternate
    y = np.array([0] * 10 + [1] * 10)
    pred = y.copy()
    pred[:2] = 1
    p_pro = np.where(pred == 1, 0.9, 0.1)
    oof = pd.DataFrame({"path": [f"f{i}" for i in range(20)], "label": [classes[i] for i in y], "error": None,
                        "prob_Benign": 1 - p_pro, "prob_Pro": p_pro, "fold": np.arange(20) % 2,
                        "group": np.arange(20) // 2})
    summary = cv.summarize([None, None], oof, classes)
    pooled = summary["pooled"]
    assert pooled["accuracy"]["value"] == 0.9
    assert (pooled["accuracy"]["low"], pooled["accuracy"]["high"]) == cv.wilson_interval(18, 20)
    assert pooled["recall_Benign"]["value"] == 0.8 and pooled["recall_Benign"]["n"] == 10
    assert pooled["recall_Pro"]["value"] == 1.0
    assert pooled["macro_f1"]["low"] <= pooled["macro_f1"]["value"] <= pooled["macro_f1"]["high"]
    assert [f["accuracy"] for f in summary["per_fold"]] == [0.9, 0.9]
    assert summary["across_folds"]["accuracy"]["mean"] == pytest.approx(0.9)
    json.dumps(summary)  # plain types only
    assert "recall_Benign" in cv.format_summary(summary)


@pytest.mark.slow
def test_cv_end_to_end_writes_oof_for_every_image_and_resumes(ray_session, tmp_path, capsys):
    from leukray.config import CvConfig, DataConfig, TrainConfig

    data = make_dataset(tmp_path / "data", per_class=15, size=48, seed=5)
    out = tmp_path / "cv"
    args = (DataConfig(data=str(data), image_size=32, group_size=1, folds=3),
            TrainConfig(output=str(out), epochs=1, batch_size=32), CvConfig())
    summary = cv.cross_validate(*args)
    oof = pd.read_parquet(out / "oof.parquet")
    assert len(oof) == 60 and oof["path"].is_unique and sorted(oof["fold"].unique()) == [0, 1, 2]
    saved = json.loads((out / "cv_metrics.json").read_text())
    assert saved["n"] == 60 and saved["folds"] == 3 and set(saved["pooled"]) >= {"accuracy", "macro_f1", "ece"}
    assert summary["across_folds"]["accuracy"]["values"] == [f["accuracy"] for f in saved["per_fold"]]
    card = (out / "fold-0" / "model_card.md").read_text()  # train wrote it; cv added its intervals
    assert "fold 0 of 3" in card and "Cross-validation (3 grouped folds, 60 out-of-fold predictions" in card
    def written():  # files only a training run (re)writes; model.pt gets its card rewritten by cv
        return [(out / f"fold-{k}" / name).stat().st_mtime for k in range(3) for name in ("history.json",
                                                                                           "metrics.json")]
    mtimes = written()
    capsys.readouterr()
    cv.cross_validate(*args)  # every fold finished: nothing is retrained
    assert "3 already finished, 0 to train" in capsys.readouterr().out
    assert mtimes == written()


def test_fold_share_of_the_cluster():
    from leukray.config import TrainConfig

    base = TrainConfig(output="cv", workers=1)
    one = cv._fold_train_cfg(base, cv.Path("/cv"), 2, 1, 16)
    assert one.output == "/cv/fold-2" and one.cpus_per_worker is None  # alone: train's own sizing
    five = cv._fold_train_cfg(base, cv.Path("/cv"), 0, 5, 16)
    assert (five.cpus_per_worker, five.threads_per_worker) == (2.2, 2)  # 16/5 - 1 for Ray Data
    tight = cv._fold_train_cfg(base, cv.Path("/cv"), 0, 2, 2)
    assert tight.cpus_per_worker == 0.25 and tight.threads_per_worker == 1  # leaves 1.5 CPUs to Ray Data
    assert cv._fold_train_cfg(TrainConfig(output="cv", cpus_per_worker=3.0), cv.Path("/cv"), 0, 5, 16
                              ).cpus_per_worker == 3.0  # an explicit flag wins


@pytest.mark.slow
def test_cv_trains_folds_concurrently_when_asked(ray_session, tmp_path, capsys):
    """Two Ray Train runs at once from driver threads, each on its share of the 2 CPUs."""
    from leukray.config import CvConfig, DataConfig, TrainConfig

    data = make_dataset(tmp_path / "data", per_class=10, size=48, seed=6)
    out = tmp_path / "cv"
    cv.cross_validate(DataConfig(data=str(data), image_size=32, group_size=1, folds=2),
                      TrainConfig(output=str(out), epochs=1, batch_size=32), CvConfig(concurrent=2))
    assert "2 to train, 2 at a time" in capsys.readouterr().out
    oof = pd.read_parquet(out / "oof.parquet")
    assert len(oof) == 40 and oof["path"].is_unique
    cfg = json.loads((out / "fold-1" / "config.json").read_text())
    assert cfg["train"]["cpus_per_worker"] == 0.25 and cfg["data"]["fold"] == 1
