"""Predictors: a trained model behind one interface, whatever runs it.

`Predictor` owns what every engine shares: the class list and the Benign index, the
output columns of a scored batch, and the Ray Data `__call__` that `leukray score` maps
over decoded batches. A subclass only says how uint8 images become probabilities
(`predict`: calibrated probabilities and logits) and, if it can, how to explain them
(`heatmaps`); the trust columns (`leukray.trust.verdicts`) come from those:
- `TorchPredictor`: the PyTorch model of `model.pt` (CPU or CUDA, bf16 autocast on CUDA);
- `OnnxPredictor`: the `model.onnx` written by `leukray export`, in ONNX Runtime.

The ONNX file's reading side (file name, metadata key, session) lives here, so that
`export` (which writes the file) imports this module and never the other way round.
`read_model_meta` reads either file's metadata without building the network: the
scoring driver and `evaluate` need the classes, not the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from leukray import storage, trust
from leukray.data import preprocess_batch
from leukray.inputs import item_key
from leukray.modelfile import read_model_meta as read_torch_meta
from leukray.modelfile import resolve_model_path

# No torch (nor anything importing it) at module level: every ONNX Runtime actor imports this
# module, and torch alone took ~1.7 s of a CPU per actor start on 2 cores; the PyTorch side
# imports it where it is used (tests/test_predictors.py checks the module stays light).

BENIGN = "benign"  # the one non-malignant class: malignant probability = 1 - P(Benign)
ONNX_FILENAME = "model.onnx"
INT8_FILENAME = "model.int8.onnx"  # `leukray export --int8`: an option, never chosen by "auto"
ONNX_META_KEY = "leukray"  # metadata_props key holding the model's JSON metadata
ENGINES = ("torch", "onnx", "onnx-int8")
AUTO = "auto"  # the default: `select_engine` picks one of ENGINES
ONNX_FILES = {"onnx": ONNX_FILENAME, "onnx-int8": INT8_FILENAME}


def benign_index(classes: list[str]) -> int | None:
    """Index of the Benign class (case-insensitive), None when the model has none."""
    lower = [c.casefold() for c in classes]
    return lower.index(BENIGN) if BENIGN in lower else None


# --------------------------------------------------------------------------- model files

def resolve_onnx_path(path: str | os.PathLike, filename: str = ONNX_FILENAME) -> Path:
    """Accept an .onnx file, an export directory, or a run directory (or its model.pt) with
    an `export/` folder."""
    p = Path(path)
    if p.suffix == ".pt":  # `--model RUN_DIR/model.pt`: its run directory's export
        p = p.parent
    if p.is_dir():
        p = next((c for c in (p / filename, p / "export" / filename) if c.is_file()), p / filename)
    if not p.is_file():
        flag = " --int8" if filename == INT8_FILENAME else ""
        raise FileNotFoundError(f"no ONNX model at {path} (run `leukray export{flag}` first)")
    return p


def resolve_model_file(engine: str, path: str | os.PathLike) -> str:
    """The file an engine loads for a run directory or model path (FileNotFoundError if none)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r} (one of {', '.join(ENGINES)})")
    if engine in ONNX_FILES:
        return str(resolve_onnx_path(path, ONNX_FILES[engine]))
    return str(resolve_model_path(path))


def _parse_onnx_meta(raw: str | None, path) -> dict[str, Any]:
    if raw is None:
        raise ValueError(f"{path}: ONNX file has no '{ONNX_META_KEY}' metadata (not exported by leukray)")
    return json.loads(raw)


def _onnx_meta(path: str) -> dict[str, Any]:
    import onnx

    proto = onnx.load(path, load_external_data=False)  # the graph is parsed, never built
    return _parse_onnx_meta({p.key: p.value for p in proto.metadata_props}.get(ONNX_META_KEY), path)


def read_model_meta(path: str | os.PathLike, engine: str = "torch") -> dict[str, Any]:
    """The metadata of a model (classes, image_size, model_id, ...) without building it.

    Of model.pt only the pickled dict is read, without torch (`leukray.modelfile`); a URI is
    downloaded.
    """
    file = resolve_model_file(engine, path)
    if engine in ONNX_FILES:
        return _onnx_meta(file)
    return read_torch_meta(file)


# --------------------------------------------------------------------------- engine choice

