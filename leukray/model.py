"""Models and the model file.

Every model takes the output of `leukray.data.preprocess` as is: a uint8 batch of shape
(N, H, W, 3). Scaling to [0, 1] and mean/std normalization happen in the model's first
layer, so the normalization is saved with the weights and no caller can forget or repeat
it (exported ONNX/TorchScript models take the same uint8 input).

The model file is a plain dict saved with `torch.save` and loaded with
`torch.load(weights_only=True)`: loading it executes no pickled code.
"""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import leukray

MODEL_FORMAT = "leukray-model/1"
MODEL_FILENAME = "model.pt"
# Stain statistics of the public dataset's Original set (RGB, 0..1); any fixed value works
# as long as train and inference agree, and they do because it is stored in the model.
DEFAULT_MEAN = (0.80, 0.67, 0.70)
DEFAULT_STD = (0.12, 0.17, 0.10)


class Normalize(nn.Module):
    """uint8 NHWC -> float NCHW (channels-last memory), scaled and normalized."""

    def __init__(self, mean=DEFAULT_MEAN, std=DEFAULT_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            # permute of a contiguous NHWC tensor is already channels-last: no copy.
            x = x.permute(0, 3, 1, 2).float()
        return (x - self.mean) / self.std


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class LeukNet(nn.Module):
    """A small VGG-style CNN sized for CPU training: five stride-2 stages of 3x3 convs.

    At 128x128 input it is 1.2 M parameters and trains at several hundred images/s on
    two CPU cores, enough to fit the public dataset in minutes without pretrained weights.
    """

    def __init__(self, num_classes: int, width: int = 16, dropout: float = 0.2):
        super().__init__()
        layers = [_conv_bn_relu(3, width, 2)]
        cin = width
        for mult in (2, 4, 8, 16):
            cout = width * mult
            layers += [_conv_bn_relu(cin, cout, 2), _conv_bn_relu(cout, cout, 1)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _torchvision(name: str, num_classes: int) -> nn.Module:
    import torchvision

    # weights=None: never download at run time; pretrained weights come from a local file.
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


ARCHITECTURES = {
    "leuknet": lambda n: LeukNet(n),
    "leuknet_wide": lambda n: LeukNet(n, width=24),
    "resnet18": lambda n: _torchvision("resnet18", n),
    "mobilenet_v3_small": lambda n: _torchvision("mobilenet_v3_small", n),
    "efficientnet_b0": lambda n: _torchvision("efficientnet_b0", n),
}


def create_model(arch: str, num_classes: int, mean=DEFAULT_MEAN, std=DEFAULT_STD) -> nn.Module:
    """Build `arch` with the normalization layer in front; weights are random."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    model = nn.Sequential()
    model.add_module("normalize", Normalize(mean, std))
    model.add_module("net", ARCHITECTURES[arch](num_classes))
    return model.to(memory_format=torch.channels_last)


def model_id(state_dict: dict[str, torch.Tensor]) -> str:
    """A short content hash of the weights: the same weights always get the same id."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        h.update(key.encode())
        h.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_model(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """Write the model file; returns the full metadata (with model_id) that was stored."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    meta = {**meta, "format": MODEL_FORMAT, "model_id": model_id(state),
            "leukray_version": leukray.__version__, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    buf = io.BytesIO()
    torch.save({"meta": meta, "state_dict": state}, buf)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)  # atomic: a reader never sees half a model
    return meta


def resolve_model_path(path: str | Path) -> Path:
    """Accept a run directory or a model file."""
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILENAME
    if not p.is_file():
        raise FileNotFoundError(f"no model at {path} (expected a run directory with {MODEL_FILENAME}, or the file)")
    return p


def load_model(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a model file (or run directory) for inference, in eval mode."""
    blob = torch.load(resolve_model_path(path), map_location=device, weights_only=True)
    if not isinstance(blob, dict) or blob.get("meta", {}).get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not a leukray model file ({MODEL_FORMAT})")
    meta = blob["meta"]
    model = create_model(meta["arch"], len(meta["classes"]), meta["mean"], meta["std"])
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval(), meta
