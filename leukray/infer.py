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
from leukray import runtime
from leukray.config import RayConfig, ScoreConfig
from leukray.data import preprocess_batch, read_bytes, read_member
from leukray.inputs import Inputs, item_key, list_inputs
from leukray.model import load_model, resolve_model_path

PART_PREFIX = "part-"
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


# --------------------------------------------------------------------------- output

class PartWriter:
    """Parquet parts in one folder (local path or pyarrow-filesystem URI), written atomically."""

    def __init__(self, output: str):
        if "://" in output:
            self.fs, self.root = pyarrow.fs.FileSystem.from_uri(output)
        else:
            self.fs, self.root = pyarrow.fs.LocalFileSystem(), os.path.abspath(output)
        self.fs.create_dir(self.root, recursive=True)

    def parts(self) -> list[str]:
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.root, allow_not_found=True))
        return sorted(i.path for i in infos if i.is_file and os.path.basename(i.path).startswith(PART_PREFIX)
                      and i.path.endswith(".parquet"))

    def read_all(self) -> pa.Table | None:
        tables = [pq.read_table(p, filesystem=self.fs) for p in self.parts()]
        return pa.concat_tables(tables, promote_options="default") if tables else None

    def write(self, table: pa.Table) -> str:
        table = table.sort_by([("path", "ascending"), ("member", "ascending")])
        keys = map(item_key, table.column("path").to_pylist(), table.column("member").to_pylist())
        digest = hashlib.sha1("\n".join(keys).encode()).hexdigest()[:16]
        final = f"{self.root}/{PART_PREFIX}{digest}.parquet"
        tmp = f"{self.root}/.tmp-{digest}-{os.getpid()}.parquet"
        pq.write_table(table, tmp, filesystem=self.fs)
        self.fs.move(tmp, final)
        return final

    def delete(self, path: str) -> None:
        self.fs.delete_file(path)

    def clear(self) -> None:
        for p in self.parts():
            self.fs.delete_file(p)


_OWN_COLUMNS = {"path", "member", "offset", "size", "probs", "predicted_label", "error", "bytes", "sha256",
                "width", "height", "mode", "explanation"}


def _strings(values) -> pa.Array:
    """Ray turns an all-None object column into floats; keep strings, everything else null."""
    return pa.array([v if isinstance(v, str) else None for v in values], pa.string())


def _result_table(batch: dict, classes: list[str], benign: int | None, model_id: str, scored_at: str) -> pa.Table:
    """The Parquet schema (documented in the README): nulls, not NaNs, for failed rows."""
    probs = np.asarray(batch["probs"], dtype=np.float32).reshape(len(batch["path"]), len(classes))
    failed = np.isnan(probs).any(1)
    cols = {"path": pa.array(list(batch["path"]), pa.string()), "member": _strings(batch["member"])}
    for name in [k for k in batch if k not in _OWN_COLUMNS]:
        cols[name] = pa.array(list(batch[name]))  # pass-through columns such as `label`
    cols["error"] = _strings(batch["error"])
    cols["bytes"] = pa.array(batch["bytes"], pa.int64(), mask=np.asarray(batch["bytes"]) < 0)
    cols["sha256"] = _strings(batch["sha256"])
    cols["width"] = pa.array(batch["width"], pa.int32(), mask=np.asarray(batch["width"]) < 0)
    cols["height"] = pa.array(batch["height"], pa.int32(), mask=np.asarray(batch["height"]) < 0)
    cols["mode"] = _strings(batch["mode"])
    cols["predicted_label"] = _strings(batch["predicted_label"])
    cols["confidence"] = pa.array(probs.max(1, initial=0.0), pa.float32(), mask=failed)
    for i, c in enumerate(classes):
        cols[f"prob_{c}"] = pa.array(probs[:, i], pa.float32(), mask=failed)
    if benign is not None:
        cols["malignant_probability"] = pa.array(1.0 - probs[:, benign], pa.float32(), mask=failed)
    n = len(batch["path"])
    if "explanation" in batch:
        cols["explanation"] = _strings(batch["explanation"])
    cols["model_id"] = pa.array([model_id] * n, pa.string())
    cols["leukray_version"] = pa.array([leukray.__version__] * n, pa.string())
    cols["scored_at"] = pa.array([scored_at] * n, pa.string())
    return pa.table(cols)


