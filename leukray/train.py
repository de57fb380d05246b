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
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from leukray import progress, runtime, storage, trust
from leukray.config import DataConfig, RayConfig, TrainConfig, from_dict, to_dict
from leukray.data import list_labeled_images, preprocess_batch, require_data_folder, sha256_file
from leukray.collectives import all_reduce_sum
from leukray.model import create_model, freeze_stages, save_model
from leukray.recipe import (Schedule, WeightEma, autocast, class_weights, is_improvement, make_optimizer,
                            should_stop, train_one_epoch)
from leukray.rundir import CONFIG_FILE, HISTORY_FILE, MODEL_FILE, SPLIT_FILE, TIMINGS_FILE
from leukray.split import assign_splits, manifest_hash, split_summary

CHECKPOINT_FILE = "checkpoint.pt"
INGEST_TASKS_PER_CPU = 2
MIN_FILES_PER_BLOCK = 8
WORKER_CACHE_BYTES = 2 * 2**30  # per worker; larger datasets stream from Ray Data every epoch


# --------------------------------------------------------------------------- data

def prepare_split(data_cfg: DataConfig, run_dir: Path) -> tuple[pd.DataFrame, list[str], list[str]]:
    """List, hash and split the data; write RUN_DIR/split.csv. Returns (manifest, classes, skipped)."""
    listing = list_labeled_images(data_cfg.data)
    df = pd.DataFrame(listing.records)
    df["sha256"] = [sha256_file(p) for p in df["path"]]
    df = assign_splits(df, data_cfg.split, data_cfg.group_size, data_cfg.val_fraction,
                       data_cfg.test_fraction, data_cfg.split_seed, data_cfg.folds, data_cfg.fold)
    run_dir.mkdir(parents=True, exist_ok=True)
    df[["path", "relpath", "sha256", "label", "split", "group"]].to_csv(run_dir / SPLIT_FILE, index=False)
    return df, listing.classes, listing.skipped


