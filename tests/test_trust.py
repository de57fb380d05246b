"""Trust wired into train, score and export: calibrated probabilities, the assessable
verdict, the OOD and review thresholds (leukray.trust and its callers)."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from leukray import calibration, quality, trust
from leukray.data import preprocess, preprocess_batch
from leukray.model import create_model, load_model, save_model
from leukray.output import result_table
from leukray.predictors import TorchPredictor
from leukray.synthetic import draw_smear

SIZE = 64
CLASSES = ["Benign", "Early", "Pre", "Pro"]
T = 2.5


def _smears(n, seed=0, size=224):
    rng = np.random.default_rng(seed)
    return [draw_smear(i % 4, rng, size) for i in range(n)]


def _png(img) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _trust(colour_model, ood_threshold=50.0, review=0.9):
    """A trust dict as `fit_arrays` makes it, with chosen thresholds."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    logits = rng.normal(size=(200, 4)) + 6 * np.eye(4)[labels]
    t = trust.fit_arrays(logits, labels, np.ones(200, bool), colour_model)
    return {**t, "temperature": T, "ood_threshold": ood_threshold, "review_threshold": review}


@pytest.fixture(scope="module")
def colour_model():
    return quality.fit_colour_model(_smears(40))


@pytest.fixture(scope="module")
def run(tmp_path_factory, colour_model):
    """An untrained leuknet with trust metadata, as a run directory."""
    folder = tmp_path_factory.mktemp("trusted")
    torch.manual_seed(0)
    model = create_model("leuknet", len(CLASSES)).eval()
    save_model(folder / "model.pt", model, {"arch": "leuknet", "classes": CLASSES, "image_size": SIZE,
                                            "mean": [0.8, 0.67, 0.7], "std": [0.12, 0.17, 0.1],
                                            "trust": _trust(colour_model)})
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two smears, a blank scan, a tiny crop and a file that is not an image."""
    folder = tmp_path_factory.mktemp("files")
    smears = _smears(2, seed=7)
    images = {"smear0.png": smears[0], "smear1.png": smears[1],
              "blank.png": np.full((300, 300, 3), 250, np.uint8), "tiny.png": smears[0][:8, :8]}
    for name, img in images.items():
        (folder / name).write_bytes(_png(img))
    (folder / "broken.png").write_bytes(b"not an image at all")
    return [str(folder / n) for n in ("smear0.png", "smear1.png", "blank.png", "tiny.png", "broken.png")]


# --------------------------------------------------------------------------- fitting

def test_fit_arrays_calibrates_and_keeps_clean_validation_smears():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 5000)  # enough for the 95 % bound to stop short of the largest energy
    logits = 4 * (rng.normal(size=(5000, 4)) + 2.5 * np.eye(4)[labels])  # over-confident
    clean = rng.random(5000) > 0.05
    t = trust.fit_arrays(logits, labels, clean, None)
    assert t["temperature"] > 1.5
    assert t["validation"]["ece_after"] < t["validation"]["ece_before"]
    energy = quality.energy_score(logits / t["temperature"])
    kept = (energy[clean] <= t["ood_threshold"]).mean()
    assert trust.OOD_KEEP < kept < 1.0  # above the share (a bound for new smears), not simply everything
    assert t["ood_confidence_achieved"] >= trust.OOD_CONFIDENCE == t["ood_confidence"]
    assert t["validation"]["assessable_share"] == pytest.approx((clean & (energy <= t["ood_threshold"])).mean())
    assert t["review_threshold"] == trust.REVIEW_CONFIDENCE


def test_colour_model_of_files_fits_clean_smears_and_keeps_their_groups(tmp_path, capsys):
    from leukray.data import decode, read_bytes

    smears, paths = _smears(24, seed=3), []
    for i, img in enumerate(smears):
        paths.append(str(tmp_path / f"s{i}.png"))
        (tmp_path / f"s{i}.png").write_bytes(_png(img))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "blank.png").write_bytes(_png(np.full((224, 224, 3), 250, np.uint8)))  # fails the checks
    groups = [i // 4 for i in range(24)]
    # the two odd files in the middle, each with a group of its own: skipped with their groups
    files = paths[:12] + [str(tmp_path / "broken.png"), str(tmp_path / "blank.png")] + paths[12:]
    got = trust.colour_model_of(files, SIZE, groups[:12] + [98, 99] + groups[12:])
    assert got["n_images"] == 24 and got["n_groups"] == 6
    decoded = [np.asarray(decode(read_bytes(p), SIZE)[0]) for p in paths]  # as scoring decodes them
    assert got == quality.fit_colour_model(decoded, groups)
    with pytest.raises(ValueError, match="shorter"):  # a groups list that does not match the files
        trust.colour_model_of(paths, SIZE, groups[:-1])
    assert trust.colour_model_of(paths[:5], SIZE) is None  # too few to fit
    assert "no colour check for this model (5 clean images of 5)" in capsys.readouterr().out
    assert trust.colour_model_of(paths, SIZE, [0] * 24) is None  # one group: nothing to hold out
    assert "in at least 2 groups" in capsys.readouterr().out


def test_too_few_training_images_for_the_colour_bound_are_said(colour_model):
    t = trust.fit_arrays(*_separable_logits(1000), np.ones(1000, bool), colour_model)
    line = trust.confidence_warning(t)  # the OOD bound holds with 1,000; the colour one not with 40
    assert line is not None and line.count("\n") == 0
    assert "40 clean training images are too few to keep 99.8% of new smears inside the colour model" in line


def _separable_logits(n, seed=2):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    return 4 * (rng.normal(size=(n, 4)) + 2.5 * np.eye(4)[labels]), labels


@pytest.mark.parametrize("n,warned", [(100, True), (1000, False)])
def test_too_few_validation_smears_for_the_ood_bound_are_said(n, warned):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, n)
    t = trust.fit_arrays(4 * (rng.normal(size=(n, 4)) + 2.5 * np.eye(4)[labels]), labels, np.ones(n, bool), None)
    line = trust.confidence_warning(t)
    assert (line is not None) == warned and (t["ood_confidence_achieved"] < trust.OOD_CONFIDENCE) == warned
    if warned:
        assert f"{n} clean validation smears are too few" in line and "with 63%" in line  # 1 - 0.99 ** 100


def test_trust_dict_is_plain_and_loads_with_weights_only(tmp_path, colour_model):
    t = _trust(colour_model)
    assert json.loads(json.dumps(t)) == t
    torch.save({"meta": {"trust": t}}, tmp_path / "m.pt")
    assert torch.load(tmp_path / "m.pt", weights_only=True)["meta"]["trust"] == t


def test_older_model_files_have_no_trust_and_a_warning():
    assert trust.of({"model_id": "x"}) is None
    assert trust.temperature({}) == 1.0
    assert trust.decode_checks({}) is False
    assert "no calibration" in trust.missing_warning({"model_id": "abc"})
    assert trust.missing_warning({"trust": {"version": trust.TRUST_VERSION}}) is None


# --------------------------------------------------------------------------- decode stage

def test_preprocess_computes_flags_only_when_asked(colour_model):
    blank = _png(np.full((200, 200, 3), 250, np.uint8))
    assert "quality_flags" not in preprocess(blank, 32)[1]
    assert preprocess(blank, 32, True)[1]["quality_flags"] == [quality.UNIFORM, quality.GRAYSCALE]
    assert preprocess(_png(_smears(1, seed=3)[0]), 32, colour_model)[1]["quality_flags"] == []
    # the file's own size decides, not the resized one
    assert quality.TOO_SMALL in preprocess(_png(_smears(1)[0][:10, :10]), 32, True)[1]["quality_flags"]


def test_preprocess_batch_joins_flags_and_leaves_failed_rows_null(files):
    out = preprocess_batch({"path": np.array(files, dtype=object)}, SIZE, True)
    flags = list(out["quality_flags"])
    assert flags[:3] == [None, None, "uniform;grayscale"] and flags[4] is None
    assert flags[3].split(";")[0] == "too_small"
    assert "quality_flags" not in preprocess_batch({"path": np.array(files[:1], dtype=object)}, SIZE)


# --------------------------------------------------------------------------- scoring

def test_verdicts_without_trust_score_as_before():
    ok = np.array([True, False])
    v = trust.verdicts(np.full((2, 4), 0.25), np.zeros((2, 4)), ok, None, {"classes": CLASSES})
    assert v["assessable"].tolist() == [True, False]
    assert v["quality_flags"].tolist() == [None, None]
    assert np.isnan(v["ood_score"]).all() and not v["needs_review"].any()


def test_verdicts_flag_ood_rows_and_refer_low_confidence(colour_model):
    meta = {"trust": _trust(colour_model, ood_threshold=-3.0, review=0.9)}
    logits = np.array([[8.0, 0, 0, 0], [8.0, 0, 0, 0], [3.0, 2.9, 0, 0], [0.1, 0, 0, 0], [np.nan] * 4])
    probs = calibration.probabilities(np.nan_to_num(logits))
    ok = np.array([True, True, True, True, False])
    flags = np.array([None, "uniform", None, None, None], dtype=object)
    v = trust.verdicts(probs, logits, ok, flags, meta)
    # energies: row 2 about -3.7 (kept, but confidence 0.5), row 3 about -1.4 > -3: out of distribution
    assert v["quality_flags"].tolist() == [None, "uniform", None, "out_of_distribution", None]
    assert v["assessable"].tolist() == [True, False, True, False, False]
    assert v["needs_review"].tolist() == [False, False, True, False, False]
    np.testing.assert_allclose(v["ood_score"][:4], quality.energy_score(logits[:4]), rtol=1e-6)
    assert np.isnan(v["ood_score"][4])
    lenient = trust.verdicts(probs, logits, ok, flags, meta, review_threshold=0.2)
    assert not lenient["needs_review"].any()


def test_predictor_calibrates_and_withholds_labels_of_unassessable_rows(run, files):
    p = TorchPredictor(str(run / "model.pt"))
    out = p({"path": np.array(files, dtype=object)})
    assert out["assessable"].tolist() == [True, True, False, False, False]
    assert out["predicted_label"][2:].tolist() == [None, None, None]
    assert all(lab in CLASSES for lab in out["predicted_label"][:2])
    assert not np.isnan(out["probs"][2:4]).any()  # kept for audit
    model, _ = load_model(run)
    images = np.stack([preprocess(open(f, "rb").read(), SIZE)[0] for f in files[:4]])
    with torch.inference_mode():
        raw = model(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(out["probs"][:4], calibration.probabilities(raw, T), atol=1e-5)
    assert not np.allclose(out["probs"][:4], calibration.probabilities(raw), atol=1e-3)


def test_predictor_scores_rows_whose_error_column_ray_made_nan(run, files):
    """Between Ray Data stages an all-None `error` column arrives as float NaNs: those rows
    are fine, not failed (the landed check `e is None` scored none of them)."""
    checks = trust.decode_checks({"trust": _trust(None)})
    batch = preprocess_batch({"path": np.array(files[:2], dtype=object)}, SIZE, checks)
    batch["error"] = np.full(2, np.nan, np.float32)
    batch["quality_flags"] = np.full(2, np.nan, np.float32)
    out = TorchPredictor(str(run / "model.pt"))(batch)
    assert not np.isnan(out["probs"]).any()
    assert out["assessable"].all()


def test_result_table_writes_the_trust_columns(run, files):
    out = TorchPredictor(str(run / "model.pt"))({"path": np.array(files, dtype=object), "member": [None] * 5})
    table = result_table(out, CLASSES, 0, "m", "now")
    assert table.schema.field("assessable").type == "bool"
    assert table.schema.field("ood_score").type == "float"
    rows = table.to_pylist()
    assert [r["assessable"] for r in rows] == [True, True, False, False, False]
    assert [r["quality_flags"] for r in rows][:2] == [None, None]
    assert rows[2]["quality_flags"] == "uniform;grayscale;colour_outlier"
    assert rows[3]["quality_flags"].startswith("too_small") and rows[4]["quality_flags"] is None
    assert rows[4]["ood_score"] is None and rows[4]["error"] is not None
    assert all(r["ood_score"] is not None for r in rows[:4])


def test_result_table_of_rows_without_trust_columns():
    batch = {"path": ["a", "b"], "member": [None, None], "error": [None, "not an image"], "bytes": np.array([1, 1]),
             "sha256": ["x", "y"], "width": np.array([1, 1]), "height": np.array([1, 1]), "mode": ["RGB", None],
             "predicted_label": ["Pro", None], "probs": np.array([[0.1, 0.2, 0.3, 0.4], [np.nan] * 4])}
    rows = result_table(batch, CLASSES, 0, "m", "now").to_pylist()
    assert [r["assessable"] for r in rows] == [True, False]
    assert [r["quality_flags"] for r in rows] == [None, None]
    assert [r["needs_review"] for r in rows] == [False, False]


def test_metrics_recover_raw_probabilities_from_calibrated_ones():
    import pandas as pd

    from leukray.evaluate import trust_metrics

    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 300)
    raw = 3 * (rng.normal(size=(300, 4)) + 2 * np.eye(4)[y])
    cal = calibration.probabilities(raw, T).astype(np.float32)
    df = pd.DataFrame({"label": [CLASSES[i] for i in y], "error": None,
                       **{f"prob_{c}": cal[:, i] for i, c in enumerate(CLASSES)},
                       "assessable": True, "needs_review": False, "quality_flags": None})
    m = trust_metrics(df, CLASSES, T)
    expected = calibration.calibration_summary(raw, y, T)
    assert m["calibration"]["before"]["ece"] == pytest.approx(expected["before"]["ece"], abs=1e-5)
    assert m["calibration"]["after"]["brier"] == pytest.approx(expected["after"]["brier"], abs=1e-5)
    assert len(m["calibration"]["reliability"]["after"]["count"]) == calibration.ECE_BINS
    assert m["assessable"]["share"] == 1.0


# --------------------------------------------------------------------------- export

def test_exports_compute_calibrated_probabilities_and_logits(run, tmp_path, files):
    pytest.importorskip("onnxruntime")
    from leukray.export import export_model
    from leukray.predictors import OnnxPredictor

    result = export_model(run, tmp_path / "export")
    assert result["onnx_max_abs_diff"] <= 1e-4
    images = np.stack([preprocess(open(f, "rb").read(), SIZE)[0] for f in files[:4]])
    torch_p = TorchPredictor(str(run / "model.pt"))
    onnx_p = OnnxPredictor(str(tmp_path / "export"))
    (tp, tl), (op, ol) = torch_p.predict(images), onnx_p.predict(images)
    np.testing.assert_allclose(op, tp, atol=1e-5)
    np.testing.assert_allclose(ol, tl, atol=1e-4)
    model, _ = load_model(run)
    with torch.inference_mode():
        raw = model(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(ol, raw / T, atol=1e-4)
    scripted = torch.jit.load(str(tmp_path / "export" / "model.torchscript.pt"))
    with torch.inference_mode():
        np.testing.assert_allclose(scripted(torch.from_numpy(images)).numpy(), tp, atol=1e-5)
    batch = {"path": np.array(files, dtype=object)}
    assert onnx_p(dict(batch))["assessable"].tolist() == torch_p(dict(batch))["assessable"].tolist()


# --------------------------------------------------------------------------- train

def test_training_stores_trust_and_metrics_report_calibration(trained_run):
    from leukray.modelfile import read_model_meta

    meta = read_model_meta(trained_run["model"])
    t = trust.of(meta)
    assert t is not None and t["temperature"] > 0
    assert t["colour_model"]["n_images"] > len(quality.FEATURES)
    assert 2 <= t["colour_model"]["n_groups"] < t["colour_model"]["n_images"]  # the split's slide groups
    assert t["ood_threshold"] is not None and 0 < t["review_threshold"] < 1
    m = trained_run["metrics"]
    assert set(m["calibration"]) >= {"before", "after", "reliability", "temperature"}
    assert m["calibration"]["temperature"] == pytest.approx(t["temperature"])
    assert 0 <= m["assessable"]["share"] <= 1
    card = meta["card"]  # written by train at its end, from this same metadata
    assert card["calibration"]["temperature"] == pytest.approx(t["temperature"])
    assert card["assessable"]["ood_threshold"] == t["ood_threshold"]
    assert card["calibration"]["test_ece_after"] == pytest.approx(m["calibration"]["after"]["ece"])


@pytest.mark.slow  # exports and scores the test split through Ray
def test_refit_command_refreshes_the_export_metrics_and_card(trained_run, tmp_path):
    """`leukray refit` keeps model_id: the export, metrics.json and card written for the old
    trust metadata must all be redone, as the end of `train` does them."""
    import shutil

    from leukray.cli import main
    from leukray.export import export_model
    from leukray.modelfile import read_model_meta
    from leukray.modelcard import write_model_card
    from leukray.predictors import _onnx_meta

    run = tmp_path / "run"
    shutil.copytree(trained_run["run_dir"], run)
    model, meta = load_model(run)
    keep = ("format", "model_id", "leukray_version", "saved_at")
    stale = save_model(run / "model.pt", model, {**{k: v for k, v in meta.items() if k not in keep},
                                                  "trust": {**meta["trust"], "ood_threshold": 123.0, "temperature": 9.9}})
    export_model(run, run / "export")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["calibration"]["temperature"], metrics["assessable"]["share"] = 9.9, 0.123
    (run / "metrics.json").write_text(json.dumps(metrics))
    write_model_card(run)
    assert read_model_meta(run / "model.pt")["card"]["assessable"]["ood_threshold"] == 123.0

    assert main(["refit", "--model", str(run)]) == 0
    fresh = read_model_meta(run / "model.pt")
    assert fresh["model_id"] == stale["model_id"]
    assert fresh["trust"]["ood_threshold"] != 123.0 and fresh["trust"]["temperature"] != 9.9
    assert _onnx_meta(str(run / "export" / "model.onnx"))["trust"] == fresh["trust"]
    assert fresh["card"]["assessable"]["ood_threshold"] == fresh["trust"]["ood_threshold"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["calibration"]["temperature"] == pytest.approx(fresh["trust"]["temperature"])
    assert metrics["assessable"]["share"] != 0.123


def test_refit_refuses_what_is_not_a_local_run_directory(tmp_path):
    from leukray.cli import cmd_refit
    from leukray.config import RayConfig, RefitConfig

    with pytest.raises(ValueError, match="must be a local run directory"):
        cmd_refit(RefitConfig(model=str(tmp_path / "nowhere")), RayConfig())


def test_review_threshold_flag_is_checked_before_anything(tmp_path):
    from leukray.config import ScoreConfig
    from leukray.infer import check_score_config

    with pytest.raises(ValueError, match="--review-threshold must be in"):
        check_score_config(ScoreConfig(model=str(tmp_path), output=str(tmp_path / "o"), review_threshold=1.5))


def test_summary_counts_unassessable_rows_apart():
    from leukray.infer import format_summary

    stats = {"total": 5, "scored": 5, "seconds": 1.0, "images_per_s": 5.0, "already_scored": 0,
             "errors": {"not an image": 1}, "output": "out", "not_assessable": 2, "needs_review": 1}
    text = format_summary(stats)
    assert "not assessable (no predicted_label, see quality_flags): 2; needs review (low confidence): 1" in text
    assert "not assessable" not in format_summary({**stats, "not_assessable": 0, "needs_review": 0})


@pytest.mark.slow  # scores ~80 images through Ray twice
def test_rejection_table_of_a_trained_run(trained_run, tmp_path):
    from leukray import nonsmears
    from leukray.rundir import read_predictions

    result = nonsmears.check(trained_run["run_dir"], str(tmp_path), log=lambda *_: None)
    table = {t["kind"]: t for t in result["table"]}
    assert set(table) == set(nonsmears.KINDS) | {"all"} and table["all"]["images"] >= 40
    assert table["all"]["share"] >= 0.95, result["table"]
    assert result["test"]["images"] > 0 and 0 <= result["test"]["share"] <= 1
    assert "| all |" in nonsmears.format_check(result)
    # The colour margins agree with the verdicts: the nearest non-smear past the model-free
    # checks is a colour outlier exactly when its ratio is above 1, and so is the farthest smear.
    colour = result["colour"]
    assert colour["threshold"] > 0 and "colour distance / threshold" in nonsmears.format_check(result)
    flags = {}
    for name in ("nonsmears", "test"):
        scores = read_predictions(str(tmp_path / f"scores-{name}-torch")).set_index("path")["quality_flags"]
        flags.update(scores.to_dict())
    for key in ("nearest_nonsmear", "farthest_test_smear"):  # photos and smears pass the model-free checks
        outlier = "colour_outlier" in str(flags[colour[key]["path"]])
        assert outlier == (colour[key]["ratio"] > 1), (key, colour[key], flags[colour[key]["path"]])
