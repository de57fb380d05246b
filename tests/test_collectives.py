"""Every tensor that goes through a `torch.distributed` collective lives on the worker's device.

Under NCCL a CPU tensor in a collective crashes (`leukray train --gpu` died so at its first
validation). CI has no GPU, so these tests run on the `meta` device, which a CPU tensor
cannot be mistaken for, with a recording `all_reduce` in place of the real one.
"""

import ast
from pathlib import Path

import pytest
import torch

import leukray
from leukray import collectives
from leukray.model import create_model

META = torch.device("meta")


class Collected(Exception):
    """Raised by the recording all_reduce: a meta tensor has no values to read on from."""


@pytest.fixture
def recorded(monkeypatch):
    """Pretend to be in a process group; record each collective's tensor device, then stop."""
    seen = []

    def all_reduce(tensor, *args, **kwargs):
        seen.append(tensor.device)
        if tensor.device == META:
            raise Collected
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    return seen


class FakeShard:
    """What `train._batches` reads from a Ray Data shard: `iter_torch_batches`."""

    def __init__(self, n: int, size: int = 32, classes: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)
        self.labels = torch.arange(n) % classes

    def iter_torch_batches(self, batch_size, device=None, **_):
        for i in range(0, len(self.labels), batch_size):
            yield {"image": self.images[i:i + batch_size].to(device or "cpu"),
                   "label": self.labels[i:i + batch_size].to(device or "cpu")}


def test_all_reduce_sum_builds_its_tensor_on_the_given_device(recorded):
    with pytest.raises(Collected):
        collectives.all_reduce_sum([1.0, 2, torch.zeros((), device=META)], META)
    assert recorded == [META]


def test_all_reduce_sum_outside_a_process_group_is_local():
    assert collectives.all_reduce_sum([1.5, 2, torch.tensor(3)], "cpu").tolist() == [1.5, 2.0, 3.0]


@pytest.mark.parametrize("cache", [None, {}], ids=["streaming", "cached"])
def test_validation_collective_runs_on_the_worker_device(recorded, cache):
    """Fails on the landed code: it summed into a CPU float64 tensor (and read each batch
    with .item(), which a device tensor cannot do without a host sync)."""
    from leukray.train import _evaluate_shard

    model = create_model("leuknet", 4).to(META)
    with pytest.raises(Collected):
        _evaluate_shard(model, FakeShard(8), 4, META, cache)
    assert recorded == [META]


def test_no_other_module_calls_torch_distributed():
    """A new collective elsewhere would bypass the device rule: they all go through collectives.py."""
    offenders = []
    for path in sorted(Path(leukray.__file__).parent.glob("*.py")):
        if path.name == "collectives.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch":
                names = [f"torch.{node.attr}"]
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if n.startswith("torch.distributed")]
    assert offenders == []
