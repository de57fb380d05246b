"""The Parquet output of `leukray score`: part files, their schema, and resume.

One home for the output folder's contract (documented in the README): parts named
`part-<hash>.parquet`, written atomically and marked as leukray's in their schema metadata
(`PART_MARK`); one row per input file; nulls, not NaNs, for failed rows; a re-run skips
what is already scored with the same bytes and retries rows whose cause can change.
leukray only ever deletes or rewrites its own marked parts, and refuses an output folder
that holds other Parquet files (`check_output_folder`).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq

import leukray
from leukray.data import MAX_FILE_BYTES, read_bytes, read_member
from leukray.inputs import Inputs, exists, item_key, key_of
from leukray.storage import is_uri

PART_PREFIX = "part-"
# Schema metadata key of every part leukray writes (value: the leukray version). Parts
# without it are not leukray's and are never deleted.
PART_MARK = b"leukray.part"


def _is_ours(fs, path: str) -> bool:
    """A part leukray wrote: marked, or (parts of leukray < the mark) with its own columns."""
    try:
        schema = pq.read_schema(path, filesystem=fs)
    except Exception:  # noqa: BLE001 - unreadable: not provably ours
        return False
    return PART_MARK in (schema.metadata or {}) or {"leukray_version", "model_id", "sha256"} <= set(schema.names)


def _filesystem(output: str):
    if is_uri(output):
        return pyarrow.fs.FileSystem.from_uri(output)
    return pyarrow.fs.LocalFileSystem(), os.path.abspath(output)


def check_output_folder(output: str, overwrite: bool = False) -> None:
    """Refuse an --output that is a file, or a folder holding Parquet files leukray did not
    write (resume would misread them, --overwrite must not delete them, and
    `pd.read_parquet(OUTPUT)` would mix them in). Touches nothing; call before any write."""
    fs, root = _filesystem(output)
    info = fs.get_file_info(root)
    if info.type == pyarrow.fs.FileType.NotFound:
        return
    if info.type != pyarrow.fs.FileType.Directory:
        raise ValueError(f"--output {output} is a file, not a folder")
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    foreign = [i.path for i in infos if i.is_file and i.path.endswith(".parquet")
               and not os.path.basename(i.path).startswith((".", "_")) and not _is_ours(fs, i.path)]
    if foreign:
        what = "delete" if overwrite else "resume into"
        raise ValueError(f"--output {output} holds {len(foreign)} Parquet file(s) leukray did not write "
                         f"(e.g. {os.path.basename(foreign[0])}); refusing to {what} it: choose another folder")

class PartWriter:
    """Parquet parts in one folder (local path or pyarrow-filesystem URI), written atomically."""

    def __init__(self, output: str):
        self.fs, self.root = _filesystem(output)
        self.fs.create_dir(self.root, recursive=True)

    def parts(self) -> list[str]:
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.root, allow_not_found=True))
        return sorted(i.path for i in infos if i.is_file and os.path.basename(i.path).startswith(PART_PREFIX)
                      and i.path.endswith(".parquet") and _is_ours(self.fs, i.path))

    def write(self, table: pa.Table) -> str:
        order = [(c, "ascending") for c in ("path", "member", "member_index") if c in table.column_names]
        table = table.sort_by(order)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), PART_MARK: leukray.__version__.encode()})
        digest = hashlib.sha1("\n".join(_keys(table)).encode()).hexdigest()[:16]
        final = f"{self.root}/{PART_PREFIX}{digest}.parquet"
        tmp = f"{self.root}/.tmp-{digest}-{os.getpid()}.parquet"
        pq.write_table(table, tmp, filesystem=self.fs)
        self.fs.move(tmp, final)
        return final

    def delete(self, path: str) -> None:
        self.fs.delete_file(path)

    def clear(self) -> None:
        """Delete leukray's parts only (`parts()` lists marked ones)."""
        for p in self.parts():
            self.fs.delete_file(p)


def _keys(table: pa.Table) -> list[str]:
    """`item_key` of each row (parts written before `member_index` existed count as index 0)."""
    cols = [table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows
            for c in ("path", "member", "member_index")]
    return [item_key(p, m, i) for p, m, i in zip(*cols)]


_OWN_COLUMNS = {"path", "member", "member_index", "max_bytes", "offset", "size", "probs", "predicted_label", "error", "bytes", "sha256",
                "width", "height", "mode", "explanation", "assessable", "quality_flags", "ood_score", "needs_review"}


def _strings(values) -> pa.Array:
    """Ray turns an all-None object column into floats; keep strings, everything else null."""
    return pa.array([v if isinstance(v, str) else None for v in values], pa.string())


