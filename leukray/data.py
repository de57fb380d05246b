"""Ingest: find images, read their bytes, and the one preprocessing function.

`preprocess` turns the bytes of one file into a uint8 (size, size, 3) RGB array, or
raises `ImageError` with a short reason. Training, evaluation and scoring all call it
(through `preprocess_batch` in Ray Data `map_batches`), so a model always sees its
inputs prepared the same way. Normalization is not here: it lives inside the model.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# Extensions treated as images. Anything else found in an input folder is listed as
# skipped, never decoded.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp"})
# Refuse to decode images whose header declares more pixels than this (a decompression
# bomb would otherwise allocate gigabytes before failing).
MAX_PIXELS = 64_000_000

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey image


# Leading bytes of the formats in IMAGE_EXTENSIONS: a file that starts like an image but
# does not open is corrupt, not "not an image".
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


class ImageError(Exception):
    """A file that cannot be turned into a model input; `str(e)` is a short reason."""


def is_image_path(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def class_key(name: str) -> str:
    """Class folders match case-insensitively: `benign/` and `Benign/` are one class."""
    return name.strip().casefold()


def open_input(path: str):
    """A seekable binary file for a local path or a pyarrow-filesystem URI (s3://, gs://)."""
    if "://" in path:
        import pyarrow.fs

        fs, inner = pyarrow.fs.FileSystem.from_uri(path)
        return fs.open_input_file(inner)
    return open(path, "rb")


def read_bytes(path: str) -> bytes:
    """Read a whole local file or pyarrow-filesystem URI."""
    with open_input(path) as f:
        return f.read()


# Open archives, kept per process: scoring actors read many members of the same archive,
# and re-parsing a zip directory or restarting a gzip stream for each would cost O(n^2).
_ARCHIVES: dict[str, object] = {}


def _archive_stream(path: str):
    """A file object positioned over the archive's (decompressed) bytes."""
    import bz2
    import gzip
    import lzma

    f = open_input(path)
    magic = f.read(6)
    f.seek(0)
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f)
    if magic[:3] == b"BZh":
        return bz2.BZ2File(f)
    if magic[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(f)
    return f


def read_member(path: str, member: str, offset: int = -1, size: int = -1) -> bytes:
    """Bytes of one archive member: zip by name, tar by the data offset found when listing.

    Member names are only ever used as keys, never as paths on disk (no path traversal).
    """
    import zipfile

    handle = _ARCHIVES.get(path)
    if handle is None:
        if len(_ARCHIVES) > 8:  # bound open handles
            for h in _ARCHIVES.values():
                h.close()
            _ARCHIVES.clear()
        handle = zipfile.ZipFile(open_input(path)) if offset < 0 else _archive_stream(path)
        _ARCHIVES[path] = handle
    if isinstance(handle, zipfile.ZipFile):
        return handle.read(member)
    handle.seek(offset)  # forward seeks in a compressed stream decompress and discard
    data = handle.read(size)
    if len(data) != size:
        raise OSError(f"archive member {member!r} is truncated")
    return data


def sha256_file(path: str) -> str:
    return hashlib.sha256(read_bytes(path)).hexdigest()


def _to_8bit_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / float grayscale: stretch to 8 bits (convert("RGB") would clip at 255).
        arr = np.asarray(im, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        im = Image.fromarray(arr.astype(np.uint8))
    return im.convert("RGB")


def preprocess(data: bytes, size: int) -> tuple[np.ndarray, dict]:
    """Decode, convert to RGB and resize to (size, size). Returns (array, info).

    `info` holds what the file declared: width, height, mode. Raises ImageError.
    """
    if not data:
        raise ImageError("empty file")
    try:
        with warnings.catch_warnings():  # the size check below replaces Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if data.startswith(_IMAGE_SIGNATURES) or data[8:12] == b"WEBP":
            raise ImageError("corrupt or truncated: unreadable header") from None
        raise ImageError("not an image") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"decompression bomb: {e}") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is the file's fault
        raise ImageError(f"corrupt or truncated: bad header ({type(e).__name__})") from None
    width, height = im.size
    info = {"width": width, "height": height, "mode": im.mode}
    if width * height > MAX_PIXELS:
        raise ImageError(f"decompression bomb: {width}x{height} pixels")
    # JPEG only: decode at a reduced DCT scale when the target is much smaller.
    im.draft("RGB", (size, size))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
            im = _to_8bit_rgb(im)
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
    except Exception as e:  # noqa: BLE001
        raise ImageError(f"corrupt or truncated: {type(e).__name__}") from None
    return np.asarray(im, dtype=np.uint8), info


def preprocess_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Ray Data `map_batches` function: a batch with a `path` column (and, for archive
    members, `member`, `offset`, `size`) gains `image`,
    `error` (None when fine), and provenance columns `bytes`, `sha256`, `width`,
    `height`, `mode`. Failed rows keep a zero image so the column stays rectangular;
    consumers drop or report them by `error`.
    """
    paths = batch["path"]
    members = batch.get("member")
    n = len(paths)
    images = np.zeros((n, size, size, 3), np.uint8)
    out = {k: v for k, v in batch.items()}
    errors = np.full(n, None, dtype=object)
    nbytes = np.full(n, -1, dtype=np.int64)
    sha = np.full(n, None, dtype=object)
    width = np.full(n, -1, dtype=np.int64)
    height = np.full(n, -1, dtype=np.int64)
    mode = np.full(n, None, dtype=object)
    for i, path in enumerate(paths):
        try:
            if members is not None and isinstance(members[i], str):
                data = read_member(str(path), members[i], int(batch["offset"][i]), int(batch["size"][i]))
            else:
                data = read_bytes(str(path))
        except (OSError, KeyError, EOFError) as e:
            errors[i] = f"unreadable file: {getattr(e, 'strerror', None) or e}"
            continue
        nbytes[i] = len(data)
        sha[i] = hashlib.sha256(data).hexdigest()
        try:
            images[i], info = preprocess(data, size)
            width[i], height[i], mode[i] = info["width"], info["height"], info["mode"]
        except ImageError as e:
            errors[i] = str(e)
    out.update(image=images, error=errors, bytes=nbytes, sha256=sha, width=width, height=height, mode=mode)
    return out


@dataclass
class Listing:
    """What a folder of class sub-folders holds."""

    root: str
    classes: list[str]
    records: list[dict]  # path, relpath, label
    skipped: list[str] = field(default_factory=list)  # files that are not images


def _walk_files(folder: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def list_labeled_images(root: str | os.PathLike) -> Listing:
    """List images under `root/<class>/...`; the class is the top-level folder name.

    Folders whose names differ only by case are one class (named as first seen in
    sorted order). Non-image files are returned in `skipped`, not raised.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"--data {root}: not a folder")
    names: dict[str, str] = {}
    folders: dict[str, list[Path]] = {}
    for sub in sorted(p for p in root_path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        key = class_key(sub.name)
        names.setdefault(key, sub.name)
        folders.setdefault(key, []).append(sub)
    if not folders:
        raise ValueError(f"--data {root}: no class sub-folders (expected e.g. {root}/Benign/*.jpg)")
    records, skipped = [], []
    for key in sorted(folders):
        for sub in folders[key]:
            for f in _walk_files(sub):
                rel = f.relative_to(root_path).as_posix()
                if is_image_path(f.name):
                    records.append({"path": str(f.resolve()), "relpath": rel, "label": names[key]})
                else:
                    skipped.append(rel)
    classes = [names[k] for k in sorted(folders) if any(r["label"] == names[k] for r in records)]
    if len(classes) < 2:
        raise ValueError(f"--data {root}: need images in at least two class folders, found {classes}")
    return Listing(str(root_path.resolve()), classes, records, skipped)