def onnx_export_problem(model: str | os.PathLike) -> str | None:
    """Why RUN_DIR/export/model.onnx may not stand in for model.pt, or None when it may:
    it exists, ONNX Runtime is installed, it is this model (same model_id) with the same
    trust metadata (a refit keeps the weights and model_id but changes the thresholds) and
    its export recorded a passed parity check. FileNotFoundError when there is no model.pt."""
    from leukray.rundir import EXPORT_DIR

    if storage.is_uri(model):
        return "the ONNX export is only picked up from a local run directory"
    model_pt = resolve_model_path(model)
    onnx_file = Path(model_pt).parent / EXPORT_DIR / ONNX_FILENAME
    if not onnx_file.is_file():
        return f"no {onnx_file} (written by `leukray train` or `leukray export`)"
    import importlib.util

    if not (importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx")):
        return "onnx/onnxruntime are not installed (pip install 'leukray[export]')"
    try:
        meta = _onnx_meta(str(onnx_file))
    except Exception as e:  # any unreadable file means "not usable", never a failed command
        return f"{onnx_file} is unreadable ({type(e).__name__}: {e})"
    torch_meta = read_torch_meta(model_pt)
    own = torch_meta["model_id"]
    if meta.get("model_id") != own:
        return f"{onnx_file} is of another model ({meta.get('model_id')}, model.pt is {own}): re-run `leukray export`"
    if _same_json(meta.get("trust")) != _same_json(torch_meta.get("trust")):
        return f"{onnx_file} holds older trust metadata than model.pt (refitted since): re-run `leukray export`"
    if not (meta.get("export") or {}).get("parity", {}).get("passed"):
        return f"{onnx_file} has no passed parity check on record: re-run `leukray export`"
    return None


def _same_json(value: Any) -> str:
    """`value` as the export's JSON holds it: compared as text, so that NaN equals NaN."""
    return json.dumps(value, sort_keys=True, default=str)


def select_engine(engine: str, model: str | os.PathLike, gpu: bool = False, explain: bool = False) -> tuple[str, str]:
    """The engine that scores, and why: `engine` itself unless it is "auto".

    "auto" is the fastest exact engine for the job: ONNX Runtime on CPUs when the run has an
    export of this very model that matched PyTorch at export (it runs leuknet ~2.3x faster
    than PyTorch on 2 cores); PyTorch on GPUs (the CPU onnxruntime package has no CUDA) and
    for --explain (Grad-CAM needs the PyTorch graph's gradients), and whenever the export is
    missing, stale or unchecked. int8 is never picked: it is not exact.
    """
    if engine != AUTO:
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r} (one of {AUTO}, {', '.join(ENGINES)})")
        return engine, f"--engine {engine}"
    if gpu:
        return "torch", "auto: PyTorch on GPUs"
    if explain:
        return "torch", "auto: PyTorch, as --explain needs its gradients (Grad-CAM)"
    problem = onnx_export_problem(model)
    if problem:
        return "torch", f"auto: PyTorch, not ONNX Runtime: {problem}"
    return "onnx", "auto: ONNX Runtime on export/model.onnx (this model, parity checked at export)"


