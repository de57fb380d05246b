"""What to score: folders (local or pyarrow-filesystem URIs), lists of paths, archives.

Every input becomes an *item*: `{"path", "member", "member_index", "offset", "size"}`. A
plain file has `member=None` (`member_index`, `offset`, `size` -1); an archive member names
its archive in `path`, itself in `member`, and which of the members of that name it is in
`member_index` (0 unless an archive holds the same name twice). `size` is the size the
archive declares; tar members also carry the data `offset`, so a scoring actor can read one
member without scanning the archive. Items are read by `leukray.data.preprocess_batch` in
the Ray tasks, never by the driver.

Listing never raises for one bad input: an archive that cannot be listed, a directory or
an empty cell in a list each become one entry of `errors` (an error row).
"""

from __future__ import annotations

import json
import os
import tarfile
import zipfile
from dataclasses import dataclass, field

from leukray.data import is_image_path
from leukray.storage import is_uri

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")


@dataclass
class Inputs:
    items: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # non-image files, listed not scored
    errors: list[tuple[str, str | None, str]] = field(default_factory=list)  # (path, member, reason)
    folded: int = 0  # duplicate paths of a list, scored once

    @property
    def paths(self) -> list[str]:
        """Display names (`archive::member`); not an identity: use `key_of`."""
        return [it["path"] if it["member"] is None else f"{it['path']}::{it['member']}" for it in self.items]


def file_item(path: str) -> dict:
    return {"path": path, "member": None, "member_index": -1, "offset": -1, "size": -1}


def member_item(path: str, member: str, index: int, offset: int = -1, size: int = -1) -> dict:
    return {"path": path, "member": member, "member_index": index, "offset": offset, "size": size}


def item_key(path: str, member: str | None = None, index: int | None = None) -> str:
    """One string per input file, archive members included (for resume and dedup).

    A JSON array of path, member and member index: no file or member name can make two
    inputs share a key (a `path::member` join could: a file named `a.tar::x.jpg`).
    """
    if member is None or not isinstance(member, str):
        return json.dumps([str(path)])
    i = 0 if index is None or int(index) < 0 else int(index)
    return json.dumps([str(path), str(member), i])


def key_of(item: dict) -> str:
    return item_key(item["path"], item.get("member"), item.get("member_index"))


def is_archive(path: str) -> bool:
    return path.lower().endswith(ARCHIVE_SUFFIXES)


def _list_zip(path: str, inputs: Inputs, open_input) -> None:
    seen: dict[str, int] = {}
    with zipfile.ZipFile(open_input(path)) as z:
        for info in z.infolist():
            if info.is_dir():
                continue
            index = seen[info.filename] = seen.get(info.filename, -1) + 1
            if is_image_path(info.filename):
                inputs.items.append(member_item(path, info.filename, index, -1, info.file_size))
            else:
                inputs.skipped.append(f"{path}::{info.filename}")


def _list_tar(path: str, inputs: Inputs, open_input) -> None:
    seen: dict[str, int] = {}
    with tarfile.open(fileobj=open_input(path), mode="r:*") as t:
        for m in t:  # streams the headers: one pass, flat memory
            if m.isdir():
                continue
            index = seen[m.name] = seen.get(m.name, -1) + 1
            if not is_image_path(m.name):
                inputs.skipped.append(f"{path}::{m.name}")
            elif not m.isfile():
                inputs.errors.append((path, m.name, "not a regular file: link or device in archive"))
            else:
                inputs.items.append(member_item(path, m.name, index, m.offset_data, m.size))


def list_archive(path: str, inputs: Inputs) -> None:
    """Add an archive's image members; other members are skipped, links are errors.

    Whatever fails while listing (a corrupt directory or stream, an unsupported format,
    a FIFO named `.tar`) is one error row for the archive; members listed before the
    failure are kept.
    """
    from leukray.data import open_input

    try:
        (_list_zip if path.lower().endswith(".zip") else _list_tar)(path, inputs, open_input)
    except Exception as e:  # noqa: BLE001 - one archive's failure is its row, not the job's
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        inputs.errors.append((path, None, f"unreadable archive: {reason}"))


def _walk_local(root: str, inputs: Inputs, exclude: frozenset[str] = frozenset()) -> None:
    seen: set[tuple[int, int]] = set()

    def on_error(e: OSError) -> None:
        inputs.errors.append((e.filename, None, f"unreadable folder: {e.strerror}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError as e:
            on_error(e)
            continue
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop: do not descend again
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if os.path.join(dirpath, d) not in exclude)
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


def normalize(path: str) -> str:
    """The one spelling of a listed path: absolute and without `..` for local paths (so
    `x/../x/a.jpg` and `./x/a.jpg` are one file); URIs as given."""
    return path if is_uri(path) else os.path.abspath(path)


def _list_table(source: str, inputs: Inputs) -> None:
    """A CSV/Parquet list: each distinct path once; an empty cell or a listed directory is
    an error row (identified by the list file and its row), never a traceback."""
    import pandas as pd

    if source.endswith(".parquet"):
        df = pd.read_parquet(source)
    else:  # empty cells stay "" (not NaN), and a file named "NA" stays a file
        df = pd.read_csv(source, dtype=str, keep_default_na=False)
    if "path" not in df.columns:
        raise ValueError(f"{source}: a list of inputs needs a 'path' column")
    seen: set[str] = set()
    for row, value in enumerate(df["path"].tolist()):
        if not isinstance(value, str) or not value.strip():
            inputs.errors.append((os.path.abspath(source), f"row {row + 1}", "empty path in list"))
            continue
        path = normalize(value)
        if path in seen:
            inputs.folded += 1
        elif not is_uri(path) and os.path.isdir(path):
            inputs.errors.append((path, None, "not a regular file: directory"))
        elif is_image_path(path) or is_archive(path):
            _add_path(path, inputs)
        else:
            inputs.skipped.append(value)
        seen.add(path)


def list_inputs(source: str, exclude: tuple[str, ...] = ()) -> Inputs:
    """Everything to score under `source`: a folder (recursive; archives inside are
    opened; folders in `exclude`, such as the output's own, are not entered), a
    pyarrow-filesystem URI folder, a CSV/Parquet list with a `path` column, an archive,
    or one image."""
    inputs = Inputs()
    if source.endswith((".csv", ".parquet")) and os.path.isfile(source):
        _list_table(source, inputs)
        return inputs
    if is_uri(source):
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
    _walk_local(os.path.abspath(source), inputs, frozenset(os.path.abspath(p) for p in exclude))
    return inputs


def exists(path: str) -> bool:
    """Whether a listed input is still there (resume reports rows of vanished files)."""
    if not is_uri(path):
        return os.path.lexists(path)
    import pyarrow.fs

    try:
        fs, inner = pyarrow.fs.FileSystem.from_uri(path)
        return fs.get_file_info(inner).type != pyarrow.fs.FileType.NotFound
    except Exception:  # noqa: BLE001 - an unknown scheme: cannot tell, keep the row
        return True