def result_table(batch: dict, classes: list[str], benign: int | None, model_id: str, scored_at: str) -> pa.Table:
    """The Parquet schema (documented in the README): nulls, not NaNs, for failed rows.

    Probabilities are calibrated (`leukray.trust`). A batch without the trust columns
    (error rows of listing failures) gets what a model without trust gives: assessable
    when decoded, no flags, no OOD score, no review.
    """
    probs = np.asarray(batch["probs"], dtype=np.float32).reshape(len(batch["path"]), len(classes))
    failed = np.isnan(probs).any(1)
    n = len(batch["path"])
    index = np.asarray(batch.get("member_index", np.full(n, -1)), dtype=np.int64)
    cols = {"path": pa.array(list(batch["path"]), pa.string()), "member": _strings(batch["member"]),
            "member_index": pa.array(index, pa.int32(), mask=index < 0)}
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
    cols["assessable"] = pa.array(np.asarray(batch.get("assessable", ~failed), dtype=bool), pa.bool_())
    cols["quality_flags"] = _strings(batch.get("quality_flags", [None] * n))
    ood = np.asarray(batch.get("ood_score", np.full(n, np.nan)), dtype=np.float32)
    cols["ood_score"] = pa.array(ood, pa.float32(), mask=np.isnan(ood))
    cols["needs_review"] = pa.array(np.asarray(batch.get("needs_review", np.zeros(n)), dtype=bool), pa.bool_())
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
    wanted = {key_of(it): it for it in items}
    done: set[str] = set()
    for part in writer.parts():
        t = _key_columns(writer, part)
        keep = []
        for key, h in zip(_keys(t), t.column("sha256").to_pylist()):
            fresh = key not in wanted or h is None or _same_bytes(wanted[key], h)
            keep.append(fresh)
            if fresh and key in wanted:
                done.add(key)
        if not all(keep):
            _rewrite(writer, part, keep)
    if done:
        log(f"[leukray] resuming: {len(done)} files already scored, {len(wanted) - len(done)} to go")
    return done


def _key_columns(writer: PartWriter, part: str) -> pa.Table:
    names = pq.read_schema(part, filesystem=writer.fs).names
    cols = [c for c in ("path", "member", "member_index", "sha256", "error") if c in names]
    return pq.read_table(part, filesystem=writer.fs, columns=cols)


def _rewrite(writer: PartWriter, part: str, keep: list[bool]) -> None:
    kept = pq.read_table(part, filesystem=writer.fs).filter(pa.array(keep))
    writer.delete(part)
    if kept.num_rows:
        writer.write(kept)


def reconcile(output: str, inputs: Inputs, drop_missing: bool, log) -> dict:
    """Before resuming: drop the rows that must be redone or no longer describe an input.

    - error rows without a hash (the file could not be read: a dangling link, a truncated
      archive, a listing failure) are retried: their cause can change;
    - rows of a listed path that are no longer an input (an archive that now lists, a
      member gone, a list row fixed) are stale and dropped;
    - rows of files that no longer exist are counted and reported; dropped with
      `drop_missing`. Rows of other existing inputs (another --input into the same
      folder) are kept. Returns {"retried", "stale", "missing"}.
    """
    wanted = {key_of(it) for it in inputs.items} | {item_key(p, m) for p, m, _ in inputs.errors}
    listed = {it["path"] for it in inputs.items} | {p for p, _, _ in inputs.errors}
    counts = {"retried": 0, "stale": 0, "missing": 0}
    writer = PartWriter(output)
    for part in writer.parts():
        t = _key_columns(writer, part)
        keep = []
        for key, path, h, err in zip(_keys(t), *(t.column(c).to_pylist() for c in ("path", "sha256", "error"))):
            verdict = _verdict(key, path, h, err, wanted, listed)
            counts[verdict] = counts.get(verdict, 0) + 1
            keep.append(verdict == "keep" or (verdict == "missing" and not drop_missing))
        if not all(keep):
            _rewrite(writer, part, keep)
    if counts["missing"]:
        log(f"[leukray] {counts['missing']} rows are of files that no longer exist: "
            + ("dropped" if drop_missing else "kept (--drop-missing removes them)"))
    counts.pop("keep", None)
    return counts


def _verdict(key: str, path: str, sha: str | None, error: str | None, wanted: set, listed: set) -> str:
    if key in wanted:
        return "retried" if error is not None and sha is None else "keep"
    if path in listed:
        return "stale"
    return "keep" if exists(path) else "missing"


def _same_bytes(item: dict, digest: str) -> bool:
    try:
        data = (read_bytes(item["path"], MAX_FILE_BYTES) if not isinstance(item.get("member"), str)
                else read_member(item["path"], item["member"], item["offset"], item["size"],
                                 max(int(item.get("member_index", 0)), 0), MAX_FILE_BYTES))
    except Exception:  # noqa: BLE001 - unreadable now: score it again (it becomes its error row)
        return False
    return hashlib.sha256(data).hexdigest() == digest


def error_batch(errors: list[tuple[str, str | None, str]], n_classes: int) -> dict:
    """Rows for inputs that failed before reading (unreadable folders, links in archives)."""
    n = len(errors)
    return {
        "path": [e[0] for e in errors], "member": [e[1] for e in errors], "error": [e[2] for e in errors],
        "member_index": np.array([-1 if e[1] is None else 0 for e in errors], dtype=np.int64),
        "bytes": np.full(n, -1), "sha256": [None] * n, "width": np.full(n, -1), "height": np.full(n, -1),
        "mode": [None] * n, "predicted_label": [None] * n, "probs": np.full((n, n_classes), np.nan, np.float32),
    }