def onnx_session(path: str | os.PathLike, threads: int, device: str = "cpu"):
    """An ONNX Runtime session limited to `threads` threads: Ray gives each actor a CPU
    share, and ORT's default (one thread per core) would oversubscribe it."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
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


# --------------------------------------------------------------------------- predictors

class Predictor:
    """Ray Data callable class: built once per actor, then scores batches.

    Batches carry a `path` column and, once decoded by `preprocess_batch` in the decode
    stage, `image` and `error`; a batch without `image` is decoded here (a predictor used
    on its own). Adds `probs` (calibrated; NaN rows for failed images), `predicted_label`
    (None unless assessable), the trust columns `assessable`, `quality_flags`, `ood_score`,
    `needs_review` and, with an explain folder, `explanation` (PNG path or None).
    `review_threshold` overrides the model's (`score --review-threshold`). `batch_size`: at
    most this many images per model call (a Ray task's block may hold several batches; ONNX
    Runtime on one core was ~18 % slower per image at 256 than at 64, one-off).
    """

    def __init__(self, meta: dict[str, Any], explain_dir: str | None = None, explain_threshold: float = 0.5,
                 review_threshold: float | None = None, batch_size: int | None = None):
        self.meta = meta
        self.classes = list(meta["classes"])
        self.benign = benign_index(self.classes)
        self.image_size = int(meta["image_size"])
        self.explain_dir, self.explain_threshold = explain_dir, explain_threshold
        self.review_threshold = review_threshold
        self.batch_size = batch_size

    def _chunks(self, rows: np.ndarray) -> list[np.ndarray]:
        """`rows` in model batches of at most `batch_size`."""
        step = self.batch_size or max(1, len(rows))
        return [rows[i:i + step] for i in range(0, len(rows), step)]

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, 3) -> calibrated (probabilities, logits), each (N, C) float32."""
        raise NotImplementedError

    def predict_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> calibrated class probabilities (N, C) float32."""
        return self.predict(images)[0]

    def heatmaps(self, images: np.ndarray, classes: list[int]) -> np.ndarray:
        """Explain hook: float (N, H, W) maps in [0, 1] of the evidence for `classes`."""
        raise ValueError(f"{type(self).__name__} cannot explain predictions (use the torch engine)")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "image" not in batch:
            batch = preprocess_batch(batch, self.image_size, trust.decode_checks(self.meta))
        images = batch.pop("image")
        # an all-None column may come back from Arrow as NaN floats: a row failed only if it has a reason
        ok = np.array([not isinstance(e, str) for e in batch["error"]], dtype=bool)
        probs = np.full((len(ok), len(self.classes)), np.nan, np.float32)
        logits = probs.copy()
        for rows in self._chunks(np.flatnonzero(ok)):
            probs[rows], logits[rows] = self.predict(np.ascontiguousarray(images[rows]))
        batch.update(trust.verdicts(probs, logits, ok, batch.get("quality_flags"), self.meta, self.review_threshold))
        best = np.nan_to_num(probs, nan=-1.0).argmax(1)
        batch["predicted_label"] = np.array([self.classes[i] if good else None
                                             for i, good in zip(best, batch["assessable"])], dtype=object)
        batch["probs"] = probs
        if self.explain_dir:
            batch["explanation"] = self.explain(batch, images, probs, ok)
        return batch

    def explain(self, batch: dict, images: np.ndarray, probs: np.ndarray, ok: np.ndarray) -> np.ndarray:
        """Overlays for rows with malignant probability >= the threshold; the PNG path per
        row (None elsewhere). Names derive from path and member, so a re-run overwrites
        rather than duplicates."""
        from leukray.explain import save_overlay

        out = np.full(len(ok), None, dtype=object)
        malignant = 1.0 - probs[:, self.benign] if self.benign is not None else probs.max(1)
        rows = np.flatnonzero(ok & (np.nan_to_num(malignant, nan=-1.0) >= self.explain_threshold))
        if not len(rows):
            return out
        cls = probs[rows].argmax(1)
        cams = np.concatenate([self.heatmaps(np.ascontiguousarray(images[part]), probs[part].argmax(1).tolist())
                               for part in self._chunks(rows)])
        members = batch.get("member")
        os.makedirs(self.explain_dir, exist_ok=True)
        for r, cam, c in zip(rows, cams, cls):
            member = members[r] if members is not None and isinstance(members[r], str) else None
            name = hashlib.sha1(item_key(str(batch["path"][r]), member).encode()).hexdigest()[:16]
            out[r] = os.path.join(self.explain_dir, name + ".png")
            save_overlay(out[r], images[r], cam, title=f"{self.classes[c]} {probs[r, c]:.2f}")
        return out


class TorchPredictor(Predictor):
    """The PyTorch model of model.pt. On CUDA it runs under bf16 autocast (`bf16=True`):
    probabilities stay within the tolerance the parity test states, at a fraction of
    the fp32 cost; on CPU it always runs fp32 (exact). Logits are divided by the model's
    temperature (`leukray.trust`), as the exported files do inside their graph."""

    def __init__(self, model_path: str, threads: int = 1, device: str = "cpu", explain_dir: str | None = None,
                 explain_threshold: float = 0.5, bf16: bool = True, review_threshold: float | None = None,
                 batch_size: int | None = None):
        import torch

        from leukray.model import load_model

        torch.set_num_threads(max(1, int(threads)))
        self.device = device
        self.model, meta = load_model(model_path, device)
        self.autocast = bf16 and device.startswith("cuda")
        self.temperature = trust.temperature(meta)
        super().__init__(meta, explain_dir, explain_threshold, review_threshold, batch_size)

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from leukray.model import probabilities

        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=self.autocast):
            x = torch.from_numpy(images).to(self.device)
            logits = self.model(x).float() / self.temperature
            return probabilities(logits).cpu().numpy(), logits.cpu().numpy()

    def heatmaps(self, images: np.ndarray, classes: list[int]) -> np.ndarray:
        from leukray.explain import gradcam

        return gradcam(self.model, images, classes)


class OnnxPredictor(Predictor):
    """model.onnx (from `leukray export`) in ONNX Runtime: the graph takes uint8 NHWC and
    returns calibrated probabilities and logits, normalization, temperature and softmax
    included. Files exported before the `logits` output existed give probabilities only
    (and hold no trust metadata to need the logits)."""

    def __init__(self, model_path: str, threads: int = 1, device: str = "cpu", **kw: Any):
        self.device = device
        self.path = resolve_onnx_path(model_path)
        self.session = onnx_session(self.path, threads, device)
        raw = self.session.get_modelmeta().custom_metadata_map.get(ONNX_META_KEY)
        meta = _parse_onnx_meta(raw, self.path)
        self.outputs = [o.name for o in self.session.get_outputs() if o.name in ("probs", "logits")]
        if trust.of(meta) is not None and "logits" not in self.outputs:
            raise ValueError(f"{self.path}: exported by an older leukray without calibrated logits; export it again")
        super().__init__(meta, **kw)

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(images, dtype=np.uint8)
        out = [o.astype(np.float32, copy=False) for o in self.session.run(self.outputs, {"image": x})]
        return out[0], out[1] if len(out) > 1 else np.full_like(out[0], np.nan)


PREDICTORS: dict[str, type[Predictor]] = {"torch": TorchPredictor, "onnx": OnnxPredictor,
                                          "onnx-int8": OnnxPredictor}


def create_predictor(engine: str, model_path: str | os.PathLike, **kw: Any) -> Predictor:
    """A predictor of `engine` (one of ENGINES, or "auto": `select_engine`) for a run
    directory or model file."""
    engine, _ = select_engine(engine, model_path, kw.get("device", "cpu").startswith("cuda"),
                              bool(kw.get("explain_dir")))
    return PREDICTORS[engine](resolve_model_file(engine, model_path), **kw)
