"""`train_loop_per_worker` without a cluster: Ray Train's worker API replaced by fakes.

Runs the real loop (restore, train_one_epoch, evaluation, best epoch, report with a
checkpoint) in seconds, and records every tensor that goes through a collective.
"""

import io
import types

import pytest
import torch

import ray.train
import ray.train.torch

from leukray import train
from leukray.config import TrainConfig, to_dict
from test_collectives import META, Collected, FakeShard, recorded  # noqa: F401 (fixture)


@pytest.fixture
def fake_ray_train(monkeypatch):
    """One worker of a world of one; reports and checkpoints are collected."""
    reports = []

    def report(metrics, checkpoint=None):
        blob = None
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                blob = torch.load(f"{d}/{train.CHECKPOINT_FILE}", map_location="cpu", weights_only=True)
        reports.append((metrics, blob))

    ctx = types.SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1)
    shards = {"train": FakeShard(24, seed=1), "val": FakeShard(8, seed=2)}
    monkeypatch.setattr(ray.train, "get_context", lambda: ctx)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train, "get_dataset_shard", shards.__getitem__)
    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda m: m.to(ray.train.torch.get_device()))
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    return reports


def _config(cache: bool, epochs: int = 2) -> dict:
    cfg = TrainConfig(output="unused", epochs=epochs, patience=epochs, batch_size=8, augment=True)
    return {"train": to_dict(cfg), "classes": ["a", "b", "c", "d"], "class_counts": [6, 6, 6, 6], "n_train": 24,
            "threads": 1, "started_at": 0.0, "cache_in_worker": cache}


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "streaming"])
def test_loop_reports_each_epoch_with_a_checkpoint(fake_ray_train, recorded, cache):
    train.train_loop_per_worker(_config(cache))
    assert [m["epoch"] for m, _ in fake_ray_train] == [1, 2]
    metrics, ckpt = fake_ray_train[-1]
    assert ckpt["epoch"] == 1 and ckpt["step"] == 2 * 3 and len(ckpt["history"]) == 2
    assert set(ckpt["model"]) == set(ckpt["best_model"])
    best = max(range(2), key=lambda e: (ckpt["history"][e]["val_accuracy"], -ckpt["history"][e]["val_loss"]))
    assert ckpt["best"]["epoch"] == best
    assert 0 <= metrics["val_accuracy"] <= 1 and metrics["train_loss"] > 0 and metrics["first_batch_s"] > 0
    # collectives ran (val sums, train sums per epoch), each on the worker's device
    assert recorded == [torch.device("cpu")] * 4


def test_loop_collectives_run_on_the_device_the_worker_reports(fake_ray_train, recorded, monkeypatch):
    """Fails on the landed code: with `get_device` patched to `meta`, its first collective
    must carry a meta tensor (the landed loop read each step's loss with .item() and summed
    the val metrics into a CPU tensor, which NCCL refuses)."""
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: META)
    with pytest.raises(Collected):
        train.train_loop_per_worker(_config(cache=True))
    assert recorded == [META]


def replay_checkpoint(blob: dict, monkeypatch) -> None:
    """Make `ray.train.get_checkpoint()` return a checkpoint folder holding `blob`, as Ray
    Train does for a restarted worker group."""
    import contextlib
    import tempfile

    buf = io.BytesIO()
    torch.save(blob, buf)

    class Ckpt:
        @contextlib.contextmanager
        def as_directory(self):
            with tempfile.TemporaryDirectory() as tmp:
                open(f"{tmp}/{train.CHECKPOINT_FILE}", "wb").write(buf.getvalue())
                yield tmp
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: Ckpt())


def test_resume_continues_after_the_checkpointed_epoch(fake_ray_train, recorded, monkeypatch):
    train.train_loop_per_worker(_config(True, epochs=1))
    _, blob = fake_ray_train.pop()
    replay_checkpoint(blob, monkeypatch)
    train.train_loop_per_worker(_config(True, epochs=2))
    assert [m["epoch"] for m, _ in fake_ray_train] == [2]
    assert fake_ray_train[-1][1]["step"] == 6 and len(fake_ray_train[-1][1]["history"]) == 2


def test_best_epoch_rule():
    from leukray.recipe import is_improvement

    best = {"val_accuracy": 0.8, "val_loss": 0.5}
    assert is_improvement(0.9, 9.0, best) and is_improvement(0.8, 0.4, best)
    assert not is_improvement(0.8, 0.5, best) and not is_improvement(0.7, 0.1, best)


def test_startup_breakdown_uses_this_runs_first_rows():
    phases = {"ray_init_s": 3.0, "listing_hashing_s": 0.5, "decode_s": 8.0, "fit_called_s": 12.0}
    history = [{"run_started_at": 1.0, "worker_started_s": 5.0, "first_batch_s": 6.0},  # an earlier run
               {"run_started_at": 100.0, "worker_started_s": 20.0, "first_batch_s": 21.5},
               {"run_started_at": 100.0, "worker_started_s": 20.0, "first_batch_s": 21.5}]
    b = train.startup_breakdown(phases, history, 100.0)
    assert b == {"ray_init_s": 3.0, "listing_hashing_s": 0.5, "decode_s": 8.0, "train_start_s": 8.0,
                 "first_batch_s": 1.5, "startup_s": 21.5}


@pytest.mark.parametrize("n, cpus, blocks", [(2000, 16, 32), (300, 16, 32), (2769, 2, 4), (20, 16, 2), (3, 2, 1)])
def test_ingest_uses_every_cpu(n, cpus, blocks):
    assert train.ingest_blocks(n, cpus) == blocks


def test_plain_baseline_runs_the_same_epoch_loop(monkeypatch):
    """baseline.train_plain goes through recipe.train_one_epoch (one loop for both paths)."""
    from leukray import baseline, recipe

    calls = []
    real = recipe.train_one_epoch
    monkeypatch.setattr(baseline, "train_one_epoch", lambda *a, **k: calls.append(1) or real(*a, **k))
    shard = FakeShard(16)
    cfg = TrainConfig(epochs=2, batch_size=8)
    _, hist = baseline.train_plain(shard.images, shard.labels, cfg, 4, val=(shard.images[:4], shard.labels[:4]))
    assert len(calls) == 2 and [h["epoch"] for h in hist] == [1, 2]
    assert all(h["train_loss"] > 0 and h["train_images_per_s"] > 0 and 0 <= h["val_accuracy"] <= 1 for h in hist)
