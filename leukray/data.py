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
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from leukray.quality import quality_flags
from leukray.storage import is_uri

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


# Largest file or archive member read, in bytes (`--max-file-bytes`). Smear images are a few
# MB; a whole-slide scan at MAX_PIXELS is ~200 MB uncompressed. Anything larger is refused
# from its declared size before reading, or when a read without a declared size passes it.
MAX_FILE_BYTES = 256 * 1024 * 1024


class ReadRefused(OSError):
    """An input that is refused before or while reading; `str(e)` is the whole error row."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def open_regular(path: str):
    """Open a local path only if it is a regular file (links are judged by their target).

    Decided with `stat` before opening: opening a FIFO blocks forever and reading
    `/dev/zero` never ends. O_NONBLOCK plus `fstat` closes the race where the file is
    swapped for a special one between the two calls.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ReadRefused(f"not a regular file: {_kind(st.st_mode)}")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ReadRefused(f"not a regular file: {_kind(mode)}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_input(path: str):
    """A seekable binary file for a local regular file or a pyarrow-filesystem URI (s3://, gs://)."""
    if is_uri(path):
        import pyarrow.fs

        fs, inner = pyarrow.fs.FileSystem.from_uri(path)
        return fs.open_input_file(inner)
    return open_regular(path)


def too_large(size: int | None, limit: int) -> ReadRefused:
    said = f"{size} bytes" if size is not None else "more bytes"
    return ReadRefused(f"too large: {said} than the limit of {limit} (--max-file-bytes)")


def read_limited(f, limit: int | None, declared: int = -1) -> bytes:
    """Read `f` whole, but never more than `limit` bytes: a declared size over the limit
    is refused before reading, an undeclared one stops at limit + 1 bytes."""
    if limit is None:
        return f.read()
    if declared > limit:
        raise too_large(declared, limit)
    data = f.read(limit + 1)
    if len(data) > limit:
        raise too_large(None, limit)
    return data


def _declared_size(f) -> int:
    try:
        return int(f.size()) if hasattr(f, "size") else os.fstat(f.fileno()).st_size
    except (OSError, ValueError, AttributeError):
        return -1


def read_bytes(path: str, limit: int | None = None) -> bytes:
    """Read a whole local regular file or pyarrow-filesystem URI (at most `limit` bytes)."""
    with open_input(path) as f:
        return read_limited(f, limit, _declared_size(f))


# Open archives, kept per process: scoring actors read many members of the same archive,
# and re-parsing a zip directory or restarting a gzip stream for each would cost O(n^2).
# A zip's value is (ZipFile, {name: [ZipInfo, ...]}): duplicate names are told apart by index.
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


def _open_archive(path: str, is_zip: bool):
    import zipfile

    handle = _ARCHIVES.get(path)
    if handle is None:
        if len(_ARCHIVES) > 8:  # bound open handles
            for h in _ARCHIVES.values():
                (h[0] if isinstance(h, tuple) else h).close()
            _ARCHIVES.clear()
        if is_zip:
            z = zipfile.ZipFile(open_input(path))
            names: dict[str, list] = {}
            for info in z.infolist():
                names.setdefault(info.filename, []).append(info)
            handle = (z, names)
        else:
            handle = _archive_stream(path)
        _ARCHIVES[path] = handle
    return handle


def read_member(path: str, member: str, offset: int = -1, size: int = -1, index: int = 0,
                limit: int | None = None) -> bytes:
    """Bytes of one archive member: zip by name and index among same-named members, tar by
    the data offset found when listing. Both declare the size, refused above `limit` before
    reading. Member names are only ever used as keys, never as paths on disk.
    """
    handle = _open_archive(path, offset < 0)
    if isinstance(handle, tuple):
        z, names = handle
        infos = names.get(member, [])
        if not 0 <= index < len(infos):
            raise KeyError(f"no member {member!r} #{index} in archive")
        info = infos[index]
        if info.flag_bits & 0x1:  # zipfile's own message would quote the whole ZipInfo
            raise ReadRefused("unreadable file: encrypted zip member (password protected)")
        if limit is not None and info.file_size > limit:
            raise too_large(info.file_size, limit)
        with z.open(info) as f:
            return read_limited(f, limit)
    if limit is not None and size > limit:
        raise too_large(size, limit)
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
    return im if im.mode == "RGB" else im.convert("RGB")  # convert() copies even an RGB image


def decode(data: bytes, size: int) -> tuple[Image.Image, dict]:
    """Decode to an upright 8-bit RGB image, not yet resized. Returns (image, info).

    `info` holds what the file declared: width, height (before the EXIF Orientation tag
    is applied), mode. JPEGs decode at a reduced DCT scale when `size` is much smaller.
    Raises ImageError. `preprocess` resizes the result; the quality checks and the colour
    model (`leukray.quality`) look at it before resizing, where a file's noise and edges
    are still its own.
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
            # upright as viewers show it (EXIF Orientation); in place: a copy of every image cost ~0.05 ms
            ImageOps.exif_transpose(im, in_place=True)
            im = _to_8bit_rgb(im)
    except Exception as e:  # noqa: BLE001
        raise ImageError(f"corrupt or truncated: {type(e).__name__}") from None
    return im, info


def preprocess(data: bytes, size: int, quality: bool | dict = False) -> tuple[np.ndarray, dict]:
    """Decode, convert to RGB and resize to (size, size). Returns (array, info).

    `info` holds what the file declared: width, height, mode (see `decode`). With
    `quality` (True, or a colour model dict from `leukray.quality.fit_colour_model`),
    `info["quality_flags"]` lists the checks the decoded image fails ([] when none),
    computed before resizing. Raises ImageError.
    """
    im, info = decode(data, size)
    if quality is not False:
        info["quality_flags"] = quality_flags(im, info["width"], info["height"],
                                              quality if isinstance(quality, dict) else None)
    try:
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
    except Exception as e:  # noqa: BLE001
        raise ImageError(f"corrupt or truncated: {type(e).__name__}") from None
    return np.asarray(im, dtype=np.uint8), info


def _read_item(batch: dict, i: int, limit: int) -> bytes:
    members = batch.get("member")
    if members is not None and isinstance(members[i], str):
        index = int(batch["member_index"][i]) if "member_index" in batch else 0
        return read_member(str(batch["path"][i]), members[i], int(batch["offset"][i]), int(batch["size"][i]),
                           max(index, 0), limit)
    return read_bytes(str(batch["path"][i]), limit)


def _unreadable(e: BaseException) -> str:
    """The error row of a failed read, whatever raised it (zip codecs raise RuntimeError,
    NotImplementedError, zlib.error; pyarrow raises ArrowInvalid for unknown URIs)."""
    if isinstance(e, ReadRefused):
        return str(e)
    reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return f"unreadable file: {reason}"


def preprocess_batch(batch: dict[str, np.ndarray], size: int, quality: bool | dict = False) -> dict[str, np.ndarray]:
    """Ray Data `map_batches` function: a batch with a `path` column (and, for archive
    members, `member`, `member_index`, `offset`, `size`; optionally the read limit
    `max_bytes`) gains `image`, `error` (None when fine), and provenance columns `bytes`,
    `sha256`, `width`, `height`, `mode`. Failed rows keep a zero image so the column stays
    rectangular; consumers drop or report them by `error`. No input raises: every failure
    is its row's `error`. With `quality` (see `preprocess`) a `quality_flags` column too:
    the failed checks `;`-joined, None when none (and for failed rows).
    """
    paths = batch["path"]
    n = len(paths)
    limits = batch.get("max_bytes")
    images = np.zeros((n, size, size, 3), np.uint8)
    out = {k: v for k, v in batch.items() if k != "max_bytes"}
    errors = np.full(n, None, dtype=object)
    nbytes = np.full(n, -1, dtype=np.int64)
    sha = np.full(n, None, dtype=object)
    width = np.full(n, -1, dtype=np.int64)
    height = np.full(n, -1, dtype=np.int64)
    mode = np.full(n, None, dtype=object)
    flags = np.full(n, None, dtype=object)
    for i in range(n):
        try:
            data = _read_item(batch, i, int(limits[i]) if limits is not None else MAX_FILE_BYTES)
        except Exception as e:  # noqa: BLE001 - any read failure is this file's row, not the job's
            errors[i] = _unreadable(e)
            continue
        nbytes[i] = len(data)
        sha[i] = hashlib.sha256(data).hexdigest()
        try:
            images[i], info = preprocess(data, size, quality)
            width[i], height[i], mode[i] = info["width"], info["height"], info["mode"]
            flags[i] = ";".join(info.get("quality_flags", ())) or None
        except ImageError as e:
            errors[i] = str(e)
        except Exception as e:  # noqa: BLE001 - a decoder bug is still this file's row
            errors[i] = f"corrupt or truncated: {type(e).__name__}"
    out.update(image=images, error=errors, bytes=nbytes, sha256=sha, width=width, height=height, mode=mode)
    if quality is not False:
        out["quality_flags"] = flags
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


def require_data_folder(root: str | os.PathLike) -> None:
    """The `--data` check, shared by `train`'s early flag check (before Ray starts) and the
    listing itself."""
    if not Path(root).is_dir():
        raise FileNotFoundError(f"--data {root}: not a folder")


def list_labeled_images(root: str | os.PathLike) -> Listing:
    """List images under `root/<class>/...`; the class is the top-level folder name.

    Folders whose names differ only by case are one class (named as first seen in
    sorted order). Non-image files are returned in `skipped`, not raised.
    """
    require_data_folder(root)
    root_path = Path(root)
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
