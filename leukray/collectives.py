"""The one place leukray talks to `torch.distributed`.

Under NCCL (Ray Train with `use_gpu=True`) a collective only accepts tensors on the
worker's GPU: a CPU tensor raises "No backend type associated with device type cpu" (the
first validation of `leukray train --gpu` crashed exactly so). Every collective therefore
goes through a helper here that builds its tensor on the device it is given, and a test
checks that no other module of leukray calls `torch.distributed` itself.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside a process group (Ray Train workers); False in plain single-process loops."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(values: Sequence[float | torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """Sum `values` element-wise across all workers; returns a float64 tensor on `device`.

    `values` may be Python numbers or 0-dim tensors already on `device` (accumulators kept
    on the GPU need no host sync until the caller reads the result). Outside a process
    group the sum is over this process alone.
    """
    device = torch.device(device)
    parts = [v.detach().to(device=device, dtype=torch.float64).reshape(()) if isinstance(v, torch.Tensor)
             else torch.tensor(float(v), dtype=torch.float64, device=device) for v in values]
    totals = torch.stack(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return totals
