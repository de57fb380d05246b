"""The training recipe, shared by the Ray Train loop and the plain-PyTorch baseline.

`train_one_epoch` (after torchvision's references/classification) is the one epoch loop
both call, and `train_step` its unit, so a benchmark of Ray against plain PyTorch, or the
GPU check, measures exactly the recipe leukray trains with. Which epoch is kept
(`is_improvement`) and when training stops early (`should_stop`) are recipe too.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from leukray.config import TrainConfig


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Smear-appropriate augmentation on a uint8 NHWC batch -> float NCHW in 0..255.

    Cells have no up or down: any rotation, a flip, +-10% scale and a small shift (one
    `grid_sample` per batch), then per-image stain jitter (channel gain and offset,
    contrast). Everything is batched tensor math, cheap next to the network.
    """
    x = images.permute(0, 3, 1, 2).float()
    n, dev = x.shape[0], x.device

    def u(*shape, lo=-1.0, hi=1.0):
        return (torch.rand(*shape, generator=gen) * (hi - lo) + lo).to(dev)

    angle = u(n, lo=0.0, hi=2 * math.pi)
    scale = 1.0 + 0.1 * u(n)
    flip = torch.where(u(n) < 0, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([
        torch.stack([cos * flip, -sin, 0.05 * u(n)], 1),
        torch.stack([sin * flip, cos, 0.05 * u(n)], 1),
    ], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * (1.0 + 0.15 * u(n, 1, 1, 1)) + mean
    x = x * (1.0 + 0.08 * u(n, 3, 1, 1)) + 8.0 * u(n, 3, 1, 1)
    return x.clamp_(0, 255).contiguous(memory_format=torch.channels_last)


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the parameters that train (frozen stages, see `freeze_stages`, have none)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def class_weights(counts: list[int], device="cpu") -> torch.Tensor:
    """Inverse-frequency loss weights (mean 1): Benign, the rarest class, counts more."""
    c = torch.tensor(counts, dtype=torch.float32)
    return (c.sum() / (len(c) * c.clamp(min=1))).to(device)


def autocast(device: torch.device | str, enabled: bool):
    """bf16 autocast on CUDA when `enabled` (`TrainConfig.amp`), else nothing: CPU runs stay fp32.

    bf16 keeps fp32's exponent range, so unlike fp16 it needs no loss scaling.
    """
    if enabled and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model, optimizer, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, lr: float,
               gen: torch.Generator, weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a uint8 NHWC batch; returns (mean loss, correct predictions) as
    0-dim tensors on the batch's device: reading them is the caller's choice (a host sync on GPU)."""
    x = augment(images, gen) if cfg.augment else images
    for g in optimizer.param_groups:
        g["lr"] = lr
    with autocast(images.device, cfg.amp):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), labels, weight=weight, label_smoothing=cfg.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.argmax(1) == labels).sum()


@dataclass
class Schedule:
    """Where the next optimizer step falls in the warm-up + cosine schedule (`lr_at`)."""

    total_steps: int
    warmup_steps: int
    step: int = 0

    @classmethod
    def for_run(cls, steps_per_epoch: int, cfg: TrainConfig, step: int = 0) -> "Schedule":
        return cls(steps_per_epoch * cfg.epochs, steps_per_epoch * cfg.warmup_epochs, step)

    def lr(self, base_lr: float) -> float:
        return lr_at(self.step, self.total_steps, self.warmup_steps, base_lr)


class WeightEma:
    """Exponential moving average of a model's weights and buffers (timm's `ModelEmaV3` idea).

    Why: from scratch, validation accuracy swings by tens of points between neighbouring
    epochs while the learning rate is high, so the "best epoch" is partly luck. The average
    of the last few hundred steps' weights moves smoothly; it is what leukray evaluates,
    selects and saves (`TrainConfig.ema`).

    After update t (counting from 0) the average is `ema = d_t * ema + (1 - d_t) * weights`
    with `d_t = min(decay, (1 + t) / (10 + t))` (TensorFlow's `num_updates` warm-up): early
    on the average forgets the random initialization within a few steps instead of ~1/(1-decay).
    Floating-point buffers (BatchNorm running mean/var) are averaged like weights, so they
    match the averaged weights; integer buffers (`num_batches_tracked`) are copied.
    `torch.optim.swa_utils.AveragedModel` with `get_ema_multi_avg_fn` has a fixed decay
    (no warm-up) and averages (and truncates) the integer counters too, hence this small class.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"--ema-decay {decay}: must be in [0, 1)")
        self.module = copy.deepcopy(getattr(model, "module", model)).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0
        self._source, self._floats, self._others = None, ([], []), []

    def decay_at(self, t: int) -> float:
        return min(self.decay, (1.0 + t) / (10.0 + t))

    def _pair_tensors(self, model: torch.nn.Module) -> None:
        """(average, model) tensor pairs, found once per model: parameters and buffers are
        updated in place by the optimizer, BatchNorm and load_state_dict, so the pairs stay
        valid, and each step skips building two state dicts (as long as the lerp itself)."""
        ema_sd, cur_sd = self.module.state_dict(), getattr(model, "module", model).state_dict()
        floats = [k for k, v in ema_sd.items() if v.is_floating_point()]
        self._floats = ([ema_sd[k] for k in floats], [cur_sd[k] for k in floats])
        self._others = [(ema_sd[k], cur_sd[k]) for k in ema_sd if k not in set(floats)]
        self._source = model

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Fold the current weights of `model` (DDP-wrapped or not) into the average: one
        fused lerp over all floating-point tensors, on their device (no host sync)."""
        if self._source is not model:
            self._pair_tensors(model)
        for e, c in self._others:
            e.copy_(c)
        if self._floats[0]:
            torch._foreach_lerp_(*self._floats, 1.0 - self.decay_at(self.updates))
        self.updates += 1

    def state_dict(self) -> dict:
        """What a checkpoint keeps so that a resumed run continues the same average."""
        return {"module": {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()},
                "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


def train_one_epoch(model, optimizer, batches: Iterable[dict], cfg: TrainConfig, schedule: Schedule,
                    gen: torch.Generator, weight: torch.Tensor | None,
                    on_first_batch: Callable[[], None] | None = None, ema: WeightEma | None = None,
                    on_batch: Callable[[int], None] | None = None) -> dict:
    """One pass over `batches` (dicts of uint8 "image" and int "label" tensors on the model's
    device). Returns {"loss_sum", "correct"} (tensors on that device: no host sync per step),
    "seen" and "seconds"; the caller sums them across workers if there are several.
    `ema`, if given, is updated after every optimizer step; `on_batch(images)` after each
    step feeds a progress bar (`leukray.progress`)."""
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    t0 = time.perf_counter()
    for batch in batches:
        if seen == 0 and on_first_batch is not None:
            on_first_batch()
        y = batch["label"]
        loss, n_correct = train_step(model, optimizer, batch["image"], y, cfg, schedule.lr(cfg.lr), gen, weight)
        schedule.step += 1
        if ema is not None:
            ema.update(model)
        loss_sum, correct, seen = loss_sum + loss * len(y), correct + n_correct, seen + len(y)
        if on_batch is not None:
            on_batch(len(y))
    if isinstance(loss_sum, torch.Tensor) and loss_sum.is_cuda:
        torch.cuda.synchronize(loss_sum.device)  # the last steps' kernels belong to this epoch's time
    return {"loss_sum": loss_sum, "correct": correct, "seen": seen, "seconds": time.perf_counter() - t0}


def is_improvement(val_accuracy: float, val_loss: float, best: dict) -> bool:
    """The epoch kept as the model: higher val accuracy; at equal accuracy, lower val loss;
    a full tie keeps the earlier epoch. `best`: {"val_accuracy", "val_loss"} so far."""
    return (val_accuracy, -val_loss) > (best["val_accuracy"], -best["val_loss"])


def should_stop(epoch: int, best_epoch: int, epochs: int, patience: int) -> bool:
    """Early stopping, only in the second half of the schedule.

    While the learning rate is high, validation accuracy swings by tens of points from one
    epoch to the next (seen on the Segmented set), so "no better epoch for `patience`
    epochs" would stop runs that end well once the cosine schedule has cooled down.
    """
    start = epochs // 2
    return epoch >= start and epoch - max(best_epoch, start - 1) > patience
