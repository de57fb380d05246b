"""Batch inference with Ray Data: score files with a trained model, write Parquet.

Pipeline: a Ray Dataset of file paths -> `map_batches(Predictor, compute=ActorPoolStrategy)`
where each actor loads the model once and runs the shared `preprocess_batch` then the
network -> the driver streams result batches into Parquet part files.

Guarantees:
- one row per input file: files that cannot be read or decoded get a row with `error`
  set and null predictions, the job goes on;
- part files are written atomically under deterministic names (a hash of the paths they
  hold), so a killed run leaves only whole parts; re-running into the same output skips
  files already scored (same path and sha256) and re-scores changed ones, and
  `overwrite=True` starts over. Nothing is ever appended twice.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import torch

import leukray
from leukray import runtime, storage
from leukray.config import RayConfig, ScoreConfig
from leukray.data import preprocess_batch, read_bytes, read_member
from leukray.inputs import Inputs, item_key, list_inputs
from leukray.output import PartWriter, error_batch, result_table, resume
from leukray.model import load_model, resolve_model_path

BENIGN = "benign"


class Predictor:
    """Ray Data callable class: the model is loaded once per actor, then scores batches.

    Accepts batches of paths (decodes them with `preprocess_batch`) or batches that
    already carry an `image` column (when decoding runs as a separate stage).
    """

    explain_dir: str | None = None  # Grad-CAM PNGs for suspicious images go here (torch engine)
    explain_threshold = 0.5

    def __init__(self, model_path: str, threads: int = 1, device: str = "cpu", explain_dir: str | None = None,
                 explain_threshold: float = 0.5):
        torch.set_num_threads(threads)
        self.device = device
        self.model, self.meta = load_model(model_path, device)
        self.classes = list(self.meta["classes"])
        lower = [c.casefold() for c in self.classes]
        self.benign = lower.index(BENIGN) if BENIGN in lower else None
        self.explain_dir, self.explain_threshold = explain_dir, explain_threshold

    def explain(self, batch: dict, images: np.ndarray, probs: np.ndarray, ok: np.ndarray) -> np.ndarray:
        """Grad-CAM overlays for rows with malignant probability >= the threshold; returns
        the PNG path per row (None elsewhere). Names derive from path and member, so a
        re-run overwrites rather than duplicates."""
        from leukray.explain import gradcam, save_overlay

        out = np.full(len(ok), None, dtype=object)
        malignant = 1.0 - probs[:, self.benign] if self.benign is not None else probs.max(1)
        rows = np.flatnonzero(ok & (np.nan_to_num(malignant, nan=-1.0) >= self.explain_threshold))
        if not len(rows):
            return out
        cls = probs[rows].argmax(1)
        cams = gradcam(self.model, np.ascontiguousarray(images[rows]), [int(c) for c in cls])
        members = batch.get("member")
        os.makedirs(self.explain_dir, exist_ok=True)
        for r, cam, c in zip(rows, cams, cls):
            key = item_key(str(batch["path"][r]), members[r] if members is not None and isinstance(members[r], str) else None)
            path = os.path.join(self.explain_dir, hashlib.sha1(key.encode()).hexdigest()[:16] + ".png")
            save_overlay(path, images[r], cam, title=f"{self.classes[c]} {probs[r, c]:.2f}")
            out[r] = path
        return out

    def predict_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> class probabilities (N, C) float32."""
        with torch.inference_mode():
            x = torch.from_numpy(images).to(self.device)
            return torch.softmax(self.model(x).float(), 1).cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "image" not in batch:
            batch = preprocess_batch(batch, self.meta["image_size"])
        images = batch.pop("image")
        ok = np.array([e is None for e in batch["error"]], dtype=bool)
        probs = np.full((len(ok), len(self.classes)), np.nan, np.float32)
        if ok.any():
            probs[ok] = self.predict_images(np.ascontiguousarray(images[ok]))
        best = np.nan_to_num(probs, nan=-1.0).argmax(1)
        batch["predicted_label"] = np.array([self.classes[i] if good else None for i, good in zip(best, ok)], dtype=object)
        batch["probs"] = probs
        if self.explain_dir:
            batch["explanation"] = self.explain(batch, images, probs, ok)
        return batch


