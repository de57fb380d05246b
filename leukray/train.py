"""Training with Ray Train: split, preprocess once with Ray Data, fit with TorchTrainer.

Flow of `fit()`:
1. list the class folders, hash every file, split (leukray.split) -> RUN_DIR/split.csv;
2. Ray Data decodes and resizes each split once with the shared `preprocess_batch` and
   keeps the result in the object store (small images: 2,769 at 128 px are ~140 MB),
   so epochs cost only the model, not JPEG decoding;
3. `TorchTrainer` runs `train_loop_per_worker` on N workers (DDP, gloo on CPU, NCCL on
   GPU); each epoch it reports metrics and a checkpoint that holds the best weights so
   far, so the latest checkpoint alone is enough to resume or to finish;
4. the best weights become RUN_DIR/model.pt, then `leukray.evaluate` scores the test
   split through the same batch-inference path users run.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from leukray import runtime, storage
from leukray.config import DataConfig, RayConfig, TrainConfig, from_dict, to_dict
from leukray.data import list_labeled_images, preprocess_batch, sha256_file
from leukray.model import create_model, freeze_stages, save_model
from leukray.recipe import class_weights, lr_at, make_optimizer, train_step
from leukray.split import assign_splits, manifest_hash, split_summary

CHECKPOINT_FILE = "checkpoint.pt"
WORKER_CACHE_BYTES = 2 * 2**30  # per worker; larger datasets stream from Ray Data every epoch


# --------------------------------------------------------------------------- data

def prepare_split(data_cfg: DataConfig, run_dir: Path) -> tuple[pd.DataFrame, list[str], list[str]]:
    """List, hash and split the data; write RUN_DIR/split.csv. Returns (manifest, classes, skipped)."""
    listing = list_labeled_images(data_cfg.data)
    df = pd.DataFrame(listing.records)
    df["sha256"] = [sha256_file(p) for p in df["path"]]
    df = assign_splits(df, data_cfg.split, data_cfg.group_size, data_cfg.val_fraction,
                       data_cfg.test_fraction, data_cfg.split_seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    df[["path", "relpath", "sha256", "label", "split", "group"]].to_csv(run_dir / "split.csv", index=False)
    return df, listing.classes, listing.skipped


def labeled_dataset(df: pd.DataFrame, classes: list[str], image_size: int, seed: int):
    """A materialized Ray Dataset of (image uint8 HWC, label int) rows, shuffled once.

    Files that fail to decode are dropped here and returned as (path, error) pairs.
    """
    import ray

    index = {c: i for i, c in enumerate(classes)}
    items = [{"path": p, "label": index[lab]} for p, lab in zip(df["path"], df["label"])]
    np.random.default_rng(seed).shuffle(items)  # mix classes across blocks
    blocks = max(1, min(len(items) // 64, 64))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(preprocess_batch, fn_kwargs={"size": image_size}, batch_size=64)
    ds = ds.materialize()
    status = ds.select_columns(["path", "error"]).to_pandas()
    bad = status[status["error"].map(lambda e: isinstance(e, str))]
    if len(bad):
        ds = ds.filter(lambda r: not isinstance(r["error"], str))
    good = ds.select_columns(["image", "label"]).materialize()
    return good, list(zip(bad["path"], bad["error"]))


# --------------------------------------------------------------------------- worker

def _batches(shard, batch_size: int, device, cache: dict | None, shuffle_seed: int | None):
    """A worker's batches for one epoch.

    Streaming (`cache is None`): Ray Data's iterator with a local shuffle buffer, for data
    that does not fit in a worker's memory. Cached: the shard is pulled from the object
    store once, then each epoch is a permutation of in-memory tensors (a full shuffle
    instead of a 1,024-row buffer, and no per-epoch Arrow->torch conversion). On the
    2-core reference machine the two paths trained at about the same speed (~300 img/s):
    the network, not the data path, bounds an epoch there.
    """
    if cache is None:
        yield from shard.iter_torch_batches(
            batch_size=batch_size, device=device,
            local_shuffle_buffer_size=1024 if shuffle_seed is not None else None, local_shuffle_seed=shuffle_seed)
        return
    if "image" not in cache:
        parts = list(shard.iter_torch_batches(batch_size=1024))
        cache["image"] = torch.cat([p["image"] for p in parts]) if parts else torch.empty(0, dtype=torch.uint8)
        cache["label"] = torch.cat([p["label"] for p in parts]) if parts else torch.empty(0, dtype=torch.long)
    n = len(cache["label"])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed)) if shuffle_seed is not None \
        else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        yield {"image": cache["image"][idx].to(device), "label": cache["label"][idx].to(device)}


def _evaluate_shard(model, shard, batch_size: int, device, cache: dict | None = None) -> dict:
    """Loss and accuracy over this worker's val shard, summed across workers."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for batch in _batches(shard, batch_size, device, cache, None):
            logits = model(batch["image"])
            y = batch["label"]
            totals += torch.tensor([
                F.cross_entropy(logits, y, reduction="sum").item(),
                (logits.argmax(1) == y).sum().item(),
                len(y),
            ], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    loss_sum, correct, count = totals.tolist()
    return {"val_loss": loss_sum / max(count, 1), "val_accuracy": correct / max(count, 1)}


def should_stop(epoch: int, best_epoch: int, epochs: int, patience: int) -> bool:
    """Early stopping, only in the second half of the schedule.

    While the learning rate is high, validation accuracy swings by tens of points from one
    epoch to the next (seen on the Segmented set), so "no better epoch for `patience`
    epochs" would stop runs that end well once the cosine schedule has cooled down.
    """
    start = epochs // 2
    return epoch >= start and epoch - max(best_epoch, start - 1) > patience


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point; `config` is a plain dict (see `fit`)."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg = from_dict(TrainConfig, config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)

    classes = config["classes"]
    checkpoint = ray.train.get_checkpoint()
    # --weights initializes a fresh run only: a checkpoint holds every weight and the
    # normalization buffers, so resuming needs neither the weights file nor the network.
    model = create_model(cfg.arch, len(classes), weights=None if checkpoint else cfg.weights)
    trained_params = freeze_stages(model, cfg.freeze_stages)  # before the optimizer: it takes trainable ones
    if rank == 0 and cfg.freeze_stages:
        print(f"[leukray] first {cfg.freeze_stages} backbone stages frozen; {trained_params:,} parameters train",
              flush=True)
    device = ray.train.torch.get_device()
    start_epoch, step, history = 0, 0, []
    best = {"epoch": -1, "val_accuracy": -1.0, "val_loss": float("inf")}
    best_state = None
    optimizer = make_optimizer(model, cfg)

    if checkpoint:  # resuming after a failure or a re-run with the same run directory
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step, history, best, best_state = (
            state["epoch"] + 1, state["step"], state["history"], state["best"], state["best_model"])
        if rank == 0:
            print(f"[leukray] resumed from checkpoint after epoch {state['epoch'] + 1}", flush=True)

    model = ray.train.torch.prepare_model(model)
    weight = class_weights(config["class_counts"], device) if cfg.class_weights else None

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    per_worker_batch = max(1, cfg.batch_size // world)
    steps_per_epoch = math.ceil(config["n_train"] / (per_worker_batch * world))
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = steps_per_epoch * cfg.warmup_epochs
    train_cache, val_cache = ({}, {}) if config["cache_in_worker"] else (None, None)

    for epoch in range(start_epoch, cfg.epochs):
        if should_stop(epoch, best["epoch"], cfg.epochs, cfg.patience):
            break  # all workers see the same all-reduced val metrics, so all stop together
        model.train()
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        first_batch_s = None
        for batch in _batches(train_shard, per_worker_batch, device, train_cache,
                              shuffle_seed=(cfg.seed * 1000 + rank) * 1000 + epoch):
            if first_batch_s is None:
                first_batch_s = time.time() - config["started_at"]  # start-up cost, seen from the driver
            y = batch["label"]
            loss, n_correct = train_step(model, optimizer, batch["image"], y, cfg,
                                         lr_at(step, total_steps, warmup_steps, cfg.lr), gen, weight)
            step += 1
            loss_sum += loss * len(y)
            correct += n_correct
            seen += len(y)
        train_time = time.perf_counter() - t0
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            **_evaluate_shard(model, val_shard, cfg.batch_size, device, val_cache),
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_time_s": time.perf_counter() - t0,
            "train_images_per_s": seen * world / train_time,
            "first_batch_s": first_batch_s,
        }
        improved = (metrics["val_accuracy"], -metrics["val_loss"]) > (best["val_accuracy"], -best["val_loss"])
        if improved:
            best = {"epoch": epoch, "val_accuracy": metrics["val_accuracy"], "val_loss": metrics["val_loss"]}
            best_state = {k: v.detach().cpu().clone() for k, v in getattr(model, "module", model).state_dict().items()}
        history.append(metrics)
        if rank == 0:
            print(
                f"[leukray] epoch {epoch + 1}/{cfg.epochs}  train loss {metrics['train_loss']:.4f} "
                f"acc {metrics['train_accuracy']:.4f}  val loss {metrics['val_loss']:.4f} "
                f"acc {metrics['val_accuracy']:.4f}{' *' if improved else ''}  "
                f"{metrics['epoch_time_s']:.1f}s ({metrics['train_images_per_s']:.0f} img/s)",
                flush=True,
            )
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save({
                    "epoch": epoch, "step": step, "history": history, "best": best,
                    "model": {k: v.cpu() for k, v in getattr(model, "module", model).state_dict().items()},
                    "optimizer": optimizer.state_dict(), "best_model": best_state,
                }, Path(tmp) / CHECKPOINT_FILE)
                ckpt = Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)


