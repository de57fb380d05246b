"""Plain single-process PyTorch loops, the yardstick for leukray's Ray paths.

`benchmark` compares Ray Train and Ray batch inference with these on the same files,
model, batch size, decode function (`leukray.data.preprocess`) and training recipe
(`leukray.recipe.train_step`); the GPU check runs them on CUDA, where Ray is absent.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from leukray.config import TrainConfig
from leukray.data import preprocess, read_bytes
from leukray.model import create_model, freeze_stages
from leukray.model import probabilities
from leukray.recipe import Schedule, class_weights, make_optimizer, train_one_epoch


class FileDataset(torch.utils.data.Dataset):
    """Image files -> uint8 HWC arrays through the shared preprocessing function; with
    `quality` (see `preprocess`) also each file's quality flags, `;`-joined ("" when none)."""

    def __init__(self, paths: list[str], size: int, quality: bool | dict = False):
        self.paths, self.size, self.quality = paths, size, quality

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor | tuple[torch.Tensor, str]:
        image, info = preprocess(read_bytes(self.paths[i]), self.size, self.quality)
        image = np.require(image, requirements="W")  # preprocess may return a read-only view of the decoded bytes
        if self.quality is False:
            return torch.from_numpy(image)
        return torch.from_numpy(image), ";".join(info["quality_flags"])


def decode_all(paths: list[str], size: int, workers: int = 0) -> torch.Tensor:
    """Decode once into memory, as the Ray path does before training."""
    loader = torch.utils.data.DataLoader(FileDataset(paths, size), batch_size=64, num_workers=workers)
    return torch.cat(list(loader))


def predict(model, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Class probabilities for a uint8 NHWC tensor (on the model's device)."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            out.append(probabilities(model(images[i:i + batch_size].to(device))).cpu())
    return torch.cat(out).numpy()


def _shuffled_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, gen: torch.Generator,
                      device: str):
    order = torch.randperm(len(images), generator=gen)
    for i in range(0, len(images), batch_size):
        idx = order[i:i + batch_size]
        yield {"image": images[idx].to(device, non_blocking=True), "label": labels[idx].to(device, non_blocking=True)}


def train_plain(images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, num_classes: int,
                device: str = "cpu", val: tuple[torch.Tensor, torch.Tensor] | None = None,
                log=None) -> tuple[torch.nn.Module, list[dict]]:
    """The leukray recipe in a plain loop: shuffled mini-batches of in-memory images, the
    same epoch loop (`recipe.train_one_epoch`) as the Ray Train workers."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed * 1000)
    model = create_model(cfg.arch, num_classes, weights=cfg.weights).to(device)
    freeze_stages(model, cfg.freeze_stages)
    optimizer = make_optimizer(model, cfg)
    weight = class_weights(torch.bincount(labels, minlength=num_classes).tolist(), device) if cfg.class_weights else None
    n = len(images)
    schedule = Schedule.for_run(math.ceil(n / cfg.batch_size), cfg)
    history = []
    for epoch in range(cfg.epochs):
        batches = _shuffled_batches(images, labels, cfg.batch_size, gen, device)
        out = train_one_epoch(model, optimizer, batches, cfg, schedule, gen, weight)
        row = {"epoch": epoch + 1, "train_loss": float(out["loss_sum"]) / n, "epoch_time_s": out["seconds"],
               "train_images_per_s": n / out["seconds"]}
        if val is not None:
            row["val_accuracy"] = float((predict(model, val[0]).argmax(1) == val[1].numpy()).mean())
        history.append(row)
        if log:
            log(row)
    return model, history
