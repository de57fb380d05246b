"""The model file (model.pt): its name, its format tag, and its metadata read without torch.

A model file is what `torch.save` writes for {"meta": {...}, "state_dict": {name: tensor}}
(`leukray.model.save_model`): a zip archive whose `data.pkl` holds the pickled dict, with
each tensor as a reference to a `data/N` record of raw bytes. The metadata is plain values
(classes, image size, model_id, trust thresholds), and every `leukray score` reads it
before it starts: to check its flags and to compare model.pt with its ONNX export. Reading
it with torch made the scoring driver import torch (~2 s of a CPU) though ONNX Runtime
scores without it. Here `data.pkl` is unpickled with only the four globals `torch.save`
writes for CPU tensors allowed, tensors coming back as None; anything else (a pickled
function or object) is refused before it runs, as `torch.load(weights_only=True)` refuses
it. `leukray.model.load_model` still loads the weights with torch.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

from leukray.storage import is_uri

MODEL_FORMAT = "leukray-model/1"
MODEL_FILENAME = "model.pt"


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


class _MetaUnpickler(pickle.Unpickler):
    """data.pkl of a model file, with tensors as None and no other code allowed."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _tensor
        if module == "torch" and name.endswith("Storage"):  # the storage's dtype, only named
            return name
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed")

    def persistent_load(self, pid: Any) -> None:  # a tensor's bytes: the data/N record
        return None


def _data_pkl(path: Path | str) -> bytes:
    if isinstance(path, Path):
        source: Any = path
    else:
        from leukray.data import read_bytes

        try:
            source = io.BytesIO(read_bytes(path))
        except OSError as e:  # FileNotFoundError included
            raise FileNotFoundError(f"no model at {path}: {e}") from e
    with zipfile.ZipFile(source) as z:
        names = [n for n in z.namelist() if n.endswith("/data.pkl")]
        if len(names) != 1:
            raise zipfile.BadZipFile(f"{len(names)} data.pkl records")
        return z.read(names[0])


def read_model_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a model file or run directory (local or URI) without torch and without
    reading the weights: classes, image size, model id, training facts."""
    where = resolve_model_path(path)
    try:
        blob = _MetaUnpickler(io.BytesIO(_data_pkl(where))).load()
    except pickle.UnpicklingError:
        raise pickled_objects_error(where) from None
    except (zipfile.BadZipFile, EOFError, ValueError):  # ValueError: a pickle opcode cut off
        raise truncated_error(where) from None
    if not isinstance(blob, dict) or not isinstance(blob.get("meta"), dict) \
            or blob["meta"].get("format") != MODEL_FORMAT:
        raise not_a_model_error(where)
    return blob["meta"]
