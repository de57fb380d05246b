"""Export a trained model to TorchScript and ONNX, and score with ONNX Runtime.

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
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leukray.infer import BENIGN, Predictor
from leukray.model import load_model, resolve_model_path

ONNX_FILENAME = "model.onnx"
TORCHSCRIPT_FILENAME = "model.torchscript.pt"
JSON_FILENAME = "model.json"
META_KEY = "leukray"
# Opset 17 is supported by every onnxruntime release since 1.14 and covers all our layers
# (Hardswish, SiLU, adaptive pooling); a newer opset would only narrow who can load the file.
OPSET = 17
# Export is refused when ONNX Runtime disagrees with PyTorch by more than this.
PARITY_TOLERANCE = 1e-4


class ProbsModel(nn.Module):
    """The eval model followed by softmax: what every exported file computes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(image).float(), 1)


def _meta_json(meta: dict[str, Any]) -> str:
    # default=str: run metadata may hold values json cannot encode (paths); never fail on them.
    return json.dumps(meta, sort_keys=True, default=str)


def _example(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


def _export_onnx(model: nn.Module, path: Path, size: int, meta: dict[str, Any] | None = None) -> None:
    """Write `ProbsModel(model)` as ONNX with a dynamic batch axis and optional metadata.

    Uses the TorchScript-based exporter (dynamo=False): it needs only the `onnx` package,
    whereas the default torch.export-based exporter also needs `onnxscript`, and it
    handles every architecture we build.
    """
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy exporter": chosen on purpose
        torch.onnx.export(
            ProbsModel(model).eval(), (_example(2, size),), str(path), dynamo=False,
            input_names=["image"], output_names=["probs"], opset_version=OPSET,
            dynamic_axes={"image": {0: "batch"}, "probs": {0: "batch"}},
        )
    proto = onnx.load(str(path))
    if meta is not None:
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_KEY, _meta_json(meta)
        proto.doc_string = f"leukray {meta.get('arch')} model {meta.get('model_id')}: uint8 NHWC image -> probs"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _export_torchscript(model: nn.Module, path: Path, size: int, meta: dict[str, Any]) -> None:
    # check_inputs with another batch size: the trace must not bake in the batch dimension.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; asked for anyway
        traced = torch.jit.trace(ProbsModel(model).eval(), (_example(2, size),),
                                 check_inputs=[(_example(3, size, seed=1),)])
        torch.jit.save(traced, str(path), _extra_files={f"{META_KEY}.json": _meta_json(meta)})


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
        _export_onnx(model, tmp[ONNX_FILENAME], size, meta)
        diff = check_onnx_parity(model_path, tmp[ONNX_FILENAME])
        if not diff <= PARITY_TOLERANCE:
            raise RuntimeError(f"ONNX export differs from PyTorch by {diff:.2e} (> {PARITY_TOLERANCE:g})")
        _export_torchscript(model, tmp[TORCHSCRIPT_FILENAME], size, meta)
        meta["export"]["onnx_max_abs_diff"] = diff
        tmp[JSON_FILENAME].write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        for name, path in tmp.items():
            path.replace(out / name)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    return {"output_dir": str(out), "onnx": str(out / ONNX_FILENAME),
            "torchscript": str(out / TORCHSCRIPT_FILENAME), "json": str(out / JSON_FILENAME),
            "model_id": meta["model_id"], "onnx_max_abs_diff": diff, "meta": meta}


# --------------------------------------------------------------------------- ONNX Runtime

def resolve_onnx_path(path: str | os.PathLike) -> Path:
    """Accept an .onnx file, an export directory, or a run directory with an `export/` folder."""
    p = Path(path)
    if p.is_dir():
        p = next((c for c in (p / ONNX_FILENAME, p / "export" / ONNX_FILENAME) if c.is_file()), p / ONNX_FILENAME)
    if not p.is_file():
        raise FileNotFoundError(f"no ONNX model at {path} (run `leukray export` first)")
    return p


def _session(path: Path, threads: int, device: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # One pool of `threads` threads: Ray gives each actor a CPU share, and ORT's default
    # (one thread per core) would oversubscribe it the way torch's default does.
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # errors only
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("device cuda needs onnxruntime-gpu (CUDAExecutionProvider not available)")
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


def read_onnx_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The leukray metadata embedded in an exported ONNX file (same as model.json)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(resolve_onnx_path(path)), sess_options=opts, providers=["CPUExecutionProvider"])
    return _meta_from_session(session, path)


def _meta_from_session(session, path) -> dict[str, Any]:
    raw = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    if raw is None:
        raise ValueError(f"{path}: ONNX file has no '{META_KEY}' metadata (not exported by leukray)")
    return json.loads(raw)


class OnnxPredictor(Predictor):
    """`infer.Predictor` with ONNX Runtime in place of PyTorch: the same constructor
    arguments, `predict_images`, `meta`, `classes`, and the same Ray Data `__call__`, so
    `score` can switch engines by choosing the class and passing the ONNX path.
    """

    def __init__(self, model_path: str, threads: int = 1, device: str = "cpu"):
        # Predictor.__init__ is not called: it would load the PyTorch model.
        self.device = device
        self.path = resolve_onnx_path(model_path)
        self.session = _session(self.path, threads, device)
        self.meta = _meta_from_session(self.session, self.path)
        self.classes = list(self.meta["classes"])
        lower = [c.casefold() for c in self.classes]
        self.benign = lower.index(BENIGN) if BENIGN in lower else None

    def predict_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> class probabilities (N, C) float32."""
        x = np.ascontiguousarray(images, dtype=np.uint8)
        return self.session.run(["probs"], {"image": x})[0].astype(np.float32, copy=False)


def check_onnx_parity(model_path: str | os.PathLike, onnx_path: str | os.PathLike, n: int = 16, seed: int = 0) -> float:
    """Max abs difference of probabilities, PyTorch vs ONNX Runtime, on `n` random uint8 images."""
    model, meta = load_model(model_path)
    x = _example(n, int(meta["image_size"]), seed)
    with torch.inference_mode():
        expected = ProbsModel(model)(x).numpy()
    got = OnnxPredictor(str(onnx_path), threads=1).predict_images(x.numpy())
    return float(np.abs(expected - got).max())


# --------------------------------------------------------------------------- benchmark

def _median_rates(engines: dict, batch: int, reps: int) -> dict[str, float]:
    """Images/s per engine: median of `reps` timed calls after one warm-up each. Engines
    are timed in turn within each repetition so that changing load on a shared machine
    affects all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    for fn in engines.values():
        fn()  # warm-up: first calls allocate memory and pick kernels
    for _ in range(reps):
        for name, fn in engines.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: batch / statistics.median(t) for name, t in times.items()}


def benchmark_engines(model_path: str | os.PathLike, batch: int = 64, size: int = 128,
                      threads: int = 2, reps: int = 5) -> dict[str, Any]:
    """Images/s of PyTorch vs ONNX Runtime on CPU for one model, both limited to
    `threads` threads, on the same random uint8 batch.

    The ONNX file is exported to a temporary folder at `size`, so any model file works
    whatever its trained image size (the network is size-agnostic).
    """
    model, meta = load_model(model_path)
    probs_model = ProbsModel(model).eval()
    x = _example(batch, size)
    xn = x.numpy()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
            path = Path(tmp) / ONNX_FILENAME
            _export_onnx(model, path, size)
            session = _session(path, threads, "cpu")
            rates = _median_rates({"torch": lambda: probs_model(x),
                                   "onnx": lambda: session.run(["probs"], {"image": xn})}, batch, reps)
    finally:
        torch.set_num_threads(previous)
    return {"arch": meta["arch"], "batch": batch, "size": size, "threads": threads, "reps": reps,
            "torch_images_per_s": rates["torch"], "onnx_images_per_s": rates["onnx"],
            "onnx_speedup": rates["onnx"] / rates["torch"]}
