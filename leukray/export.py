"""Export a trained model to TorchScript and ONNX (ONNX Runtime scores it: `leukray.predictors`).

Both exported files take exactly what `leukray.data.preprocess` produces, a uint8 batch
(N, H, W, 3) with H = W = the model's `image_size`, and return softmax class
probabilities (N, C) float32 in the order of `meta["classes"]`. Probabilities, not logits,
so a consumer outside leukray needs no post-processing and gets the same numbers as
the `prob_*` columns of `leukray score`. Normalization is inside the graph (the model's
`normalize` layer), so no caller has to repeat it.

Files written by `export_model`:
- `model.onnx`: input `image` (uint8, dynamic batch), output `probs`; the model metadata
  is embedded as a JSON string under metadata_props key "leukray".
- `model.torchscript.pt`: traced; the same JSON is stored as the extra file "leukray.json".
- `model.json`: the same metadata, for people and tools that read neither format.

`model.pt` stays the reference format: it loads with `weights_only=True`, whereas
`torch.jit.load` runs the TorchScript code stored in the archive, so load exported
files only from sources you trust.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leukray import trust
from leukray.model import load_model, probabilities
from leukray.modelfile import resolve_model_path
from leukray.predictors import (  # noqa: F401 - OnnxPredictor, resolve_onnx_path: the export API
    INT8_FILENAME, ONNX_FILENAME, ONNX_META_KEY, OnnxPredictor, read_model_meta, resolve_onnx_path,
)

TORCHSCRIPT_FILENAME = "model.torchscript.pt"
JSON_FILENAME = "model.json"
# Opset 17 is supported by every onnxruntime release since 1.14 and covers all our layers
# (Hardswish, SiLU, adaptive pooling); a newer opset would only narrow who can load the file.
OPSET = 17
# Export is refused when ONNX Runtime disagrees with PyTorch by more than this.
PARITY_TOLERANCE = 1e-4


class ProbsModel(nn.Module):
    """The eval model, its logits divided by the temperature (`leukray.trust`: calibrated),
    then softmax: what every exported file computes. `logits=True` also returns the
    calibrated logits (the ONNX file's second output, for `ood_score`)."""

    def __init__(self, model: nn.Module, temperature: float = 1.0, logits: bool = False):
        super().__init__()
        self.model, self.temperature, self.logits = model, float(temperature), logits

    def forward(self, image: torch.Tensor):
        z = self.model(image).float() / self.temperature
        return (probabilities(z), z) if self.logits else probabilities(z)


def _meta_json(meta: dict[str, Any]) -> str:
    # default=str: run metadata may hold values json cannot encode (paths); never fail on them.
    return json.dumps(meta, sort_keys=True, default=str)


def _example(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


def export_onnx(model: nn.Module, path: Path, size: int, meta: dict[str, Any] | None = None) -> None:
    """Write `ProbsModel(model)` as ONNX with a dynamic batch axis and optional metadata.

    Uses the TorchScript-based exporter (dynamo=False): it needs only the `onnx` package,
    whereas the default torch.export-based exporter also needs `onnxscript`, and it
    handles every architecture we build.
    """
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy exporter": chosen on purpose
        torch.onnx.export(
            ProbsModel(model, trust.temperature(meta or {}), logits=True).eval(), (_example(2, size),), str(path),
            dynamo=False, input_names=["image"], output_names=["probs", "logits"], opset_version=OPSET,
            dynamic_axes={"image": {0: "batch"}, "probs": {0: "batch"}, "logits": {0: "batch"}},
        )
    embed_meta(path, meta)


def embed_meta(path: Path, meta: dict[str, Any] | None) -> None:
    """(Re)write the leukray metadata of an ONNX file in place, and check the file."""
    import onnx

    proto = onnx.load(str(path))
    if meta is not None:
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = ONNX_META_KEY, _meta_json(meta)
        proto.doc_string = f"leukray {meta.get('arch')} model {meta.get('model_id')}: uint8 NHWC image -> probs"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _export_torchscript(model: nn.Module, path: Path, size: int, meta: dict[str, Any]) -> None:
    # check_inputs with another batch size: the trace must not bake in the batch dimension.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; asked for anyway
        traced = torch.jit.trace(ProbsModel(model, trust.temperature(meta)).eval(), (_example(2, size),),
                                 check_inputs=[(_example(3, size, seed=1),)])
        torch.jit.save(traced, str(path), _extra_files={f"{ONNX_META_KEY}.json": _meta_json(meta)})


def export_model(model_path_or_run_dir: str | os.PathLike, output_dir: str | os.PathLike) -> dict[str, Any]:
    """Write model.onnx, model.torchscript.pt and model.json into `output_dir`.

    The ONNX file is checked against PyTorch on random inputs before the function returns;
    a difference above PARITY_TOLERANCE raises instead of leaving a wrong model behind.
    Returns paths, the ONNX parity and the metadata written.
    """
    model_path = resolve_model_path(model_path_or_run_dir)
    model, meta = load_model(model_path)
    size = int(meta["image_size"])
    meta = {**meta, "export": {
        "source": str(model_path) if isinstance(model_path, str) else str(model_path.resolve()), "input": {"name": "image", "dtype": "uint8", "layout": "NHWC",
                                                        "shape": ["batch", size, size, 3]},
        "output": {"name": "probs", "dtype": "float32", "shape": ["batch", len(meta["classes"])],
                   "softmax": True},
        "onnx_opset": OPSET, "torch_version": torch.__version__}}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Write under temporary names, rename once verified: a reader never sees a half export.
    tmp = {name: out / f".tmp-{os.getpid()}-{name}" for name in (ONNX_FILENAME, TORCHSCRIPT_FILENAME, JSON_FILENAME)}
    try:
        export_onnx(model, tmp[ONNX_FILENAME], size, meta)
        diff = check_onnx_parity(model_path, tmp[ONNX_FILENAME])
        if not diff <= PARITY_TOLERANCE:
            raise RuntimeError(f"ONNX export differs from PyTorch by {diff:.2e} (> {PARITY_TOLERANCE:g})")
        meta["export"]["onnx_max_abs_diff"] = diff
        # On record inside the file: `score --engine auto` picks only a checked export.
        meta["export"]["parity"] = {"passed": True, "max_abs_diff": diff, "tolerance": PARITY_TOLERANCE}
        embed_meta(tmp[ONNX_FILENAME], meta)
        _export_torchscript(model, tmp[TORCHSCRIPT_FILENAME], size, meta)
        tmp[JSON_FILENAME].write_text(model_json_text(meta))
        for name, path in tmp.items():
            path.replace(out / name)
        _drop_stale_int8(out, meta["model_id"])
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    return {"output_dir": str(out), "onnx": str(out / ONNX_FILENAME),
            "torchscript": str(out / TORCHSCRIPT_FILENAME), "json": str(out / JSON_FILENAME),
            "model_id": meta["model_id"], "onnx_max_abs_diff": diff, "meta": meta}


def model_json_text(meta: dict) -> str:
    """model.json as export writes it (and `modelcard` rewrites it with the card)."""
    return json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n"


def _drop_stale_int8(out: Path, model_id: str) -> None:
    """An int8 file of an earlier model must not sit beside the new export."""
    int8 = out / INT8_FILENAME
    if int8.is_file() and read_onnx_meta(int8).get("model_id") != model_id:
        int8.unlink()


def export_with_options(model: str | os.PathLike, output_dir: str | os.PathLike, cfg) -> dict[str, Any]:
    """`leukray export`: the fp32 files, then model.int8.onnx when `cfg.int8` (an ExportConfig)."""
    info = export_model(model, output_dir)
    if cfg.int8:
        info["int8"] = export_int8(model, output_dir, cfg.int8_method, cfg.calibration_images)
    return info


# --------------------------------------------------------------------------- reading back

def read_onnx_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The leukray metadata embedded in an exported ONNX file (same as model.json)."""
    return read_model_meta(path, engine="onnx")


def check_onnx_parity(model_path: str | os.PathLike, onnx_path: str | os.PathLike, n: int = 16, seed: int = 0) -> float:
    """Max abs difference of probabilities, PyTorch vs ONNX Runtime, on `n` random uint8 images."""
    model, meta = load_model(model_path)
    x = _example(n, int(meta["image_size"]), seed)
    with torch.inference_mode():
        expected = ProbsModel(model, trust.temperature(meta))(x).numpy()
    got = OnnxPredictor(str(onnx_path), threads=1).predict_images(x.numpy())
    return float(np.abs(expected - got).max())


# --------------------------------------------------------------------------- int8

INT8_METHODS = ("static", "dynamic")


def _calibration_images(run_dir: Path, size: int, limit: int) -> np.ndarray:
    """Up to `limit` validation images of the run, decoded as scoring decodes them: what
    static quantization measures activation ranges on (never the test split)."""
    import pandas as pd

    from leukray.data import preprocess, read_bytes
    from leukray.rundir import SPLIT_FILE

    split_file = run_dir / SPLIT_FILE
    if not split_file.is_file():
        raise FileNotFoundError(f"static int8 calibrates on the run's validation images: no {split_file} "
                                f"(give a run directory, or --int8-method dynamic)")
    split = pd.read_csv(split_file)
    val = split[split["split"] == "val"]["path"].tolist()
    step = max(1, len(val) // max(1, limit))  # spread over the split, not its first folder
    images = [preprocess(read_bytes(p), size)[0] for p in val[::step][:limit]]
    if not images:
        raise ValueError(f"{split_file} lists no validation images to calibrate on")
    return np.stack(images)


class _Calibration:
    """onnxruntime.quantization's CalibrationDataReader protocol over a uint8 image array."""

    def __init__(self, images: np.ndarray, batch: int = 32):
        self.batches = iter([{"image": images[i:i + batch]} for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self.batches, None)


def quantize_int8(fp32_onnx: Path, out: Path, method: str, calibration: np.ndarray | None) -> None:
    """int8 weights (dynamic) or int8 weights and activations with QDQ nodes calibrated on
    `calibration` (static), per channel; ONNX Runtime's pre-processing (shape inference,
    graph optimisation) first, as its quantization guide asks."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name(out.name + ".pre.onnx")
    try:
        quant_pre_process(str(fp32_onnx), str(pre))
        if method == "dynamic":
            quantize_dynamic(str(pre), str(out), per_channel=True, weight_type=QuantType.QInt8)
        else:
            quantize_static(str(pre), str(out), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        pre.unlink(missing_ok=True)


def export_int8(model_path_or_run_dir: str | os.PathLike, output_dir: str | os.PathLike, method: str = "static",
                calibration_images: int = 256) -> dict[str, Any]:
    """Write `model.int8.onnx` beside the fp32 `model.onnx` of `output_dir` (exported first).

    int8 is not exact, so nothing picks it by default (`score --engine onnx-int8` asks for it);
    the file records how it was made and how far it strays from fp32 on the calibration
    images. Its accuracy cost on a test split: `leukray benchmark --int8-run RUN_DIR`.
    """
    if method not in INT8_METHODS:
        raise ValueError(f"--int8-method must be one of {', '.join(INT8_METHODS)}, got {method!r}")
    model_path = Path(resolve_model_path(model_path_or_run_dir))
    out = Path(output_dir)
    fp32 = out / ONNX_FILENAME
    meta = read_onnx_meta(fp32)
    size = int(meta["image_size"])
    check = _calibration_images(model_path.parent, size, calibration_images) if method == "static" else \
        _example(32, size).numpy()
    tmp = out / f".tmp-{os.getpid()}-{INT8_FILENAME}"
    try:
        quantize_int8(fp32, tmp, method, check)
        ref = OnnxPredictor(str(fp32), threads=1).predict_images(check)
        got = OnnxPredictor(str(tmp), threads=1).predict_images(check)
        quant = {"method": method, "per_channel": True, "calibration_images": len(check) if method == "static" else 0,
                 "max_abs_diff_vs_fp32": float(np.abs(ref - got).max()),
                 "same_prediction_share": float((ref.argmax(1) == got.argmax(1)).mean()), "checked_on": len(check)}
        meta = {**meta, "export": {**meta["export"], "parity": {"passed": False, "reason": "int8 is not exact"},
                                   "quantization": quant}}
        embed_meta(tmp, meta)
        tmp.replace(out / INT8_FILENAME)
    finally:
        tmp.unlink(missing_ok=True)
    return {"int8": str(out / INT8_FILENAME), "model_id": meta["model_id"], **quant}


# --------------------------------------------------------------------------- after training

def export_after_training(run_dir: str | os.PathLike, log=print) -> dict[str, Any] | None:
    """`leukray train` ends here: export the new model.pt so that `score` (engine auto) runs
    it in ONNX Runtime. Best effort: a missing onnx/onnxruntime or a failed parity check is
    one warning line, and scoring falls back to PyTorch; the training run still succeeds."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        log(f"[leukray] warning: not exported to ONNX ({', '.join(missing)} not installed: pip install "
            f"'leukray[export]'); `leukray score` will use PyTorch")
        return None
    try:
        info = export_model(run_dir, Path(run_dir) / "export")
    except Exception as e:  # a failed export must not fail the training run that produced the model
        log(f"[leukray] warning: ONNX export failed ({type(e).__name__}: {e}); `leukray score` will use PyTorch")
        return None
    log(f"[leukray] exported to {info['output_dir']} (ONNX parity {info['onnx_max_abs_diff']:.1e}): "
        f"`leukray score` runs it in ONNX Runtime")
    return info
