"""The model file (model.pt): its name, its format tag, and its metadata read without torch.

A model file is what `torch.save` writes for {"meta": {...}, "state_dict": {name: tensor}}
(`leukray.model.save_model`): a zip archive whose `data.pkl` holds the pickled dict, with
each tensor as a reference to a `data/N` record of raw bytes. The metadata is plain values
(classes, image size, model_id, trust thresholds), and every `leukray score` reads it
before it starts: to check its flags and to compare model.pt with its ONNX export. Reading
it with torch made the scoring driver import torch (~2 s of a CPU) though ONNX Runtime
scores without it. Here `data.pkl` is unpickled with only the globals `torch.save` writes
for CPU tensors allowed (the rebuild function, OrderedDict, the storage types by name),
tensors coming back as None; anything else (a pickled function or object) is refused before
it runs, as `torch.load(weights_only=True)` refuses it. A file of a few hundred bytes must not
make the reader allocate gigabytes either: `data.pkl` must be stored uncompressed and small,
and its memo indices are checked before unpickling (the C unpickler sizes its memo by the
largest index a pickle names). `leukray.model.load_model` still loads the weights with torch.
"""

from __future__ import annotations

import collections
import io
import pickle
import pickletools
import zipfile
from pathlib import Path
from typing import Any

from leukray.storage import is_uri

MODEL_FORMAT = "leukray-model/1"
MODEL_FILENAME = "model.pt"
# data.pkl of a real model file is a few KB (names, shapes and the metadata; the weights are
# other records); far above that it is not a model file of ours.
MAX_DATA_PKL = 16 * 2**20
_PUTS = ("PUT", "BINPUT", "LONG_BINPUT")


def resolve_model_path(path: str | Path) -> Path | str:
    """Accept a run directory or a model file; local, or a URI (returned as a string)."""
    if is_uri(path):
        uri = str(path).rstrip("/")
        return uri if uri.endswith(".pt") else f"{uri}/{MODEL_FILENAME}"
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILENAME
    if not p.is_file():
        raise FileNotFoundError(f"no model at {path} (expected a run directory with {MODEL_FILENAME}, or the file)")
    return p


def pickled_objects_error(path) -> ValueError:
    return ValueError(f"{path}: not a leukray model file (it holds pickled Python objects, not only weights; "
                      "leukray never loads those)")


def truncated_error(path) -> ValueError:
    return ValueError(f"{path}: the model file is truncated or corrupt (save it again)")


def not_a_model_error(path) -> ValueError:
    return ValueError(f"{path} is not a leukray model file ({MODEL_FORMAT})")


def _tensor(*_args: Any) -> None:
    """Stands in for torch._utils._rebuild_tensor_v2: the metadata needs no weights."""
    return None


class _Refused(pickle.UnpicklingError):
    """A global that a model file's data.pkl must not name."""


class _MetaUnpickler(pickle.Unpickler):
    """data.pkl of a model file, with tensors as None and no other code allowed."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _tensor
        if module == "torch" and name.endswith("Storage"):  # the storage's dtype, only named
            return name
        raise _Refused(f"{module}.{name} is not allowed")

    def persistent_load(self, pid: Any) -> None:  # a tensor's bytes: the data/N record
        return None


def model_source(path: Path | str) -> Any:
    """What both readers open: a local path as is; a URI's bytes (FileNotFoundError, or
    storage's own error for a bad URI)."""
    if isinstance(path, Path):
        return path
    from leukray.data import read_bytes

    try:
        return io.BytesIO(read_bytes(path))
    except OSError as e:  # FileNotFoundError included
        raise FileNotFoundError(f"no model at {path}: {e}") from e


def _data_pkl(source: Any) -> bytes:
    """The data.pkl record: exactly one, stored (torch.save never compresses), unencrypted, small."""
    with zipfile.ZipFile(source) as z:
        infos = [i for i in z.infolist() if i.filename.endswith("/data.pkl")]
        if len(infos) != 1:
            raise zipfile.BadZipFile(f"{len(infos)} data.pkl records")
        info = infos[0]
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1 or info.file_size > MAX_DATA_PKL:
            raise zipfile.BadZipFile("data.pkl compressed, encrypted or too large")
        return z.read(info)


def _check_memo(data: bytes) -> None:
    """Refuse memo indices beyond the number of values stored so far (pickle writes them in
    order from 0): a large one makes the C unpickler allocate a memo that large."""
    puts = 0
    for op, arg, _ in pickletools.genops(data):
        if op.name in _PUTS:
            if arg > puts:
                raise ValueError(f"memo index {arg} out of order")
            puts += 1
        elif op.name == "MEMOIZE":
            puts += 1


def read_model_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a model file or run directory (local or URI) without torch and without
    reading the weights: classes, image size, model id, training facts. ValueError for a file
    that is not one (FileNotFoundError when there is none)."""
    where = resolve_model_path(path)
    source = model_source(where)
    try:
        data = _data_pkl(source)
        _check_memo(data)
        blob = _MetaUnpickler(io.BytesIO(data)).load()
    except _Refused:
        raise pickled_objects_error(where) from None
    except Exception:  # noqa: BLE001 - a cut or damaged file fails in the zip or pickle layer, in many ways
        raise truncated_error(where) from None
    if not isinstance(blob, dict) or not isinstance(blob.get("meta"), dict) \
            or blob["meta"].get("format") != MODEL_FORMAT:
        raise not_a_model_error(where)
    return blob["meta"]
