"""Run directories on shared storage: a local folder or a pyarrow-filesystem URI.

On a cluster, a run's outputs must outlive the node that wrote them, so `--output` of
`train` (and the run directory that `evaluate`, `report`, `export` and `score --model` take)
may be `s3://bucket/prefix`, `gs://...` or any URI `pyarrow.fs.FileSystem.from_uri` opens.
Credentials and endpoints come from the usual environment (AWS_* variables, e.g.
AWS_ENDPOINT_URL for an S3-compatible server), never from the URI.

How a URI run directory is used:
- Ray Train writes its checkpoints straight to `<run>/ray` (`RunConfig(storage_path=...)`),
  so a worker or driver that dies loses at most one epoch and any machine can resume;
- the small files around them (split.csv, config.json, model.pt, metrics, predictions)
  are written into a local working copy that `synced_run_dir` mirrors to the URI when the
  command ends; a re-run first downloads the copy, so resuming checks the same config.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

RAY_SUBDIR = "ray"  # Ray Train's storage inside a run directory: synced by Ray Train itself


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def _fs(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri.rstrip("/"))


def _remote_files(fs, root: str) -> list[str]:
    """Paths relative to `root` of the files under it, without Ray Train's folder."""
    import pyarrow.fs

    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    rel = [i.path[len(root):].lstrip("/") for i in infos if i.type == pyarrow.fs.FileType.File]
    return sorted(r for r in rel if r.split("/", 1)[0] != RAY_SUBDIR)


def _local_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.relative_to(root).parts[0] != RAY_SUBDIR)


def working_copy(uri: str) -> Path:
    """The local folder that stands for a URI run directory on this machine: under
    $LEUKRAY_RUN_CACHE, default TMPDIR/leukray-runs (it is refilled from the URI each time)."""
    key = hashlib.sha1(uri.rstrip("/").encode()).hexdigest()[:16]
    root = os.environ.get("LEUKRAY_RUN_CACHE") or os.path.join(tempfile.gettempdir(), "leukray-runs")
    return Path(root) / key


def download(uri: str, dest: Path) -> int:
    """Replace `dest` with the files of run directory `uri` (Ray Train's folder excluded)."""
    fs, root = _fs(uri)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    files = _remote_files(fs, root)
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f"{root}/{rel}") as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    return len(files)


def upload(src: Path, uri: str) -> int:
    """Mirror local run folder `src` to `uri`: copy every file, delete remote files that are
    gone locally (e.g. Parquet parts replaced by a re-evaluation). Ray Train's folder is left alone."""
    fs, root = _fs(uri)
    local = _local_files(src)
    for rel in local:
        parent = f"{root}/{rel}".rsplit("/", 1)[0]
        fs.create_dir(parent, recursive=True)
        with open(src / rel, "rb") as f, fs.open_output_stream(f"{root}/{rel}") as out:
            shutil.copyfileobj(f, out, 1 << 20)
    for rel in set(_remote_files(fs, root)) - set(local):
        fs.delete_file(f"{root}/{rel}")
    return len(local)


@contextlib.contextmanager
def synced_run_dir(path: str | os.PathLike, fetch: bool = True) -> Iterator[Path]:
    """A local folder for run directory `path`.

    Local paths are used as they are. For a URI: a working copy, first filled from the URI
    (`fetch`), mirrored back to it when the block ends without an exception.
    """
    if not is_uri(path):
        yield Path(path)
        return
    uri = str(path).rstrip("/")
    local = working_copy(uri)
    if fetch:
        n = download(uri, local)
        if n:
            print(f"[leukray] {uri}: {n} files copied to the working copy {local}", flush=True)
    else:
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
    yield local
    n = upload(local, uri)
    print(f"[leukray] {uri}: {n} files written from {local}", flush=True)


def ray_storage_path(run_dir: str | os.PathLike, local_run_dir: Path) -> str:
    """Where Ray Train keeps a run's checkpoints: `<run>/ray`, on the URI itself for URI runs."""
    if is_uri(run_dir):
        return f"{str(run_dir).rstrip('/')}/{RAY_SUBDIR}"
    return str(Path(local_run_dir).resolve() / RAY_SUBDIR)