# --------------------------------------------------------------------------- driver

def _check_run_dir(run_dir: Path, run_config: dict) -> None:
    """A run directory belongs to one data/split/model setup; re-running it resumes."""
    cfg_file = run_dir / "config.json"
    if not cfg_file.exists():
        return
    old = json.loads(cfg_file.read_text())
    keys = ("data", "train")
    fixed = ("data", "image_size", "split", "group_size", "val_fraction", "test_fraction", "split_seed", "arch", "weights",
             "freeze_stages")
    for section in keys:
        for k in fixed:
            if k in old.get(section, {}) and old[section][k] != run_config[section].get(k):
                raise ValueError(
                    f"{run_dir} holds a run with {section}.{k}={old[section][k]!r}, not {run_config[section].get(k)!r}; "
                    "use another --output (re-running the same command resumes it)"
                )


def fit(data_cfg: DataConfig, train_cfg: TrainConfig, ray_cfg: RayConfig | None = None) -> dict:
    """Run the whole training stage; returns a summary (paths, timings, metrics).

    `train_cfg.output` may be a URI (s3://...): see `leukray.storage`.
    """
    if storage.is_uri(data_cfg.data):
        raise ValueError("train --data must be a folder on a file system every node can read (on a cluster: "
                         "shared storage such as NFS/EFS mounted at the same path); --output may be a URI")
    output = train_cfg.output if storage.is_uri(train_cfg.output) else str(Path(train_cfg.output).resolve())
    with storage.synced_run_dir(output) as run_dir:
        result = _fit(data_cfg, train_cfg, ray_cfg, run_dir, storage.ray_storage_path(output, run_dir))
    return {**result, "run_dir": output, "model": f"{output.rstrip('/')}/model.pt"}


