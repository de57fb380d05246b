"""`--engine auto` picks the fastest exact engine; `leukray train` exports; int8 is an option."""

import json
from pathlib import Path
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from leukray.model import create_model, save_model

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from leukray.export import INT8_FILENAME, embed_meta, export_after_training, export_int8, export_model  # noqa: E402
from leukray.predictors import OnnxPredictor, create_predictor, read_model_meta, select_engine  # noqa: E402

CLASSES = ["Benign", "Early", "Pre", "Pro"]
SIZE = 32


def _save(run, seed):
    torch.manual_seed(seed)
    return save_model(run / "model.pt", create_model("leuknet", len(CLASSES)).eval(),
                      {"arch": "leuknet", "classes": CLASSES, "image_size": SIZE,
                       "mean": [0.8, 0.67, 0.7], "std": [0.12, 0.17, 0.1]})


@pytest.fixture(scope="module")
def exported(tmp_path_factory, synth_data):
    """A run directory (model.pt, split.csv whose val rows are synthetic smears) exported."""
    run = tmp_path_factory.mktemp("run")
    _save(run, 0)
    paths = sorted(str(p) for p in Path(synth_data).rglob("*.jpg"))
    pd.DataFrame({"path": paths, "label": [p.split("/")[-2] for p in paths],
                  "split": ["val", "test"] * (len(paths) // 2)}).to_csv(run / "split.csv", index=False)
    export_model(run, run / "export")
    return run


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def test_auto_picks_onnx_for_a_checked_export_of_this_model(exported):
    engine, why = select_engine("auto", exported)
    assert engine == "onnx" and "parity" in why
    assert select_engine("auto", exported / "model.pt")[0] == "onnx"  # the model file, not only the run dir
    assert isinstance(create_predictor("auto", exported), OnnxPredictor)
    assert isinstance(create_predictor("auto", exported / "model.pt"), OnnxPredictor)


@pytest.mark.parametrize("gpu, explain, reason", [(True, False, "GPUs"), (False, True, "--explain")])
def test_auto_keeps_torch_for_gpus_and_explain(exported, gpu, explain, reason):
    engine, why = select_engine("auto", exported, gpu=gpu, explain=explain)
    assert engine == "torch" and reason in why


def test_auto_falls_back_without_export(exported, tmp_path):
    run = _copy(exported, tmp_path)
    shutil.rmtree(run / "export")
    engine, why = select_engine("auto", run)
    assert engine == "torch" and "no " in why and "model.onnx" in why


def test_auto_falls_back_on_a_stale_export(exported, tmp_path):
    """model.pt retrained (another model_id) after the export: the old ONNX must not score."""
    run = _copy(exported, tmp_path)
    new = _save(run, 1)
    assert new["model_id"] != read_model_meta(run, "onnx")["model_id"]
    engine, why = select_engine("auto", run)
    assert engine == "torch" and "another model" in why and new["model_id"] in why


def test_auto_falls_back_on_an_export_with_older_trust_metadata(exported, tmp_path):
    """Trust refitted after the export (`leukray refit`): same weights and model_id, other
    thresholds; the old ONNX would score with the old ones."""
    from leukray.model import load_model

    run = _copy(exported, tmp_path)
    model, meta = load_model(run)
    keep = ("format", "model_id", "leukray_version", "saved_at")
    new = save_model(run / "model.pt", model, {**{k: v for k, v in meta.items() if k not in keep},
                                                "trust": {"ood_threshold": float("nan"), "temperature": 1.5}})
    assert new["model_id"] == read_model_meta(run, "onnx")["model_id"]
    engine, why = select_engine("auto", run)
    assert engine == "torch" and "older trust metadata" in why
    export_model(run, run / "export")  # the same trust, NaN included, on both sides again
    assert select_engine("auto", run)[0] == "onnx"


def test_auto_falls_back_on_an_export_without_parity_record(exported, tmp_path):
    run = _copy(exported, tmp_path)
    meta = read_model_meta(run, "onnx")
    meta["export"].pop("parity")
    embed_meta(run / "export" / "model.onnx", meta)
    engine, why = select_engine("auto", run)
    assert engine == "torch" and "parity" in why


def test_explicit_engines_are_kept_and_unknown_refused(exported):
    assert select_engine("torch", exported)[0] == "torch"
    assert select_engine("onnx", exported)[0] == "onnx"
    with pytest.raises(ValueError, match="unknown engine"):
        select_engine("tensorrt", exported)


def test_scores_of_both_engines_agree_and_fallback_says_why(exported, synth_data, tmp_path, ray_session):
    """End to end through Ray: auto (ONNX Runtime here) and torch give the same probabilities;
    a run without export scores with PyTorch and says so in one line."""
    from leukray.config import ScoreConfig
    from leukray.infer import score_paths
    from leukray.rundir import read_predictions

    items = [{"path": str(p)} for p in sorted(Path(synth_data).rglob("*.jpg"))[:16]]
    logs = {"auto": [], "torch": []}
    for engine in logs:
        score_paths(items, ScoreConfig(model=str(exported), output=str(tmp_path / engine), engine=engine),
                    log=logs[engine].append)
    assert any("onnx engine" in m for m in logs["auto"]) and not any("engine auto" in m for m in logs["auto"])
    probs = {e: read_predictions(str(tmp_path / e)).sort_values("path") for e in logs}
    cols = [f"prob_{c}" for c in CLASSES]
    assert probs["auto"]["path"].tolist() == probs["torch"]["path"].tolist()
    assert np.isfinite(probs["auto"][cols].to_numpy()).all(), "every image scored (no NaN rows)"
    np.testing.assert_allclose(probs["auto"][cols].to_numpy(), probs["torch"][cols].to_numpy(), atol=1e-5)

    bare = _copy(exported, tmp_path)
    shutil.rmtree(bare / "export")
    lines = []
    score_paths(items[:4], ScoreConfig(model=str(bare), output=str(tmp_path / "bare")), log=lines.append)
    why = [m for m in lines if "engine auto: PyTorch" in m]
    assert len(why) == 1 and "model.onnx" in why[0]


def test_export_after_training_warns_and_never_fails(exported, tmp_path, monkeypatch):
    import importlib.util

    import leukray.export as E

    run = _copy(exported, tmp_path)
    lines = []

    def bad_parity(*a, **k):
        raise RuntimeError("ONNX export differs from PyTorch by 1.0e-01")

    monkeypatch.setattr(E, "export_model", bad_parity)
    assert export_after_training(run, log=lines.append) is None
    assert len(lines) == 1 and "warning" in lines[0] and "differs" in lines[0] and "PyTorch" in lines[0]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    lines.clear()
    assert export_after_training(run, log=lines.append) is None
    assert len(lines) == 1 and "onnxruntime not installed" in lines[0]


def test_train_exports_at_the_end(trained_run):
    """`leukray train` leaves an export that `score` picks by default."""
    run = trained_run["run_dir"]
    assert read_model_meta(run, "onnx")["model_id"] == read_model_meta(run)["model_id"]
    assert select_engine("auto", run)[0] == "onnx"


def test_int8_static_is_an_option_never_the_default(exported, tmp_path):
    run = _copy(exported, tmp_path)
    info = export_int8(run, run / "export", "static", calibration_images=8)
    assert info["method"] == "static" and info["calibration_images"] == 8 and 0 <= info["same_prediction_share"] <= 1
    meta = read_model_meta(run, "onnx-int8")
    assert meta["model_id"] == read_model_meta(run)["model_id"]
    assert meta["export"]["quantization"]["method"] == "static" and meta["export"]["parity"]["passed"] is False
    proto = onnx.load(str(run / "export" / INT8_FILENAME))
    assert any(n.op_type == "QuantizeLinear" for n in proto.graph.node), "activations are quantized"
    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    probs = create_predictor("onnx-int8", run).predict_images(images)
    assert probs.shape == (3, len(CLASSES)) and np.allclose(probs.sum(1), 1, atol=1e-3)
    assert select_engine("auto", run)[0] == "onnx"


def test_int8_dynamic_and_stale_int8_removed(exported, tmp_path):
    run = _copy(exported, tmp_path)
    export_int8(run, run / "export", "dynamic")
    proto = onnx.load(str(run / "export" / INT8_FILENAME))
    assert any(n.op_type in ("ConvInteger", "DynamicQuantizeLinear") for n in proto.graph.node)
    _save(run, 2)
    export_model(run, run / "export")  # a new model: its int8 file would be of the old one
    assert not (run / "export" / INT8_FILENAME).exists()
    with pytest.raises(FileNotFoundError, match="export --int8"):
        create_predictor("onnx-int8", run)


def test_static_int8_needs_validation_images(exported, tmp_path):
    run = _copy(exported, tmp_path)
    (run / "split.csv").unlink()
    with pytest.raises(FileNotFoundError, match="validation images"):
        export_int8(run, run / "export", "static")


def test_cli_export_int8_and_score_onnx_int8(exported, synth_data, tmp_path, ray_session, capsys):
    from leukray import cli
    from leukray.rundir import read_predictions

    run = _copy(exported, tmp_path)
    assert cli.main(["export", "--model", str(run), "--int8", "--calibration-images", "8"]) == 0
    assert (run / "export" / INT8_FILENAME).is_file()
    written = json.loads((run / "export" / "model.json").read_text())
    assert written["export"]["parity"]["passed"] is True
    inp = tmp_path / "in"
    inp.mkdir()
    for p in sorted(Path(synth_data).rglob("*.jpg"))[:6]:
        shutil.copy(p, inp / p.name)
    assert cli.main(["score", "--model", str(run), "--input", str(inp), "--output", str(tmp_path / "out"),
                     "--engine", "onnx-int8"]) == 0
    assert "onnx-int8 engine" in capsys.readouterr().out
    df = read_predictions(str(tmp_path / "out"))
    assert len(df) == 6 and df["error"].isna().all()
