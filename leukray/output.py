"""The Parquet output of `leukray score`: part files, their schema, and resume.

One home for the output folder's contract (documented in the README): parts named
`part-<hash>.parquet`, written atomically; one row per input file; nulls, not NaNs, for
failed rows; a re-run skips what is already scored with the same bytes.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq

import leukray
from leukray.data import read_bytes, read_member
from leukray.inputs import item_key

PART_PREFIX = "part-"

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


def result_table(batch: dict, classes: list[str], benign: int | None, model_id: str, scored_at: str) -> pa.Table:
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


def resume(writer: PartWriter, items: list[dict], overwrite: bool, log) -> set[str]:
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


def error_batch(errors: list[tuple[str, str | None, str]], n_classes: int) -> dict:
    """Rows for inputs that failed before reading (unreadable folders, links in archives)."""
    n = len(errors)
    return {
        "path": [e[0] for e in errors], "member": [e[1] for e in errors], "error": [e[2] for e in errors],
        "bytes": np.full(n, -1), "sha256": [None] * n, "width": np.full(n, -1), "height": np.full(n, -1),
        "mode": [None] * n, "predicted_label": [None] * n, "probs": np.full((n, n_classes), np.nan, np.float32),
    }