# --------------------------------------------------------------------------- driver

def _pool_size(cfg: ScoreConfig, cluster: runtime.ClusterCPUs) -> tuple[int, float, int]:
    """(actors, CPUs per actor, torch threads per actor), leaving room for other tasks."""
    if cfg.gpu:
        return cfg.actors or 1, cfg.cpus_per_actor or 1.0, cfg.threads_per_actor or 4
    actors = cfg.actors or max(1, int(cluster.total))
    cpus = cfg.cpus_per_actor or round(min(1.0, max(0.1, (cluster.total - 0.5) / actors)), 2)
    per_node = min(actors, max(1, int(cluster.per_node_max // cpus)))
    return actors, cpus, runtime.torch_threads(cfg.threads_per_actor, per_node, cluster)


def score_paths(
    items: list[dict],
    cfg: ScoreConfig,
    ray_cfg: RayConfig | None = None,
    log=print,
    errors: list[tuple[str, str | None, str]] = (),
) -> dict:
    """Score `items` (dicts with a `path`, optionally archive `member`/`offset`/`size` and
    pass-through columns such as `label`) into Parquet parts under cfg.output.
    `errors` are inputs that failed while listing; they get error rows too."""
    import ray

    t0 = time.perf_counter()
    check_score_config(cfg)  # before anything in cfg.output is read, cleared or written
    if cfg.engine == "onnx":
        from leukray.export import OnnxPredictor, read_onnx_meta, resolve_onnx_path

        model_path, predictor = str(resolve_onnx_path(cfg.model)), OnnxPredictor
        meta = read_onnx_meta(model_path)
    else:
        model_path, predictor = str(resolve_model_path(cfg.model)), Predictor
        meta = load_model(model_path)[1]
    classes = list(meta["classes"])
    lower = [c.casefold() for c in classes]
    benign = lower.index(BENIGN) if BENIGN in lower else None
    items = [{"member": None, "offset": -1, "size": -1, **it} for it in items]
    scored_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    writer = PartWriter(cfg.output)
    done = resume(writer, items, cfg.overwrite, log)
    todo = [it for it in items if item_key(it["path"], it["member"]) not in done]
    new_errors = [e for e in errors if item_key(e[0], e[1]) not in done]
    stats = {"scored": 0, "errors": {}, "already_scored": len(done), "total": len(items) + len(errors)}
    pending: list[pa.Table] = []
    pending_rows = 0

    def collect(table: pa.Table) -> None:
        nonlocal pending, pending_rows
        pending.append(table)
        pending_rows += table.num_rows
        stats["scored"] += table.num_rows
        for e in table.column("error").drop_null().to_pylist():
            reason = e.split(":")[0]
            stats["errors"][reason] = stats["errors"].get(reason, 0) + 1
        if pending_rows >= cfg.rows_per_part:
            writer.write(pa.concat_tables(pending))
            pending, pending_rows = [], 0

    if new_errors:
        collect(result_table(error_batch(new_errors, len(classes)), classes, benign, meta["model_id"], scored_at))
    if todo:
        runtime.init_ray(ray_cfg)
        cluster = runtime.ClusterCPUs.current()
        actors, cpus, threads = _pool_size(cfg, cluster)
        actors = min(actors, max(1, len(todo) // cfg.batch_size))
        blocks = max(1, min(2000, -(-len(todo) // cfg.batch_size)))
        ds = ray.data.from_items(todo, override_num_blocks=blocks)
        kwargs = {"model_path": model_path, "threads": threads, "device": "cuda" if cfg.gpu else "cpu"}
        if cfg.explain:
            # beside the Parquet folder, not in it: pd.read_parquet(OUTPUT) must see only parts
            kwargs.update(explain_dir=os.path.abspath(cfg.output).rstrip("/") + "_explanations",
                          explain_threshold=cfg.explain_threshold)
        ds = ds.map_batches(
            predictor,
            fn_constructor_kwargs=kwargs,
            compute=ray.data.ActorPoolStrategy(size=actors),
            batch_size=cfg.batch_size,
            num_cpus=cpus,
            num_gpus=1 if cfg.gpu else 0,
        )
        log(f"[leukray] scoring {len(todo)} files with {actors} {cfg.engine} actor(s) x {cpus} CPU, "
            f"{threads} thread(s) each")
        last_log = time.perf_counter()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            collect(result_table(batch, classes, benign, meta["model_id"], scored_at))
            if time.perf_counter() - last_log > 5:
                rate = stats["scored"] / (time.perf_counter() - t0)
                log(f"[leukray] scored {stats['scored']}/{len(todo) + len(new_errors)} ({rate:.0f} img/s)")
                last_log = time.perf_counter()
    if pending:
        writer.write(pa.concat_tables(pending))
    stats["seconds"] = time.perf_counter() - t0
    stats["images_per_s"] = stats["scored"] / stats["seconds"] if stats["seconds"] else 0.0
    stats["output"] = cfg.output
    stats["model_id"] = meta["model_id"]
    return stats


def check_score_config(cfg: ScoreConfig) -> None:
    """Refuse every bad flag combination with a ValueError (FileNotFoundError for a missing
    model) before any side effect: `--overwrite` deletes the parts in --output, so a
    check that ran after it would turn a typo into lost predictions."""
    problems = []
    if cfg.explain and (cfg.engine != "torch" or storage.is_uri(cfg.output)):
        problems.append("--explain needs --engine torch and a local --output folder")
    if cfg.batch_size < 1 or cfg.rows_per_part < 1:
        problems.append("--batch-size and --rows-per-part must be at least 1")
    if (cfg.actors is not None and cfg.actors < 1) or (cfg.cpus_per_actor is not None and cfg.cpus_per_actor <= 0) \
            or (cfg.threads_per_actor is not None and cfg.threads_per_actor < 1):
        problems.append("--actors, --cpus-per-actor and --threads-per-actor must be positive")
    if cfg.output and not storage.is_uri(cfg.output) and os.path.exists(cfg.output) and not os.path.isdir(cfg.output):
        problems.append(f"--output {cfg.output} is a file, not a folder")
    if problems:
        raise ValueError("; ".join(problems))
    if cfg.engine == "onnx":
        from leukray.export import resolve_onnx_path

        resolve_onnx_path(cfg.model)  # FileNotFoundError: "run `leukray export` first"
        if cfg.gpu:
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ValueError("--gpu --engine onnx needs onnxruntime-gpu (no CUDAExecutionProvider)")
    else:
        resolve_model_path(cfg.model)


def score(cfg: ScoreConfig, ray_cfg: RayConfig | None = None, log=print) -> dict:
    """`leukray score`: check the flags, list the input, score every image file, summarize."""
    check_score_config(cfg)
    inputs: Inputs = list_inputs(cfg.input)
    if not inputs.items and not inputs.errors:
        raise ValueError(f"--input {cfg.input}: no image files found")
    stats = score_paths(inputs.items, cfg, ray_cfg, log, errors=inputs.errors)
    stats["skipped_non_images"] = len(inputs.skipped)
    stats["skipped"] = inputs.skipped
    log(format_summary(stats))
    return stats


def format_summary(stats: dict) -> str:
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(stats["errors"].items())) or "none"
    lines = [
        f"[leukray] {stats['total']} input files: scored {stats['scored']} now in {stats['seconds']:.1f}s "
        f"({stats['images_per_s']:.0f} img/s), {stats['already_scored']} already scored; errors: {errors}",
        f"[leukray] predictions: {stats['output']}",
    ]
    skipped = stats.get("skipped") or []
    if skipped:
        lines.append(f"[leukray] skipped {len(skipped)} non-image files, e.g. {skipped[:3]}")
    return "\n".join(lines)