# --------------------------------------------------------------------------- driver

def _pool_size(cfg: ScoreConfig, cluster: runtime.ClusterCPUs) -> tuple[int, float, int]:
    """(actors, CPUs per actor, torch threads per actor), leaving room for other tasks."""
    if cfg.gpu:
        return cfg.actors or 1, cfg.cpus_per_actor or 1.0, cfg.threads_per_actor or 4
    actors = cfg.actors or max(1, int(cluster.total))
    cpus = cfg.cpus_per_actor or round(min(1.0, max(0.1, (cluster.total - 0.5) / actors)), 2)
    per_node = min(actors, max(1, int(cluster.per_node_max // cpus)))
    return actors, cpus, runtime.torch_threads(cfg.threads_per_actor, per_node, cluster)


def _resume(writer: PartWriter, items: list[dict], overwrite: bool, log) -> set[str]:
    """Keys of items already scored with unchanged bytes; rows of changed files are dropped
    (their part is rewritten without them) so that they are scored again."""
    if overwrite:
        writer.clear()
        return set()
    wanted = {item_key(it["path"], it["member"]): it for it in items}
    done: set[str] = set()
    for part in writer.parts():
        t = pq.read_table(part, filesystem=writer.fs, columns=["path", "member", "sha256"])
        keep = []
        for p, m, h in zip(*(t.column(c).to_pylist() for c in ("path", "member", "sha256"))):
            key = item_key(p, m)
            fresh = key not in wanted or h is None or _same_bytes(wanted[key], h)
            keep.append(fresh)
            if fresh and key in wanted:
                done.add(key)
        if not all(keep):
            full = pq.read_table(part, filesystem=writer.fs).filter(pa.array(keep))
            writer.delete(part)
            if full.num_rows:
                writer.write(full)
    if done:
        log(f"[leukray] resuming: {len(done)} files already scored, {len(wanted) - len(done)} to go")
    return done


def _same_bytes(item: dict, digest: str) -> bool:
    try:
        data = (read_bytes(item["path"]) if item["member"] is None
                else read_member(item["path"], item["member"], item["offset"], item["size"]))
    except (OSError, KeyError, EOFError):
        return False
    return hashlib.sha256(data).hexdigest() == digest


def _error_batch(errors: list[tuple[str, str | None, str]], n_classes: int) -> dict:
    """Rows for inputs that failed before reading (unreadable folders, links in archives)."""
    n = len(errors)
    return {
        "path": [e[0] for e in errors], "member": [e[1] for e in errors], "error": [e[2] for e in errors],
        "bytes": np.full(n, -1), "sha256": [None] * n, "width": np.full(n, -1), "height": np.full(n, -1),
        "mode": [None] * n, "predicted_label": [None] * n, "probs": np.full((n, n_classes), np.nan, np.float32),
    }


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
    done = _resume(writer, items, cfg.overwrite, log)
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
        collect(_result_table(_error_batch(new_errors, len(classes)), classes, benign, meta["model_id"], scored_at))
    if todo:
        runtime.init_ray(ray_cfg)
        cluster = runtime.ClusterCPUs.current()
        actors, cpus, threads = _pool_size(cfg, cluster)
        actors = min(actors, max(1, len(todo) // cfg.batch_size))
        blocks = max(1, min(2000, -(-len(todo) // cfg.batch_size)))
        ds = ray.data.from_items(todo, override_num_blocks=blocks)
        kwargs = {"model_path": model_path, "threads": threads, "device": "cuda" if cfg.gpu else "cpu"}
        if cfg.explain:
            if cfg.engine != "torch" or "://" in cfg.output:
                raise ValueError("--explain needs --engine torch and a local --output folder")
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
            collect(_result_table(batch, classes, benign, meta["model_id"], scored_at))
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


def score(cfg: ScoreConfig, ray_cfg: RayConfig | None = None, log=print) -> dict:
    """`leukray score`: list the input, score every image file, summarize."""
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
