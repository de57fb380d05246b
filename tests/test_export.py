"""Exported ONNX and TorchScript files compute what the PyTorch model computes."""

import json

import numpy as np
import pytest
import torch

from leukray.model import create_model, load_model, save_model

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from leukray.benchmark import benchmark_engines  # noqa: E402
from leukray.export import OnnxPredictor, check_onnx_parity, export_model, read_onnx_meta  # noqa: E402

SIZE = 64
CLASSES = ["Benign", "Early", "Pre", "Pro"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny untrained leuknet saved as a run directory and exported next to it."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = create_model("leuknet", len(CLASSES)).eval()
    meta = save_model(run / "model.pt", model, {"arch": "leuknet", "classes": CLASSES, "image_size": SIZE,
                                                "mean": [0.8, 0.67, 0.7], "std": [0.12, 0.17, 0.1]})
    result = export_model(run, run / "export")
    return run, meta, result


def _images(n, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _torch_probs(run, images):
    model, _ = load_model(run)
    with torch.inference_mode():
        return torch.softmax(model(torch.from_numpy(images)), 1).numpy()


def test_files_and_onnx_parity(exported):
    run, meta, result = exported
    for key in ("onnx", "torchscript", "json"):
        assert (run / "export").joinpath(result[key].rsplit("/", 1)[-1]).is_file()
    assert not list((run / "export").glob(".tmp-*"))
    assert result["onnx_max_abs_diff"] <= 1e-4
    assert check_onnx_parity(run, result["onnx"], n=8, seed=3) <= 1e-4


def test_onnx_graph_signature(exported):
    proto = onnx.load(exported[2]["onnx"])
    (inp,), (out, logits) = proto.graph.input, proto.graph.output
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", SIZE, SIZE, 3]
    assert out.name == "probs" and logits.name == "logits"  # logits: calibrated, for ood_score


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load is deprecated, still supported
def test_torchscript_matches(exported):
    run, _, result = exported
    extra = {"leukray.json": ""}
    scripted = torch.jit.load(result["torchscript"], _extra_files=extra)
    assert json.loads(extra["leukray.json"])["model_id"] == exported[1]["model_id"]
    images = _images(5)  # another batch size than the trace's
    with torch.inference_mode():
        probs = scripted(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(probs, _torch_probs(run, images), atol=1e-5)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize("where", ["file", "export_dir", "run_dir"])
def test_onnx_predictor_matches_torch(exported, where):
    run, meta, result = exported
    path = {"file": result["onnx"], "export_dir": run / "export", "run_dir": run}[where]
    predictor = OnnxPredictor(str(path), threads=1)
    assert predictor.classes == CLASSES and predictor.meta["model_id"] == meta["model_id"]
    images = _images(3)
    probs = predictor.predict_images(images)
    assert probs.dtype == np.float32 and probs.shape == (3, len(CLASSES))
    np.testing.assert_allclose(probs, _torch_probs(run, images), atol=1e-5)


def test_onnx_predictor_scores_ray_batches(exported):
    """The Ray Data entry point inherited from infer.Predictor: failed rows stay NaN."""
    predictor = OnnxPredictor(exported[2]["onnx"])
    batch = {"path": np.array(["a", "b"], dtype=object), "image": _images(2),
             "error": np.array([None, "not an image"], dtype=object)}
    out = predictor(batch)
    assert out["predicted_label"][0] in CLASSES and out["predicted_label"][1] is None
    assert np.isfinite(out["probs"][0]).all() and np.isnan(out["probs"][1]).all()


def test_metadata_round_trips(exported):
    run, meta, result = exported
    on_disk = json.loads((run / "export" / "model.json").read_text())
    embedded = read_onnx_meta(result["onnx"])
    for m in (on_disk, embedded, result["meta"]):
        for key in ("model_id", "classes", "image_size", "arch", "mean", "std"):
            assert m[key] == meta[key], key
    assert embedded["export"]["output"]["softmax"] is True
    assert on_disk["export"]["onnx_max_abs_diff"] <= 1e-4


def test_missing_onnx_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="leukray export"):
        OnnxPredictor(str(tmp_path))


def test_benchmark_engines_reports_rates(exported):
    """The benchmark limits torch to `threads` while it runs, then gives the caller back its own
    thread count (a scoring actor or test calling it must not be left with 1 thread)."""
    run = exported[0]
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # any count other than the benchmark's, to see it restored
    try:
        stats = benchmark_engines(run, batch=2, size=32, threads=1, reps=1)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert stats["threads"] == 1
    assert stats["torch_images_per_s"] > 0 and stats["onnx_images_per_s"] > 0