def ingest_blocks(n_files: int, cluster_cpus: float) -> int:
    """Blocks (= decode tasks) for `n_files`: INGEST_TASKS_PER_CPU per CPU of the cluster, so
    every CPU decodes and a slow task is not the tail, but at least MIN_FILES_PER_BLOCK files
    per task (a task costs milliseconds to schedule). The landed rule, at most 64 blocks of 64
    files, gave a 300-file val split 4 tasks, whatever the cluster."""
    wanted = max(1, int(cluster_cpus * INGEST_TASKS_PER_CPU))
    return max(1, min(wanted, n_files // MIN_FILES_PER_BLOCK or 1))


def labeled_dataset(df: pd.DataFrame, classes: list[str], image_size: int, seed: int,
                    cluster_cpus: float | None = None, on_rows=None):
    """A materialized Ray Dataset of (image uint8 HWC, label int) rows, shuffled once.

    Files that fail to decode are dropped here and returned as (path, error) pairs.
    `on_rows(n)` as decoded blocks arrive (a progress bar).
    """
    import ray

    index = {c: i for i, c in enumerate(classes)}
    items = [{"path": p, "label": index[lab]} for p, lab in zip(df["path"], df["label"])]
    np.random.default_rng(seed).shuffle(items)  # mix classes across blocks
    cpus = cluster_cpus if cluster_cpus is not None else runtime.ClusterCPUs.current().total
    blocks = ingest_blocks(len(items), cpus)
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    # one batch per block: each decode task handles its block in one call
    ds = ds.map_batches(preprocess_batch, fn_kwargs={"size": image_size}, batch_size=-(-len(items) // blocks))
    with runtime.prompt_task_stages():  # every step below runs Ray Data tasks
        ds = _materialize(ds, on_rows) if on_rows else ds.materialize()
        status = ds.select_columns(["path", "error"]).to_pandas()
        bad = status[status["error"].map(lambda e: isinstance(e, str))]
        if len(bad):
            ds = ds.filter(lambda r: not isinstance(r["error"], str))
        good = ds.select_columns(["image", "label"]).materialize()
    return good, list(zip(bad["path"], bad["error"]))


def _materialize(ds, on_rows):
    """`ds.materialize()`, reporting rows as each block is done (materialize() says nothing
    until the end). The blocks stay in the object store: the refs are reused, not copied."""
    import ray

    refs = []
    for bundle in ds.iter_internal_ref_bundles():
        refs += list(bundle.block_refs)
        on_rows(bundle.num_rows())
    return ray.data.from_arrow_refs(refs)


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


def _evaluate_shard(model, shard, batch_size: int, device, cache: dict | None = None, amp: bool = False) -> dict:
    """Loss and accuracy over this worker's val shard, summed across workers.

    The sums stay on `device` (no host sync per batch) and go through
    `collectives.all_reduce_sum`, which keeps them there: NCCL refuses CPU tensors.
    """
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with torch.no_grad(), autocast(device, amp):
        for batch in _batches(shard, batch_size, device, cache, None):
            logits = model(batch["image"]).float()
            y = batch["label"]
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
            count += len(y)
    loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], device).tolist()
    return {"val_loss": loss_sum / max(count, 1), "val_accuracy": correct / max(count, 1)}


def _restore(cfg: TrainConfig, classes: list[str], rank: int):
    """The model, its optimizer and the loop state: fresh, or from the last checkpoint.

    --weights initializes a fresh run only: a checkpoint holds every weight and the
    normalization buffers, so resuming needs neither the weights file nor the network.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    model = create_model(cfg.arch, len(classes), weights=None if checkpoint else cfg.weights)
    trained_params = freeze_stages(model, cfg.freeze_stages)  # before the optimizer: it takes trainable ones
    if rank == 0 and cfg.freeze_stages:
        print(f"[leukray] first {cfg.freeze_stages} backbone stages frozen; {trained_params:,} parameters train",
              flush=True)
    optimizer = make_optimizer(model, cfg)
    state = {"epoch": -1, "step": 0, "history": [], "best_model": None, "ema": None,
             "best": {"epoch": -1, "val_accuracy": -1.0, "val_loss": float("inf")}}
    if checkpoint:  # resuming after a failure or a re-run with the same run directory
        with checkpoint.as_directory() as d:
            saved = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = {k: saved.get(k) for k in state}  # "ema" is absent from checkpoints of --no-ema runs
        if rank == 0:
            print(f"[leukray] resumed from checkpoint after epoch {state['epoch'] + 1}", flush=True)
    return model, optimizer, state


def _epoch_metrics(epoch: int, train: dict, val: dict, lr: float, world: int, device, clock: dict) -> dict:
    """One history row; the train sums of all workers are added here (one collective).

    `clock` (time.time() values): the driver's start, this worker's start and its first
    batch, so the row tells where start-up went (`fit` splits it in timings.json).
    """
    loss_sum, correct, seen, seconds = all_reduce_sum(
        [train["loss_sum"], train["correct"], train["seen"], train["seconds"]], device).tolist()
    first = clock.get("first_batch_at")
    return {
        "epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1), **val,
        "lr": lr, "epoch_time_s": time.perf_counter() - train["t0"],
        "train_images_per_s": seen / max(seconds / world, 1e-9),
        "run_started_at": clock["started_at"], "worker_started_s": clock["worker_started_at"] - clock["started_at"],
        "first_batch_s": None if first is None else first - clock["started_at"],
    }


def _keep_best(state: dict, metrics: dict, epoch: int, model) -> bool:
    """Record `metrics`; if this epoch is the best so far (`recipe.is_improvement`), keep its weights."""
    improved = is_improvement(metrics["val_accuracy"], metrics["val_loss"], state["best"])
    if improved:
        state["best"] = {"epoch": epoch, "val_accuracy": metrics["val_accuracy"], "val_loss": metrics["val_loss"]}
        state["best_model"] = {k: v.detach().cpu().clone() for k, v in _unwrap(model).state_dict().items()}
    state["history"].append(metrics)
    state["epoch"] = epoch
    return improved


def _unwrap(model):
    return getattr(model, "module", model)  # DistributedDataParallel


def _print_epoch(m: dict, epochs: int, improved: bool) -> None:
    print(f"[leukray] epoch {m['epoch']}/{epochs}  train loss {m['train_loss']:.4f} acc {m['train_accuracy']:.4f}  "
          f"val loss {m['val_loss']:.4f} acc {m['val_accuracy']:.4f}{' *' if improved else ''}  "
          f"{m['epoch_time_s']:.1f}s ({m['train_images_per_s']:.0f} img/s)", flush=True)


def _make_ema(model, cfg: TrainConfig, saved: dict | None) -> WeightEma | None:
    """The weight average of this run (`recipe.WeightEma`), continued from the checkpoint's
    if there is one: a resumed run then selects exactly what an uninterrupted one would."""
    if not cfg.ema:
        return None
    ema = WeightEma(model, cfg.ema_decay)
    if saved is not None:
        ema.load_state_dict(saved)
    return ema


def _report(metrics: dict, state: dict, model, optimizer, rank: int) -> None:
    """Report the epoch to Ray Train; rank 0 attaches a checkpoint (latest weights, optimizer,
    weight average, best weights so far: the latest checkpoint alone is enough to resume or
    to finish)."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            torch.save({**state, "model": {k: v.cpu() for k, v in _unwrap(model).state_dict().items()},
                        "optimizer": optimizer.state_dict()}, Path(tmp) / CHECKPOINT_FILE)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point; `config` is a plain dict (see `fit`). The steps after
    torchvision's references/classification: restore, then per epoch train_one_epoch,
    evaluate, keep the best, report with a checkpoint."""
    import ray.train
    import ray.train.torch

    clock = {"started_at": config["started_at"], "worker_started_at": time.time()}
    cfg = from_dict(TrainConfig, config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    model, optimizer, state = _restore(cfg, config["classes"], rank)
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(model)
    ema = _make_ema(model, cfg, state["ema"])  # after prepare_model: on the worker's device
    weight = class_weights(config["class_counts"], device) if cfg.class_weights else None
    shards = {name: ray.train.get_dataset_shard(name) for name in ("train", "val")}
    caches = {name: {} if config["cache_in_worker"] else None for name in shards}
    per_worker_batch = max(1, cfg.batch_size // world)
    schedule = Schedule.for_run(math.ceil(config["n_train"] / (per_worker_batch * world)), cfg, state["step"])
    def first_batch() -> None:
        clock.setdefault("first_batch_at", time.time())

    for epoch in range(state["epoch"] + 1, cfg.epochs):
        if should_stop(epoch, state["best"]["epoch"], cfg.epochs, cfg.patience):
            break  # all workers see the same all-reduced val metrics, so all stop together
        t0 = time.perf_counter()
        batches = _batches(shards["train"], per_worker_batch, device, caches["train"],
                           shuffle_seed=(cfg.seed * 1000 + rank) * 1000 + epoch)
        bar = progress.progress(-(-config["n_train"] // world), f"epoch {epoch + 1}/{cfg.epochs}", in_worker=True) \
            if rank == 0 else None
        train = train_one_epoch(model, optimizer, batches, cfg, schedule, gen, weight, on_first_batch=first_batch,
                                ema=ema, on_batch=bar.update if bar else None)
        if bar:
            bar.close()
        selected = ema.module if ema else model  # what is validated is what may be saved
        val = _evaluate_shard(selected, shards["val"], cfg.batch_size, device, caches["val"], cfg.amp)
        metrics = _epoch_metrics(epoch, {**train, "t0": t0}, val, optimizer.param_groups[0]["lr"], world, device,
                                 clock)
        state["step"] = schedule.step
        state["ema"] = ema.state_dict() if ema else None
        improved = _keep_best(state, metrics, epoch, selected)
        if rank == 0:
            _print_epoch(metrics, cfg.epochs, improved)
        _report(metrics, state, model, optimizer, rank)


# --------------------------------------------------------------------------- driver

def check_train_config(data_cfg: DataConfig, train_cfg: TrainConfig, data_exists: bool = True) -> None:
    """Refuse every out-of-range flag with one ValueError (FileNotFoundError for a missing
    --data folder) before Ray starts or anything is written: `--epochs 0` used to train
    nothing and then fail on the missing checkpoint with an AttributeError traceback.
    `data_exists=False`: the folder is yet to be written (`demo`'s synthetic data)."""
    d, t = data_cfg, train_cfg
    if data_exists and not storage.is_uri(d.data):
        require_data_folder(d.data)
    checks = [
        (d.image_size >= 16, f"--image-size must be at least 16, got {d.image_size}"),
        (d.group_size >= 1, f"--group-size must be at least 1, got {d.group_size}"),
        (0 < d.val_fraction < 1, f"--val-fraction must be in (0, 1), got {d.val_fraction}"),
        (d.folds is not None or (0 < d.test_fraction < 1 and d.val_fraction + d.test_fraction < 1),
         f"--test-fraction must be in (0, 1) and leave room for --val-fraction, got {d.test_fraction}"),
        (d.folds is None or (d.folds >= 2 and 0 <= d.fold < d.folds),
         f"--folds must be at least 2 and --fold in [0, --folds), got {d.folds} and {d.fold}"),
        (t.epochs >= 1 and t.patience >= 1 and t.warmup_epochs >= 0,
         f"--epochs and --patience must be at least 1 and --warmup-epochs at least 0, got {t.epochs}, "
         f"{t.patience} and {t.warmup_epochs}"),
        (t.workers >= 1 and t.batch_size >= t.workers,
         f"--workers must be at least 1 and --batch-size at least --workers, got {t.workers} and {t.batch_size}"),
        (t.lr > 0 and t.weight_decay >= 0, f"--lr must be > 0 and --weight-decay >= 0, got {t.lr} and "
                                            f"{t.weight_decay}"),
        (0 <= t.label_smoothing < 1 and 0 < t.ema_decay < 1,
         f"--label-smoothing must be in [0, 1) and --ema-decay in (0, 1), got {t.label_smoothing} and {t.ema_decay}"),
        (t.freeze_stages >= 0 and t.max_failures >= 0, "--freeze-stages and --max-failures must be at least 0"),
        ((t.cpus_per_worker is None or t.cpus_per_worker > 0) and (t.threads_per_worker or 1) >= 1,
         "--cpus-per-worker and --threads-per-worker must be positive"),
    ]
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise ValueError("; ".join(problems))


def _check_run_dir(run_dir: Path, run_config: dict) -> None:
    """A run directory belongs to one data/split/model setup; re-running it resumes."""
    cfg_file = run_dir / CONFIG_FILE
    if not cfg_file.exists():
        return
    old = json.loads(cfg_file.read_text())
    fixed = ("data", "image_size", "split", "group_size", "val_fraction", "test_fraction", "split_seed", "folds",
             "fold", "arch", "weights", "freeze_stages")
    for section in ("data", "train"):
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
    check_train_config(data_cfg, train_cfg)
    output = train_cfg.output if storage.is_uri(train_cfg.output) else str(Path(train_cfg.output).resolve())
    with storage.synced_run_dir(output) as run_dir:
        result = _fit(data_cfg, train_cfg, ray_cfg, run_dir, storage.ray_storage_path(output, run_dir))
    return {**result, "run_dir": output, "model": f"{output.rstrip('/')}/{MODEL_FILE}"}


def _prepare(data_cfg: DataConfig, train_cfg: TrainConfig, run_dir: Path):
    """Step 1: check the run directory, list + hash + split, write config.json and split.csv."""
    run_config = {"data": to_dict(data_cfg), "train": to_dict(train_cfg)}
    _check_run_dir(run_dir, run_config)
    df, classes, skipped = prepare_split(data_cfg, run_dir)
    summary = split_summary(df)
    split_id = manifest_hash(df)
    (run_dir / CONFIG_FILE).write_text(json.dumps({**run_config, "classes": classes, "split_id": split_id}, indent=2))
    if storage.is_uri(train_cfg.output):  # before any checkpoint: a re-run elsewhere checks this config
        storage.upload(run_dir, train_cfg.output)
    print(f"[leukray] {len(df)} images, classes {classes}, split {summary['policy']} "
          f"({summary['groups']} groups): " + ", ".join(f"{s} {sum(c.values())}" for s, c in summary["counts"].items()))
    if skipped:
        print(f"[leukray] skipped {len(skipped)} non-image files, e.g. {skipped[:3]}")
    return df, classes, {**run_config, "split_id": split_id}


def _ingest(df: pd.DataFrame, classes: list[str], data_cfg: DataConfig, train_cfg: TrainConfig):
    """Step 2: decode train and val once with Ray Data; returns (datasets, train class counts)."""
    datasets, bad = {}, []
    cpus = runtime.ClusterCPUs.current().total
    bar = progress.progress(int(df["split"].isin(["train", "val"]).sum()), "decoding train+val")
    for name in ("train", "val"):
        ds, errs = labeled_dataset(df[df["split"] == name], classes, data_cfg.image_size, train_cfg.seed, cpus,
                                   on_rows=bar.update)
        datasets[name], bad = ds, bad + errs
    bar.close()
    if bad:
        print(f"[leukray] {len(bad)} unreadable images left out of training, e.g. {bad[:3]}")
    train_df = df[(df["split"] == "train") & ~df["path"].isin([p for p, _ in bad])]
    return datasets, [int((train_df["label"] == c).sum()) for c in classes]


def _trainer(train_cfg: TrainConfig, datasets: dict, loop_config: dict, storage_path: str):
    """Step 3: the TorchTrainer, its workers sized to the cluster (`leukray.runtime`)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Each worker keeps its shard in memory when its share is small (see `_batches`).
    shard_bytes = sum(ds.size_bytes() for ds in datasets.values()) / max(1, train_cfg.workers)
    cluster = runtime.ClusterCPUs.current()
    cpus = runtime.worker_cpus(train_cfg.cpus_per_worker, train_cfg.workers, cluster)
    workers_per_node = min(train_cfg.workers, max(1, int(cluster.per_node_max // max(cpus, 1e-6))))
    threads = runtime.torch_threads(train_cfg.threads_per_worker, workers_per_node, cluster)
    resources = {"CPU": 1.0, "GPU": 1.0} if train_cfg.gpu else {"CPU": cpus}
    print(f"[leukray] training {train_cfg.arch} on {train_cfg.workers} worker(s) x {resources}, "
          f"{threads} torch thread(s) each, up to {train_cfg.epochs} epochs")
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**loop_config, "train": to_dict(train_cfg), "n_train": int(datasets["train"].count()),
                           "threads": threads, "cache_in_worker": shard_bytes <= WORKER_CACHE_BYTES},
        # CPU workers one per node where possible (a node loss then takes one worker, and
        # each node's cores train); GPU workers packed, as NCCL is fastest within a node.
        scaling_config=ScalingConfig(num_workers=train_cfg.workers, use_gpu=train_cfg.gpu,
                                     resources_per_worker=resources,
                                     placement_strategy="PACK" if train_cfg.gpu else "SPREAD"),
        run_config=RunConfig(
            name="train", storage_path=storage_path, checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=train_cfg.max_failures),
            # Ray Train logs every report at INFO; leukray prints its own epoch lines.
            logging_config=ray.LoggingConfig(log_level=runtime.ray_log_level()),
        ),
        datasets=datasets,
    )


def _save_best(result, run_dir: Path, classes: list[str], data_cfg: DataConfig, train_cfg: TrainConfig,
               run_config: dict) -> dict:
    """Step 4: the best epoch's weights of the last checkpoint -> model.pt; history.json."""
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    model = create_model(train_cfg.arch, len(classes))
    model.load_state_dict(state["best_model"])
    meta = save_model(run_dir / MODEL_FILE, model, {
        "arch": train_cfg.arch, "classes": classes, "image_size": data_cfg.image_size,
        "mean": model.normalize.mean.flatten().div(255).tolist(), "std": model.normalize.std.flatten().div(255).tolist(),
        "train_config": {k: run_config[k] for k in ("data", "train")}, "split_id": run_config["split_id"],
        "best_epoch": state["best"]["epoch"] + 1, "val_accuracy": state["best"]["val_accuracy"],
        "trust": trust.fit(model, run_dir, classes, data_cfg.image_size, train_cfg.seed),
    })
    (run_dir / HISTORY_FILE).write_text(json.dumps(state["history"], indent=2))
    if warning := trust.confidence_warning(meta["trust"]):
        print(warning)
    print(f"[leukray] best epoch {meta['best_epoch']} (val acc {meta['val_accuracy']:.4f}); model {meta['model_id']} "
          f"-> {run_dir / MODEL_FILE}")
    return state


def startup_breakdown(phases: dict, history: list[dict], started_at: float) -> dict:
    """Where the time before the first training batch went (seconds): ray.init, listing and
    hashing, decode, Train controller + worker group (fit() called -> worker loop entered),
    first batch (loop entered -> first batch). Rows of an earlier, resumed run are ignored."""
    rows = [h for h in history if h.get("run_started_at") == started_at and h.get("first_batch_s") is not None]
    out = {k: phases[k] for k in ("ray_init_s", "listing_hashing_s", "decode_s")}
    if rows:
        out["train_start_s"] = rows[0]["worker_started_s"] - phases["fit_called_s"]
        out["first_batch_s"] = rows[0]["first_batch_s"] - rows[0]["worker_started_s"]
        out["startup_s"] = rows[0]["first_batch_s"]
    return out


def _print_startup(b: dict) -> None:
    parts = [("ray.init", "ray_init_s"), ("listing/hashing", "listing_hashing_s"), ("decode", "decode_s"),
             ("Train controller+worker group", "train_start_s"), ("first batch", "first_batch_s")]
    print("[leukray] start-up " + (f"{b['startup_s']:.1f}s: " if "startup_s" in b else ": ")
          + ", ".join(f"{name} {b[k]:.1f}s" for name, k in parts if k in b), flush=True)


def finish_run(run_dir: Path, ray_cfg: RayConfig | None = None) -> dict:
    """What follows a saved model.pt, whenever its metadata changes (the end of training,
    `leukray refit` refitting the trust metadata): export it, score the test split
    with the engine `score` picks (metrics.json), and write the model card. Returns the metrics."""
    from leukray.evaluate import evaluate_run
    from leukray.export import export_after_training
    from leukray.modelcard import write_model_card

    export_after_training(run_dir)  # first: the test split is then scored by the engine `score` picks
    metrics = evaluate_run(run_dir, ray_cfg)
    print(f"[leukray] model card: {write_model_card(run_dir)}")
    return metrics


def _fit(data_cfg: DataConfig, train_cfg: TrainConfig, ray_cfg: RayConfig | None, run_dir: Path,
         storage_path: str) -> dict:
    """The steps of `fit` in a local run directory, each timed for timings.json."""
    t_start, started_at = time.perf_counter(), time.time()
    phases = {}
    df, classes, run_config = _prepare(data_cfg, train_cfg, run_dir)
    phases["listing_hashing_s"] = time.perf_counter() - t_start
    t = time.perf_counter()
    runtime.init_ray(ray_cfg)
    # Workers read the data and write checkpoints into the run directory, on any node.
    runtime.check_shared_paths(read={"--data": data_cfg.data},
                               write={} if storage.is_uri(train_cfg.output) else {"--output": str(run_dir)})
    phases["ray_init_s"] = time.perf_counter() - t
    t = time.perf_counter()
    datasets, class_counts = _ingest(df, classes, data_cfg, train_cfg)
    phases["decode_s"] = time.perf_counter() - t
    trainer = _trainer(train_cfg, datasets, {"classes": classes, "class_counts": class_counts,
                                             "started_at": started_at}, storage_path)
    t_fit, phases["fit_called_s"] = time.perf_counter(), time.time() - started_at
    result = trainer.fit()
    fit_s = time.perf_counter() - t_fit
    state = _save_best(result, run_dir, classes, data_cfg, train_cfg, run_config)
    startup = startup_breakdown(phases, state["history"], started_at)
    _print_startup(startup)

    metrics = finish_run(run_dir, ray_cfg)
    timings = {**startup, "ingest_s": phases["decode_s"], "fit_s": fit_s, "total_s": time.perf_counter() - t_start,
               "epochs_run": len(state["history"])}
    (run_dir / TIMINGS_FILE).write_text(json.dumps(timings, indent=2))
    return {"run_dir": str(run_dir), "model": str(run_dir / MODEL_FILE), "metrics": metrics, "timings": timings}
