"""Predictors and the scoring driver's flag checks (no Ray started here)."""

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
