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
from leukray.data import is_image_path, preprocess_batch, sha256_file
from leukray.model import load_model, resolve_model_path

PART_PREFIX = "part-"
ROWS_PER_PART = 5000
BENIGN = "benign"


class Predictor:
    """Ray Data callable class: the model is loaded once per actor, then scores batches.

    Accepts batches of paths (decodes them with `preprocess_batch`) or batches that
    already carry an `image` column (when decoding runs as a separate stage).
    """

    def __init__(self, model_path: str, threads: int = 1, device: str = "cpu"):
        torch.set_num_threads(threads)
        self.device = device
        self.model, self.meta = load_model(model_path, device)
        self.classes = list(self.meta["classes"])
        lower = [c.casefold() for c in self.classes]
        self.benign = lower.index(BENIGN) if BENIGN in lower else None

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
        return batch


# --------------------------------------------------------------------------- inputs

@dataclass
class Inputs:
    paths: list[str]
    skipped: list[str] = field(default_factory=list)  # non-image files, not scored
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) found while listing


def list_inputs(source: str) -> Inputs:
    """Files to score: a folder (walked recursively), a CSV/Parquet list with a `path`
    column, or one image file."""
    if source.endswith((".csv", ".parquet")) and os.path.isfile(source):
        import pandas as pd

        df = pd.read_parquet(source) if source.endswith(".parquet") else pd.read_csv(source)
        if "path" not in df.columns:
            raise ValueError(f"{source}: a list of inputs needs a 'path' column")
        paths = [str(p) for p in df["path"]]
        return Inputs([p for p in paths if is_image_path(p)], [p for p in paths if not is_image_path(p)])
    if os.path.isfile(source):
        return Inputs([os.path.abspath(source)])
    if not os.path.isdir(source):
        raise FileNotFoundError(f"--input {source}: no such file or folder")
    inputs = Inputs([])
    seen_dirs: set[tuple[int, int]] = set()

    def on_error(e: OSError) -> None:
        inputs.errors.append((e.filename, f"unreadable folder: {e.strerror}"))

    for dirpath, dirnames, filenames in os.walk(os.path.abspath(source), onerror=on_error, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:  # a symlink loop: do not descend again
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            (inputs.paths if is_image_path(name) else inputs.skipped).append(path)
    return inputs


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
        table = table.sort_by("path")
        digest = hashlib.sha1("\n".join(table.column("path").to_pylist()).encode()).hexdigest()[:16]
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


def _strings(values) -> pa.Array:
    """Ray turns an all-None object column into floats; keep strings, everything else null."""
    return pa.array([v if isinstance(v, str) else None for v in values], pa.string())


def _result_table(batch: dict, classes: list[str], benign: int | None, model_id: str, scored_at: str) -> pa.Table:
    """The Parquet schema (documented in the README): nulls, not NaNs, for failed rows."""
    probs = np.asarray(batch["probs"], dtype=np.float32).reshape(len(batch["path"]), len(classes))
    failed = np.isnan(probs).any(1)
    cols = {"path": pa.array(list(batch["path"]), pa.string())}
    for name in [k for k in batch if k not in ("path", "probs", "predicted_label", "error", "bytes", "sha256",
                                                 "width", "height", "mode")]:
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


def _resume(writer: PartWriter, paths: list[str], overwrite: bool, log) -> set[str]:
    """Return the paths already scored with unchanged bytes; drop rows of changed files."""
    if overwrite:
        writer.clear()
        return set()
    wanted = set(paths)
    done: set[str] = set()
    for part in writer.parts():
        t = pq.read_table(part, filesystem=writer.fs, columns=["path", "sha256"])
        keep = []
        for p, h in zip(t.column("path").to_pylist(), t.column("sha256").to_pylist()):
            fresh = p not in wanted or h is None or _same_bytes(p, h)
            keep.append(fresh)
            if fresh and p in wanted:
                done.add(p)
        if not all(keep):  # a file changed since it was scored: its row goes, it is re-scored
            full = pq.read_table(part, filesystem=writer.fs).filter(pa.array(keep))
            writer.delete(part)
            if full.num_rows:
                writer.write(full)
    if done:
        log(f"[leukray] resuming: {len(done)} files already scored, {len(wanted - done)} to go")
    return done


def _same_bytes(path: str, digest: str) -> bool:
    try:
        return sha256_file(path) == digest
    except OSError:
        return False


def score_paths(
    items: list[dict],
    cfg: ScoreConfig,
    ray_cfg: RayConfig | None = None,
    log=print,
) -> dict:
    """Score `items` (dicts with a `path`, plus pass-through columns) into cfg.output."""
    import ray

    t0 = time.perf_counter()
    model_path = str(resolve_model_path(cfg.model))
    meta = load_model(model_path)[1]
    classes = list(meta["classes"])
    lower = [c.casefold() for c in classes]
    benign = lower.index(BENIGN) if BENIGN in lower else None

    writer = PartWriter(cfg.output)
    done = _resume(writer, [it["path"] for it in items], cfg.overwrite, log)
    todo = [it for it in items if it["path"] not in done]
    stats = {"scored": 0, "errors": {}, "already_scored": len(done)}
    if todo:
        runtime.init_ray(ray_cfg)
        cluster = runtime.ClusterCPUs.current()
        actors, cpus, threads = _pool_size(cfg, cluster)
        actors = min(actors, max(1, len(todo) // cfg.batch_size))
        blocks = max(1, min(2000, -(-len(todo) // cfg.batch_size)))
        ds = ray.data.from_items(todo, override_num_blocks=blocks)
        ds = ds.map_batches(
            Predictor,
            fn_constructor_kwargs={"model_path": model_path, "threads": threads, "device": "cuda" if cfg.gpu else "cpu"},
            compute=ray.data.ActorPoolStrategy(size=actors),
            batch_size=cfg.batch_size,
            num_cpus=cpus,
            num_gpus=1 if cfg.gpu else 0,
        )
        log(f"[leukray] scoring {len(todo)} files with {actors} actor(s) x {cpus} CPU, {threads} thread(s) each")
        scored_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        pending: list[pa.Table] = []
        pending_rows, last_log = 0, time.perf_counter()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            table = _result_table(batch, classes, benign, meta["model_id"], scored_at)
            pending.append(table)
            pending_rows += table.num_rows
            stats["scored"] += table.num_rows
            for e in table.column("error").drop_null().to_pylist():
                reason = e.split(":")[0]
                stats["errors"][reason] = stats["errors"].get(reason, 0) + 1
            if pending_rows >= ROWS_PER_PART:
                writer.write(pa.concat_tables(pending))
                pending, pending_rows = [], 0
            if time.perf_counter() - last_log > 5:
                rate = stats["scored"] / (time.perf_counter() - t0)
                log(f"[leukray] scored {stats['scored']}/{len(todo)} ({rate:.0f} img/s)")
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
    inputs = list_inputs(cfg.input)
    if not inputs.paths and not inputs.errors:
        raise ValueError(f"--input {cfg.input}: no image files found")
    stats = score_paths([{"path": p} for p in inputs.paths], cfg, ray_cfg, log)
    stats["skipped_non_images"] = len(inputs.skipped)
    stats["listing_errors"] = inputs.errors
    log(format_summary(stats, inputs.skipped))
    return stats


def format_summary(stats: dict, skipped: list[str]) -> str:
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(stats["errors"].items())) or "none"
    lines = [
        f"[leukray] scored {stats['scored']} files in {stats['seconds']:.1f}s ({stats['images_per_s']:.0f} img/s); "
        f"already scored {stats['already_scored']}; errors: {errors}",
        f"[leukray] predictions: {stats['output']}",
    ]
    if skipped:
        lines.append(f"[leukray] skipped {len(skipped)} non-image files, e.g. {skipped[:3]}")
    return "\n".join(lines)
