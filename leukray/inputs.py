"""What to score: folders (local or pyarrow-filesystem URIs), lists of paths, archives.

Every input becomes an *item*: `{"path", "member", "offset", "size"}`. A plain file has
`member=None`; an archive member names its archive in `path` and itself in `member`
(tar members also carry the data `offset` and `size` found while listing, so a scoring
actor can read one member without scanning the archive). Items are read by
`leukray.data.preprocess_batch` in the Ray tasks, never by the driver.
"""

from __future__ import annotations

import os
import tarfile
import zipfile
from dataclasses import dataclass, field

from leukray.data import is_image_path

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")


@dataclass
class Inputs:
    items: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # non-image files, listed not scored
    errors: list[tuple[str, str | None, str]] = field(default_factory=list)  # (path, member, reason)

    @property
    def paths(self) -> list[str]:
        return [it["path"] if it["member"] is None else f"{it['path']}::{it['member']}" for it in self.items]


def file_item(path: str) -> dict:
    return {"path": path, "member": None, "offset": -1, "size": -1}


def item_key(path: str, member: str | None) -> str:
    """One string per input file, archive members included (for resume and dedup)."""
    return path if member is None else f"{path}::{member}"


def is_archive(path: str) -> bool:
    return path.lower().endswith(ARCHIVE_SUFFIXES)


def list_archive(path: str, inputs: Inputs) -> None:
    """Add an archive's image members; other members are skipped, links are errors."""
    from leukray.data import open_input

    try:
        if path.lower().endswith(".zip"):
            with zipfile.ZipFile(open_input(path)) as z:
                for info in z.infolist():
                    if info.is_dir():
                        continue
                    target = inputs.items if is_image_path(info.filename) else None
                    if target is None:
                        inputs.skipped.append(f"{path}::{info.filename}")
                    else:
                        target.append({"path": path, "member": info.filename, "offset": -1, "size": -1})
            return
        with tarfile.open(fileobj=open_input(path), mode="r:*") as t:
            for m in t:  # streams the headers: one pass, flat memory
                if m.isdir():
                    continue
                name = f"{path}::{m.name}"
                if not is_image_path(m.name):
                    inputs.skipped.append(name)
                elif not m.isfile():
                    inputs.errors.append((path, m.name, "not a regular file: link or device in archive"))
                else:
                    inputs.items.append({"path": path, "member": m.name, "offset": m.offset_data, "size": m.size})
    except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        inputs.errors.append((path, None, f"unreadable archive: {e}"))


def _walk_local(root: str, inputs: Inputs) -> None:
    seen: set[tuple[int, int]] = set()

    def on_error(e: OSError) -> None:
        inputs.errors.append((e.filename, None, f"unreadable folder: {e.strerror}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop: do not descend again
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for name in sorted(filenames):
            _add_path(os.path.join(dirpath, name), inputs)


def _walk_uri(uri: str, inputs: Inputs) -> None:
    import pyarrow.fs

    fs, base = pyarrow.fs.FileSystem.from_uri(uri)
    scheme = uri.split("://", 1)[0]
    infos = fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True))
    for info in sorted((i for i in infos if i.is_file), key=lambda i: i.path):
        _add_path(f"{scheme}://{info.path}", inputs)


def _add_path(path: str, inputs: Inputs) -> None:
    if is_image_path(path):
        inputs.items.append(file_item(path))
    elif is_archive(path):
        list_archive(path, inputs)
    else:
        inputs.skipped.append(path)


def list_inputs(source: str) -> Inputs:
    """Everything to score under `source`: a folder (recursive; archives inside are
    opened), a pyarrow-filesystem URI folder, a CSV/Parquet list with a `path` column,
    an archive, or one image."""
    inputs = Inputs()
    if source.endswith((".csv", ".parquet")) and os.path.isfile(source):
        import pandas as pd

        df = pd.read_parquet(source) if source.endswith(".parquet") else pd.read_csv(source)
        if "path" not in df.columns:
            raise ValueError(f"{source}: a list of inputs needs a 'path' column")
        for p in df["path"].astype(str):
            _add_path(p, inputs)
        return inputs
    if "://" in source:
        import pyarrow.fs

        fs, base = pyarrow.fs.FileSystem.from_uri(source)
        info = fs.get_file_info(base)
        if info.type == pyarrow.fs.FileType.NotFound:
            raise FileNotFoundError(f"--input {source}: not found")
        if info.type == pyarrow.fs.FileType.Directory:
            _walk_uri(source, inputs)
        else:
            _add_path(source, inputs)
        return inputs
    if os.path.isfile(source):
        _add_path(os.path.abspath(source), inputs)
        return inputs
    if not os.path.isdir(source):
        raise FileNotFoundError(f"--input {source}: no such file or folder")
    _walk_local(os.path.abspath(source), inputs)
    return inputs
