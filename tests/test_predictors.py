"""Predictors and the scoring driver's flag checks (no Ray started here)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from leukray import cli
from leukray.model import create_model, save_model

CLASSES = ["Benign", "Early", "Pre", "Pro"]
SIZE = 32


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny untrained leuknet saved as a run directory (no training, no Ray)."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    save_model(run / "model.pt", create_model("leuknet", len(CLASSES)).eval(),
               {"arch": "leuknet", "classes": CLASSES, "image_size": SIZE,
                "mean": [0.8, 0.67, 0.7], "std": [0.12, 0.17, 0.1]})
    return run


@pytest.fixture(scope="module")
def exported_run(run_dir):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from leukray.export import export_model

    export_model(run_dir, run_dir / "export")
    return run_dir


def _inputs(root):
    from PIL import Image

    root.mkdir()
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(root / "a.jpg")
    return root


@pytest.mark.parametrize("flags, message", [
    (["--explain", "--engine", "onnx"], "--explain needs --engine torch"),
    (["--batch-size", "0"], "--batch-size and --rows-per-part must be at least 1"),
    (["--actors", "0"], "must be positive"),
])
def test_bad_flags_with_overwrite_keep_existing_parts(exported_run, tmp_path, capsys, flags, message):
    """Issue 16: `--overwrite --explain --engine onnx` deleted every part, then exited 2."""
    out = tmp_path / "out"
    out.mkdir()
    part = out / "part-0123456789abcdef.parquet"
    part.write_bytes(b"an earlier run's predictions")
    code = cli.main(["score", "--model", str(exported_run), "--input", str(_inputs(tmp_path / "in")),
                     "--output", str(out), "--overwrite", *flags])
    assert code == 2
    assert message in capsys.readouterr().err
    assert part.read_bytes() == b"an earlier run's predictions"
    assert sorted(p.name for p in out.iterdir()) == [part.name], "nothing written either"


def test_missing_model_with_overwrite_keeps_existing_parts(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    part = out / "part-0123456789abcdef.parquet"
    part.write_bytes(b"x")
    code = cli.main(["score", "--model", str(tmp_path / "no-such-run"), "--input", str(_inputs(tmp_path / "in")),
                     "--output", str(out), "--overwrite"])
    assert code == 2 and "no model at" in capsys.readouterr().err and part.exists()


def test_read_model_meta_builds_no_network(run_dir, monkeypatch):
    import leukray.model
    from leukray.predictors import read_model_meta

    def no_network(*a, **k):
        raise AssertionError("read_model_meta built the network")

    monkeypatch.setattr(leukray.model, "create_model", no_network)
    meta = read_model_meta(run_dir)
    assert meta["classes"] == CLASSES and meta["image_size"] == SIZE and len(meta["model_id"]) == 16


def test_read_model_meta_of_onnx_matches_model_pt(exported_run):
    from leukray.predictors import read_model_meta

    assert read_model_meta(exported_run, "onnx")["model_id"] == read_model_meta(exported_run)["model_id"]


def test_both_engines_share_the_base_and_agree(exported_run):
    from leukray.predictors import OnnxPredictor, TorchPredictor, create_predictor

    torch_p, onnx_p = create_predictor("torch", exported_run), create_predictor("onnx", exported_run)
    assert isinstance(torch_p, TorchPredictor) and isinstance(onnx_p, OnnxPredictor)
    for p in (torch_p, onnx_p):  # set by Predictor.__init__, not class attributes
        assert (p.classes, p.benign, p.image_size, p.explain_dir) == (CLASSES, 0, SIZE, None)
    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    np.testing.assert_allclose(onnx_p.predict_images(images), torch_p.predict_images(images), atol=1e-5)
    with pytest.raises(ValueError, match="cannot explain"):
        onnx_p.heatmaps(images, [0, 1, 2])


def test_benign_index_and_probabilities():
    from leukray.model import probabilities
    from leukray.predictors import benign_index

    assert benign_index(["Early", "BENIGN", "Pro"]) == 1 and benign_index(["a", "b"]) is None
    p = probabilities(torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=torch.bfloat16))
    assert p.dtype == torch.float32 and torch.allclose(p.sum(1), torch.ones(2)) and p[1, 0] > 0.99


def test_export_and_infer_import_no_circle():
    import subprocess
    import sys

    code = ("import sys, leukray.export; assert 'leukray.infer' not in sys.modules, 'export imports infer'; "
            "import leukray.predictors")
    subprocess.run([sys.executable, "-c", code], check=True)


BF16_TOLERANCE = 2e-2  # max abs difference of probabilities, bf16 autocast vs fp32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_probabilities_match_fp32(run_dir):
    from leukray.predictors import TorchPredictor

    images = np.random.default_rng(0).integers(0, 256, (64, SIZE, SIZE, 3), dtype=np.uint8)
    fast = TorchPredictor(str(run_dir / "model.pt"), device="cuda", bf16=True)
    exact = TorchPredictor(str(run_dir / "model.pt"), device="cuda", bf16=False)
    assert fast.autocast and not exact.autocast
    diff = np.abs(fast.predict_images(images) - exact.predict_images(images)).max()
    assert diff <= BF16_TOLERANCE, diff


@pytest.mark.parametrize("no_error", [None, float("nan")], ids=["None", "NaN"])
def test_rows_without_an_error_reason_are_predicted(run_dir, no_error):
    """Between the decode tasks and the model actors Ray Data moves the batch through Arrow,
    which turns an all-None `error` column into NaN floats: those rows are fine and must get
    probabilities (a predictor that tested `e is None` left every row of such a batch null)."""
    from leukray.predictors import TorchPredictor

    predictor = TorchPredictor(str(run_dir))
    n, size = 3, predictor.image_size
    batch = {"path": np.array([f"/x/{i}.jpg" for i in range(n)], dtype=object),
             "image": np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8),
             "error": np.array([no_error, no_error, "not an image"], dtype=object)}
    out = predictor(batch)
    assert list(out["predicted_label"][:2]) != [None, None] and all(isinstance(x, str) for x in out["predicted_label"][:2])
    assert np.isfinite(out["probs"][:2]).all() and np.isnan(out["probs"][2]).all()
    assert out["predicted_label"][2] is None


def test_an_onnx_actor_imports_no_torch_or_scipy(run_dir, tmp_path):
    """Each ONNX Runtime actor imports this module, builds its predictor and decodes, checks
    and scores its batches (the OOD score included, so the model has trust metadata here);
    torch, SciPy's optimizer or scipy.special at import cost every actor start 0.2-2 s of a CPU."""
    import subprocess
    import sys

    from PIL import Image

    from leukray.export import export_model
    from leukray.model import load_model
    from leukray.trust import TRUST_VERSION

    pytest.importorskip("onnxruntime")
    model, meta = load_model(run_dir)
    keep = ("format", "model_id", "leukray_version", "saved_at")
    trust = {"version": TRUST_VERSION, "temperature": 1.5, "ood_threshold": 100.0, "review_threshold": 0.5}
    save_model(tmp_path / "model.pt", model, {**{k: v for k, v in meta.items() if k not in keep}, "trust": trust})
    export_model(tmp_path, tmp_path / "export")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "smear.jpg")
    code = ("import sys; import numpy as np; from leukray.predictors import OnnxPredictor; "
            f"p = OnnxPredictor({str(tmp_path)!r}); "
            f"out = p({{'path': np.array([{str(tmp_path / 'smear.jpg')!r}, {str(tmp_path / 'model.pt')!r}])}}); "
            "assert out['error'][0] is None and np.isfinite(out['ood_score'][0]), out; "
            "assert out['error'][1] == 'not an image', out; "
            "print(sorted(m for m in ('torch', 'scipy.optimize', 'scipy.special') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_a_block_larger_than_the_batch_size_goes_to_the_model_in_batches(exported_run, engine):
    """A Ray task hands the predictor a whole block (`runtime.scoring_plan`'s rows_per_task,
    up to several --batch-size batches); each model call sees at most --batch-size images,
    failed rows are skipped, and the probabilities are the ones of one call per image."""
    from leukray.predictors import create_predictor

    predictor = create_predictor(engine, exported_run, batch_size=4)
    calls = []
    predict = predictor.predict
    predictor.predict = lambda images: calls.append(len(images)) or predict(images)
    n = 11
    images = np.random.default_rng(1).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    errors = np.array([None] * n, dtype=object)
    errors[5] = "not an image"
    out = predictor({"path": np.array([f"/x/{i}.jpg" for i in range(n)], dtype=object), "image": images.copy(),
                     "error": errors})
    assert calls == [4, 4, 2], calls
    ok = np.arange(n) != 5
    np.testing.assert_allclose(out["probs"][ok], predict(images[ok])[0], atol=1e-6)
    assert np.isnan(out["probs"][5]).all() and out["predicted_label"][5] is None


def test_explanations_of_a_block_are_made_in_batches_too(run_dir, tmp_path):
    """Grad-CAM holds activations and gradients of every image it explains at once: a block
    of several --batch-size batches is explained one batch at a time, every row still gets
    its overlay."""
    from leukray.predictors import TorchPredictor

    predictor = TorchPredictor(str(run_dir), explain_dir=str(tmp_path / "cams"), explain_threshold=0.0, batch_size=4)
    calls = []
    heatmaps = predictor.heatmaps
    predictor.heatmaps = lambda images, classes: calls.append(len(images)) or heatmaps(images, classes)
    n = 11
    errors = np.array([None] * n, dtype=object)
    errors[5] = "not an image"
    out = predictor({"path": np.array([f"/x/{i}.jpg" for i in range(n)], dtype=object), "error": errors,
                     "image": np.random.default_rng(2).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)})
    assert calls == [4, 4, 2], calls
    made = [p for p in out["explanation"] if p is not None]
    assert len(made) == n - 1 and out["explanation"][5] is None
    assert all(Path(p).is_file() for p in made)