def _fit(data_cfg: DataConfig, train_cfg: TrainConfig, ray_cfg: RayConfig | None, run_dir: Path,
         storage_path: str) -> dict:
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t_start, started_at = time.perf_counter(), time.time()
    run_config = {"data": to_dict(data_cfg), "train": to_dict(train_cfg)}
    _check_run_dir(run_dir, run_config)
    df, classes, skipped = prepare_split(data_cfg, run_dir)
    summary = split_summary(df)
    split_id = manifest_hash(df)
    (run_dir / "config.json").write_text(json.dumps({**run_config, "classes": classes, "split_id": split_id}, indent=2))
    if storage.is_uri(train_cfg.output):  # before any checkpoint: a re-run elsewhere checks this config
        storage.upload(run_dir, train_cfg.output)
    print(f"[leukray] {len(df)} images, classes {classes}, split {summary['policy']} "
          f"({summary['groups']} groups): " + ", ".join(f"{s} {sum(c.values())}" for s, c in summary["counts"].items()))
    if skipped:
        print(f"[leukray] skipped {len(skipped)} non-image files, e.g. {skipped[:3]}")

    runtime.init_ray(ray_cfg)
    runtime.check_shared_paths(read={"--data": data_cfg.data},  # workers read the data, write checkpoints
                               write={} if storage.is_uri(train_cfg.output) else {"--output": str(run_dir)})
    t_ingest = time.perf_counter()
    datasets, bad = {}, []
    for name in ("train", "val"):
        ds, errs = labeled_dataset(df[df["split"] == name], classes, data_cfg.image_size, train_cfg.seed)
        datasets[name], bad = ds, bad + errs
    ingest_s = time.perf_counter() - t_ingest
    if bad:
        print(f"[leukray] {len(bad)} unreadable images left out of training, e.g. {bad[:3]}")
    train_df = df[(df["split"] == "train") & ~df["path"].isin([p for p, _ in bad])]
    class_counts = [int((train_df["label"] == c).sum()) for c in classes]

    # Each worker keeps its shard in memory when its share is small (see `_batches`).
    shard_bytes = sum(ds.size_bytes() for ds in datasets.values()) / max(1, train_cfg.workers)
    cache_in_worker = shard_bytes <= WORKER_CACHE_BYTES
    cluster = runtime.ClusterCPUs.current()
    cpus = runtime.worker_cpus(train_cfg.cpus_per_worker, train_cfg.workers, cluster)
    workers_per_node = min(train_cfg.workers, max(1, int(cluster.per_node_max // max(cpus, 1e-6))))
    threads = runtime.torch_threads(train_cfg.threads_per_worker, workers_per_node, cluster)
    resources = {"CPU": 1.0, "GPU": 1.0} if train_cfg.gpu else {"CPU": cpus}
    print(f"[leukray] training {train_cfg.arch} on {train_cfg.workers} worker(s) x {resources}, "
          f"{threads} torch thread(s) each, up to {train_cfg.epochs} epochs")

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": to_dict(train_cfg), "classes": classes, "class_counts": class_counts,
            "n_train": int(datasets["train"].count()), "threads": threads, "started_at": started_at,
            "cache_in_worker": cache_in_worker,
        },
        scaling_config=ScalingConfig(num_workers=train_cfg.workers, use_gpu=train_cfg.gpu, resources_per_worker=resources,
                                     placement_strategy="PACK" if train_cfg.gpu else "SPREAD"),
        run_config=RunConfig(
            name="train", storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=train_cfg.max_failures),
            # Ray Train logs every report at INFO; leukray prints its own epoch lines.
            logging_config=ray.LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
    )
    t_fit = time.perf_counter()
    result = trainer.fit()
    fit_s = time.perf_counter() - t_fit
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)

    model = create_model(train_cfg.arch, len(classes))
    model.load_state_dict(state["best_model"])
    meta = save_model(run_dir / "model.pt", model, {
        "arch": train_cfg.arch, "classes": classes, "image_size": data_cfg.image_size,
        "mean": model.normalize.mean.flatten().div(255).tolist(), "std": model.normalize.std.flatten().div(255).tolist(),
        "train_config": run_config, "split_id": split_id, "best_epoch": state["best"]["epoch"] + 1,
        "val_accuracy": state["best"]["val_accuracy"],
    })
    (run_dir / "history.json").write_text(json.dumps(state["history"], indent=2))
    print(f"[leukray] best epoch {meta['best_epoch']} (val acc {meta['val_accuracy']:.4f}); model {meta['model_id']} -> {run_dir / 'model.pt'}")

    from leukray.evaluate import evaluate_run

    metrics = evaluate_run(run_dir, ray_cfg)
    timings = {"ingest_s": ingest_s, "fit_s": fit_s, "total_s": time.perf_counter() - t_start,
               "epochs_run": len(state["history"])}
    (run_dir / "timings.json").write_text(json.dumps(timings, indent=2))
    return {"run_dir": str(run_dir), "model": str(run_dir / "model.pt"), "metrics": metrics, "timings": timings}
