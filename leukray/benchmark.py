"""Side-by-side benchmarks: leukray's Ray paths against plain PyTorch, in one run.

Same files, model, batch size, decode function and training recipe on both sides;
medians of `reps` repetitions; peak RSS of the whole process tree (driver, Ray's
processes, DataLoader workers) sampled every 0.1 s. Prints a table, returns a dict that
`jobs/benchmark.py` writes as JSON.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from leukray.config import BenchmarkConfig, DataConfig, ScoreConfig, TrainConfig
from leukray.data import list_labeled_images


@contextmanager
def peak_rss():
    """Yield a dict whose 'mb' is the peak summed RSS of this process and its descendants."""
    import psutil

    me = psutil.Process()
    result = {"mb": 0.0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            result["mb"] = max(result["mb"], total / 2**20)
            stop.wait(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield result
    finally:
        stop.set()
        t.join()


def machine() -> dict:
    import ray

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "torch_threads_default": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine()}


# --------------------------------------------------------------------------- scoring

def score_plain(model_path: str, paths: list[str], output: str, batch_size: int, workers: int, threads: int,
                checks: bool = False) -> int:
    """The 50-line script a user would write: DataLoader decode -> model -> Parquet. With
    `checks`, its workers also run the model's quality checks (`leukray.quality`, the colour
    model from its trust metadata) as `score` does, and the table gets their flags: the
    costliest thing `score` adds (not its sha256, temperature or verdicts; see the `costs` rows)."""
    from leukray import trust
    from leukray.baseline import FileDataset
    from leukray.model import load_model
    from leukray.model import probabilities

    torch.set_num_threads(threads)
    model, meta = load_model(model_path)
    quality = trust.decode_checks(meta) if checks else False
    if checks and quality is False:
        raise ValueError(f"{model_path} has no trust metadata: there are no quality checks to run")
    loader = torch.utils.data.DataLoader(FileDataset(paths, meta["image_size"], quality), batch_size=batch_size,
                                         num_workers=workers)
    probs, flags = [], []
    with torch.inference_mode():
        for batch in loader:
            x, batch_flags = batch if quality is not False else (batch, [])
            flags += batch_flags
            probs.append(probabilities(model(x)).numpy())
    p = np.concatenate(probs)
    table = {"path": paths, "predicted_label": [meta["classes"][i] for i in p.argmax(1)]}
    if quality is not False:
        table["quality_flags"] = [f or None for f in flags]
    table.update({f"prob_{c}": p[:, i] for i, c in enumerate(meta["classes"])})
    pq.write_table(pa.table(table), output)
    return len(paths)


PLAIN = "plain DataLoader"
PLAIN_CHECKED = "plain DataLoader + quality checks"


# The Ray scoring cases of `leukray benchmark`: the default plan (on CPUs each actor decodes
# its own batches) and the two-stage plan that GPU clusters use (decode tasks -> actors).
SCORING_PLANS = {"ray, default plan": {}, "ray, decode tasks + actors": {"decode": "tasks"}}


def bench_scoring(model: str, paths: list[str], reps: int, plans: dict[str, dict], log) -> list[dict]:
    """`score_paths` against `score_plain`, per entry of `plans` (case name -> ScoreConfig
    fields, {} for the default plan sized to the cluster)."""
    from leukray.infer import score_paths

    cpus = os.cpu_count() or 1
    items = [{"path": p} for p in paths]
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="leukray-bench-"))
    cases = [*plans.items(), (PLAIN, None), (PLAIN_CHECKED, None)]
    results: dict[str, list] = {name: [] for name, _ in cases}
    for rep in range(reps):
        for i, (name, fields) in enumerate(cases):  # interleaved: drifts in machine load hit both sides alike
            out = tmp / f"{rep}-{i}"
            with peak_rss() as rss:
                t0 = time.perf_counter()
                if name in (PLAIN, PLAIN_CHECKED):
                    score_plain(model, paths, str(tmp / f"plain-{rep}.parquet"), 64, workers=cpus, threads=cpus,
                                checks=name == PLAIN_CHECKED)
                else:
                    score_paths(items, ScoreConfig(model=model, output=str(out), overwrite=True, **fields),
                                log=lambda *_: None)
                seconds = time.perf_counter() - t0
            results[name].append((len(paths) / seconds, rss["mb"]))
            log(f"  scoring {name}: {len(paths) / seconds:.0f} img/s, peak RSS {rss['mb']:.0f} MB")
    plain = statistics.median(r[0] for r in results[PLAIN])
    same_work = statistics.median(r[0] for r in results[PLAIN_CHECKED])
    for name, _ in cases:
        rate = statistics.median(r[0] for r in results[name])
        rows.append({"benchmark": "scoring JPEG -> Parquet", "case": name, "images_per_s": rate,
                     "ratio_vs_plain": rate / plain, "ratio_vs_plain_with_checks": rate / same_work,
                     "peak_rss_mb": max(r[1] for r in results[name]),
                     "images": len(paths), "reps": reps, "all_images_per_s": [r[0] for r in results[name]],
                     # each repetition against the plain run beside it (the cases are interleaved)
                     "paired_ratios": [r[0] / p[0] for r, p in zip(results[name], results[PLAIN])]})
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


# --------------------------------------------------------------------------- training

def bench_training(data: str, reps: int, workers: list[int], epochs: int, image_size: int, log) -> list[dict]:
    import json

    from leukray.baseline import decode_all, train_plain
    from leukray.train import fit

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="leukray-bench-"))
    results: dict[str, list] = {}
    cfg = TrainConfig(epochs=epochs, patience=epochs)
    for rep in range(reps):
        for w in workers:
            name = f"ray train, {w} worker(s)"
            out = tmp / f"{rep}-{w}"
            with peak_rss() as rss:
                t0 = time.perf_counter()
                fit(DataConfig(data=data, image_size=image_size),
                    TrainConfig(output=str(out), epochs=epochs, patience=epochs, workers=w))
                total = time.perf_counter() - t0
            hist = json.loads((out / "history.json").read_text())
            steady = statistics.median(h["train_images_per_s"] for h in hist[1:])
            results.setdefault(name, []).append((steady, hist[0]["first_batch_s"], rss["mb"], total))
            log(f"  training {name}: {steady:.0f} img/s steady, first batch after {hist[0]['first_batch_s']:.1f}s, "
                f"peak RSS {rss['mb']:.0f} MB")
        # the plain loop: decode the same train split with the same function, then the same recipe
        split = pd.read_csv(tmp / f"{rep}-{workers[0]}" / "split.csv")
        train = split[split["split"] == "train"]
        classes = sorted(train["label"].unique(), key=str.casefold)
        with peak_rss() as rss:
            t0 = time.perf_counter()
            torch.set_num_threads(os.cpu_count() or 1)
            images = decode_all(train["path"].tolist(), image_size, workers=os.cpu_count() or 0)
            labels = torch.tensor([classes.index(c) for c in train["label"]])
            first = time.perf_counter() - t0
            _, hist = train_plain(images, labels, cfg, len(classes))
        steady = statistics.median(h["train_images_per_s"] for h in hist[1:])
        results.setdefault("plain PyTorch loop", []).append((steady, first, rss["mb"], time.perf_counter() - t0))
        log(f"  training plain PyTorch loop: {steady:.0f} img/s steady, first batch after {first:.1f}s")
    plain = statistics.median(r[0] for r in results["plain PyTorch loop"])
    for name, rs in results.items():
        rate = statistics.median(r[0] for r in rs)
        rows.append({"benchmark": "training steady-state epoch", "case": name, "images_per_s": rate,
                     "ratio_vs_plain": rate / plain, "first_batch_s": statistics.median(r[1] for r in rs),
                     "peak_rss_mb": max(r[2] for r in rs), "total_s": statistics.median(r[3] for r in rs),
                     "epochs": epochs, "reps": reps})
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


def bench_scale(model: str, data: str, sizes: list[int], log) -> list[dict]:
    """Peak RSS and throughput of the Ray scoring path as the archive grows (symlinks to
    the same images under distinct names, so the decode work is real)."""
    from leukray.infer import score

    files = sorted(r["path"] for r in list_labeled_images(data).records)
    rows = []
    for n in sizes:
        tmp = Path(tempfile.mkdtemp(prefix="leukray-scale-"))
        src = tmp / "in"
        for i in range(n):
            sub = src / f"{i // 1000:03d}"
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"{i:06d}.jpg").symlink_to(files[i % len(files)])
        with peak_rss() as rss:
            t0, cpu0 = time.perf_counter(), time.process_time()
            stats = score(ScoreConfig(model=model, input=str(src), output=str(tmp / "out")), log=lambda *_: None)
            seconds, driver_cpu = time.perf_counter() - t0, time.process_time() - cpu0
        rows.append({"benchmark": "scoring at scale (Ray)", "case": f"{n} images", "images": n,
                     "images_per_s": n / seconds, "peak_rss_mb": rss["mb"], "rows": stats["scored"],
                     "driver_cpu_s": driver_cpu, "startup": stats["startup"]})
        log(f"  scale {n}: {n / seconds:.0f} img/s, driver CPU {driver_cpu:.1f} s, peak RSS {rss['mb']:.0f} MB")
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def bench_train_step(arch: str, image_size: int, frozen: list[int], reps: int, log) -> list[dict]:
    """Bare training steps (forward, backward, AdamW; batch 64, no augmentation) of `arch`
    with the first N backbone stages frozen, for each N in `frozen`: what --freeze-stages saves."""
    from leukray.model import create_model, freeze_stages
    from leukray.recipe import make_optimizer, train_step

    torch.set_num_threads(os.cpu_count() or 1)
    x = torch.randint(0, 256, (64, image_size, image_size, 3), dtype=torch.uint8)
    y = torch.arange(64) % 4
    rates = {}
    for n in frozen:
        cfg = TrainConfig(arch=arch, freeze_stages=n, augment=False)
        model = create_model(arch, 4)
        freeze_stages(model, n)
        opt = make_optimizer(model, cfg)
        times = []
        for _ in range(reps + 1):  # the first step warms up
            t0 = time.perf_counter()
            train_step(model, opt, x, y, cfg, 1e-3, torch.Generator().manual_seed(0), None)
            times.append(time.perf_counter() - t0)
        rates[n] = 64 / statistics.median(times[1:])
        log(f"  {arch} train step, {n} stages frozen: {rates[n]:.0f} img/s")
    return [{"benchmark": "train step, batch 64", "case": f"{arch}, {n} stages frozen", "images_per_s": r,
             "ratio_vs_plain": r / rates[frozen[0]], "peak_rss_mb": None, "arch": arch, "frozen_stages": n,
             "reps": reps} for n, r in rates.items()]


def _median_rates(engines: dict, batch: int, reps: int) -> dict[str, float]:
    """Images/s per engine: median of `reps` timed calls after one warm-up each. Engines
    are timed in turn within each repetition so that changing load on a shared machine
    affects all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    for fn in engines.values():
        fn()  # warm-up: first calls allocate memory and pick kernels
    for _ in range(reps):
        for name, fn in engines.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: batch / statistics.median(t) for name, t in times.items()}


def benchmark_engines(model_path: str | os.PathLike, batch: int = 64, size: int = 128,
                      threads: int = 2, reps: int = 5) -> dict:
    """Images/s of PyTorch vs ONNX Runtime on CPU for one model, both limited to
    `threads` threads, on the same random uint8 batch.

    The ONNX file is exported to a temporary folder at `size`, so any model file works
    whatever its trained image size (the network is size-agnostic).
    """
    from leukray.export import ProbsModel, export_onnx
    from leukray.model import load_model
    from leukray.predictors import ONNX_FILENAME, onnx_session

    model, meta = load_model(model_path)
    probs_model = ProbsModel(model).eval()
    x = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    xn = x.numpy()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
            path = Path(tmp) / ONNX_FILENAME
            export_onnx(model, path, size)
            session = onnx_session(path, threads, "cpu")
            rates = _median_rates({"torch": lambda: probs_model(x),
                                   "onnx": lambda: session.run(["probs"], {"image": xn})}, batch, reps)
    finally:
        torch.set_num_threads(previous)
    return {"arch": meta["arch"], "batch": batch, "size": size, "threads": threads, "reps": reps,
            "torch_images_per_s": rates["torch"], "onnx_images_per_s": rates["onnx"],
            "onnx_speedup": rates["onnx"] / rates["torch"]}


def bench_engines_model(model_files: dict[str, str], image_size: int, reps: int, log) -> list[dict]:
    """Model-only prediction, PyTorch vs ONNX Runtime, per architecture: the same uint8 batch
    of 64 on all cores (`benchmark_engines`). Run before Ray starts: its start-up
    processes would share the cores."""
    rows = []
    for arch, path in model_files.items():
        r = benchmark_engines(path, batch=64, size=image_size, threads=os.cpu_count() or 1, reps=max(reps, 5))
        for engine in ("torch", "onnx"):
            rate = r[f"{engine}_images_per_s"]
            rows.append({"benchmark": "model only, batch 64", "case": f"{arch}, {engine}", "images_per_s": rate,
                         "ratio_vs_plain": rate / r["torch_images_per_s"], "peak_rss_mb": None, **r})
        log(f"  {arch} model only: torch {r['torch_images_per_s']:.0f} img/s, onnx {r['onnx_images_per_s']:.0f} img/s")
    return rows


def bench_engines_scoring(model_files: dict[str, str], paths: list[str], reps: int, log) -> list[dict]:
    """`score --engine torch` vs `--engine onnx` end to end (JPEG -> Parquet through Ray batch
    inference, default actors) per architecture, interleaved; medians of `reps`."""
    from leukray.export import export_model
    from leukray.infer import score_paths

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="leukray-engines-"))
    items = [{"path": p} for p in paths]
    for arch, path in model_files.items():
        export_dir = tmp / f"export-{arch}"
        export_model(path, export_dir)
        rates: dict[str, list[float]] = {"torch": [], "onnx": []}
        for rep in range(reps):
            for engine, model in (("torch", path), ("onnx", str(export_dir))):
                t0 = time.perf_counter()
                score_paths(items, ScoreConfig(model=model, output=str(tmp / f"{arch}-{engine}-{rep}"), engine=engine,
                                               overwrite=True), log=lambda *_: None)
                rates[engine].append(len(paths) / (time.perf_counter() - t0))
                log(f"  {arch} scoring, {engine}: {rates[engine][-1]:.0f} img/s")
        base = statistics.median(rates["torch"])
        for engine, rs in rates.items():
            rows.append({"benchmark": "scoring JPEG -> Parquet", "case": f"{arch}, {engine}",
                         "images_per_s": statistics.median(rs), "ratio_vs_plain": statistics.median(rs) / base,
                         "peak_rss_mb": None, "images": len(paths), "reps": reps, "all_images_per_s": rs})
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


# --------------------------------------------------------------------------- int8

def _int8_exports(run_dir: str, tmp: Path) -> dict[str, tuple[str, str]]:
    """engine case -> (engine, model folder): fp32 ONNX, static and dynamic int8 of the run."""
    from leukray.export import export_int8, export_model

    export_model(run_dir, tmp / "static")
    shutil.copytree(tmp / "static", tmp / "dynamic")
    for method in ("static", "dynamic"):
        export_int8(run_dir, tmp / method, method)
    return {"torch": ("torch", run_dir), "onnx": ("onnx", str(tmp / "static")),
            "onnx-int8 static": ("onnx-int8", str(tmp / "static")),
            "onnx-int8 dynamic": ("onnx-int8", str(tmp / "dynamic"))}


def _int8_model_only(cases: dict, images: np.ndarray, reps: int) -> dict[str, float]:
    from leukray.predictors import create_predictor

    threads = os.cpu_count() or 1
    predictors = {name: create_predictor(engine, model, threads=threads) for name, (engine, model) in cases.items()}
    torch.set_num_threads(threads)
    return _median_rates({name: (lambda p=p: p.predict_images(images)) for name, p in predictors.items()},
                         len(images), max(reps, 5))


def top_classes(scores: pd.DataFrame, classes: list[str]) -> np.ndarray:
    """The model's arg-max class of every row of a `score` output, assessable or not:
    predicted_label is null where a row is not assessable, and two nulls never compare equal."""
    return np.array(classes)[scores[[f"prob_{c}" for c in classes]].to_numpy().argmax(1)]


def bench_int8(run_dir: str, reps: int, log) -> list[dict]:
    """int8 (static and dynamic) against fp32 ONNX Runtime and PyTorch on a trained run's
    test split: model-only img/s on a batch of 64 of its images, `score` end to end img/s,
    test accuracy, and how many test predictions differ from the fp32 ones."""
    from leukray.data import preprocess, read_bytes
    from leukray.infer import score_paths
    from leukray.predictors import read_model_meta
    from leukray.rundir import SPLIT_FILE, read_predictions

    split = pd.read_csv(Path(run_dir) / SPLIT_FILE)
    test = split[split["split"] == "test"]
    items = [{"path": p, "label": lab} for p, lab in zip(test["path"], test["label"])]
    size = int(read_model_meta(run_dir)["image_size"])
    tmp = Path(tempfile.mkdtemp(prefix="leukray-int8-"))
    cases = _int8_exports(run_dir, tmp)
    model_only = _int8_model_only(cases, np.stack([preprocess(read_bytes(p), size)[0] for p in test["path"][:64]]),
                                  reps)
    rates: dict[str, list[float]] = {name: [] for name in cases}
    preds: dict[str, pd.DataFrame] = {}
    for rep in range(reps):
        for name, (engine, model) in cases.items():
            out = tmp / f"scores-{rep}-{name.replace(' ', '-')}"
            t0 = time.perf_counter()
            score_paths(items, ScoreConfig(model=model, output=str(out), engine=engine), log=lambda *_: None)
            rates[name].append(len(items) / (time.perf_counter() - t0))
            preds[name] = read_predictions(out).sort_values("path").reset_index(drop=True)
            log(f"  int8, {name}: {rates[name][-1]:.0f} img/s end to end, model only {model_only[name]:.0f} img/s")
    classes = list(read_model_meta(run_dir)["classes"])
    top = {name: top_classes(df, classes) for name, df in preds.items()}
    rows = []
    for name, df in preds.items():
        acc = float((top[name] == df["label"].to_numpy()).mean())
        rows.append({"benchmark": "int8, test split", "case": name, "images_per_s": statistics.median(rates[name]),
                     "ratio_vs_plain": statistics.median(rates[name]) / statistics.median(rates["torch"]),
                     "model_only_images_per_s": model_only[name],
                     "model_only_vs_torch": model_only[name] / model_only["torch"], "test_accuracy": acc,
                     "accuracy_diff_vs_fp32": acc - float((top["onnx"] == df["label"].to_numpy()).mean()),
                     "predictions_changed_vs_fp32": int((top[name] != top["onnx"]).sum()),
                     "images": len(items), "peak_rss_mb": None, "reps": reps, "run": run_dir})
        log(f"  int8, {name}: test accuracy {acc:.4f}, {rows[-1]['predictions_changed_vs_fp32']} predictions "
            f"changed vs fp32")
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


# --------------------------------------------------------------------------- scaling

def cpu_steps(cpus: int | None = None) -> list[int]:
    """1, 2, 4, ... up to this machine's CPU count, which is always the last step."""
    cpus = cpus or os.cpu_count() or 1
    steps = [1 << i for i in range(cpus.bit_length()) if 1 << i < cpus]
    return steps + [cpus]


@contextmanager
def limited_ray(cpus: int):
    """An embedded Ray told it has `cpus` CPUs and pinned to `cpus` cores (Linux affinity,
    inherited by raylet, workers and DataLoader workers), so both sides really get `cpus`
    cores; the affinity comes back afterwards, Ray is left stopped."""
    from leukray import runtime
    from leukray.config import RayConfig

    runtime.shutdown_ray()
    pin = hasattr(os, "sched_setaffinity")
    before = os.sched_getaffinity(0) if pin else None
    if pin:
        os.sched_setaffinity(0, sorted(before)[:cpus])
    try:
        runtime.init_ray(RayConfig(num_cpus=cpus))
        yield
    finally:
        runtime.shutdown_ray()
        if pin:
            os.sched_setaffinity(0, before)


def ray_decode_only(paths: list[str], size: int, batch_size: int = 64) -> int:
    """The decode stage of `leukray score` alone (the same tasks, sized by the same plan),
    its output consumed and dropped: what the model actors could be fed at most."""
    from leukray import runtime
    from leukray.infer import input_dataset

    items = [{"path": p, "member": None, "offset": -1, "size": -1} for p in paths]
    plan = runtime.scoring_plan(ScoreConfig(model="", decode="tasks", batch_size=batch_size),
                                runtime.ClusterCPUs.current(), len(items))
    ds = input_dataset(items, plan, size)
    with runtime.prompt_task_stages():  # as `score_paths` runs a decode stage
        return sum(len(b["path"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))


def ray_ingest(paths: list[str], size: int) -> int:
    """Training ingest: decode once and materialize (`train.labeled_dataset`)."""
    from leukray.train import labeled_dataset

    df = pd.DataFrame({"path": paths, "label": ["x"] * len(paths)})
    ds, _ = labeled_dataset(df, ["x"], size, seed=0)
    return ds.count()


def plain_decode(paths: list[str], size: int, workers: int) -> int:
    from leukray.baseline import decode_all

    return len(decode_all(paths, size, workers=workers))


def _scaling_cases(model: str, paths: list[str], size: int, n: int, out: Path) -> dict:
    """name -> (stage, side, callable returning images done) at `n` CPUs."""
    from leukray.infer import score_paths

    items = [{"path": p} for p in paths]
    return {
        "decode, ray tasks": lambda: ray_decode_only(paths, size),
        "decode, plain DataLoader": lambda: plain_decode(paths, size, n),
        "ingest, ray (train)": lambda: ray_ingest(paths, size),
        "scoring, ray (default plan)": lambda: score_paths(
            items, ScoreConfig(model=model, output=str(out), overwrite=True), log=lambda *_: None)["scored"],
        "scoring, plain DataLoader": lambda: score_plain(model, paths, str(out) + ".parquet", 64, workers=n,
                                                         threads=n),
    }


def bench_scaling(model: str, paths: list[str], size: int, steps: list[int], reps: int, log) -> list[dict]:
    """Decode, ingest and scoring img/s per stage, Ray vs plain at the same CPU counts:
    Ray told it has n CPUs and every process pinned to n cores, n in `steps`; medians of `reps`,
    the cases interleaved within each repetition."""
    from leukray.predictors import select_engine

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="leukray-scaling-"))
    for n in steps:
        with limited_ray(n):
            torch.set_num_threads(n)
            for fn in _scaling_cases(model, paths[:64], size, n, tmp / f"warm-{n}").values():
                fn()  # warm-up: Ray's worker processes start once per cluster, not per job
            cases = _scaling_cases(model, paths, size, n, tmp / f"out-{n}")
            rates: dict[str, list[float]] = {name: [] for name in cases}
            for _ in range(reps):
                for name, fn in cases.items():
                    t0 = time.perf_counter()
                    done = fn()
                    rates[name].append(done / (time.perf_counter() - t0))
                    log(f"  {n} CPU(s), {name}: {rates[name][-1]:.0f} img/s")
        for name, rs in rates.items():
            stage, side = name.split(", ", 1)
            plain = statistics.median(rates[f"{stage}, plain DataLoader"]) if stage != "ingest" else \
                statistics.median(rates["decode, plain DataLoader"])
            rate = statistics.median(rs)
            rows.append({"benchmark": f"scaling, {n} CPU(s)", "case": name, "cpus": n, "stage": stage, "side": side,
                         "engine": select_engine("auto", model)[0] if name.startswith("scoring, ray") else None,
                         "images_per_s": rate, "ratio_vs_plain": rate / plain, "peak_rss_mb": None,
                         "images": len(paths), "reps": reps, "all_images_per_s": rs})
    torch.set_num_threads(os.cpu_count() or 1)
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


# --------------------------------------------------------------------------- whole command

PLAIN_SCRIPT = """
import sys, time, glob, os
t0 = time.perf_counter()
from leukray.benchmark import score_plain
paths = sorted(glob.glob(os.path.join(sys.argv[2], "**", "*.jpg"), recursive=True))
n = score_plain(sys.argv[1], paths, sys.argv[3], 64, workers=int(sys.argv[4]), threads=int(sys.argv[4]),
                checks=sys.argv[5:] == ["checks"])
print(n)
"""


def symlinked_archive(files: list[str], n: int, root: Path) -> Path:
    """`n` distinct names (symlinks, 1,000 per folder) cycling over `files`: real decode work
    at any archive size without copying images."""
    src = root / "in"
    for i in range(n):
        sub = src / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:06d}.jpg").symlink_to(files[i % len(files)])
    return src


def bench_command(model: str, data: str, n: int, reps: int, log, workers: int = 2) -> list[dict]:
    """Wall time of the whole `leukray score` command (a fresh process: imports, Ray start,
    listing, scoring, Parquet) against the whole of a plain script (a fresh process: DataLoader
    with `workers` workers decoding with PIL, the model, one Parquet file), same `n` files; and
    the plain script doing the same quality checks as `score` (the model's trust metadata)."""
    import subprocess
    import sys

    files = sorted(r["path"] for r in list_labeled_images(data).records)
    tmp = Path(tempfile.mkdtemp(prefix="leukray-command-"))
    src = symlinked_archive(files, n, tmp)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")])}
    commands = {
        "leukray score (CLI)": [sys.executable, "-m", "leukray.cli", "score", "--model", model, "--input", str(src),
                                "--output", str(tmp / "out"), "--overwrite"],
        f"plain script ({workers} workers)": [sys.executable, "-c", PLAIN_SCRIPT, model, str(src),
                                              str(tmp / "plain.parquet"), str(workers)],
        "plain script + quality checks": [sys.executable, "-c", PLAIN_SCRIPT, model, str(src),
                                          str(tmp / "plain.parquet"), str(workers), "checks"],
    }
    walls: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(reps):
        for name, cmd in commands.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            walls[name].append(time.perf_counter() - t0)
            log(f"  whole command, {n} files, {name}: {walls[name][-1]:.1f}s ({n / walls[name][-1]:.0f} img/s)")
    plain = n / statistics.median(walls[f"plain script ({workers} workers)"])
    same_work = n / statistics.median(walls["plain script + quality checks"])
    shutil.rmtree(tmp, ignore_errors=True)
    from leukray.predictors import select_engine

    engines = {name: select_engine("auto", model)[0] if "leukray" in name else "torch" for name in walls}
    return [{"benchmark": f"whole command, {n} files", "case": name, "images_per_s": n / statistics.median(w),
             "engine": engines[name],
             "ratio_vs_plain": n / statistics.median(w) / plain,
             "ratio_vs_plain_with_checks": n / statistics.median(w) / same_work,
             "wall_s": statistics.median(w), "all_wall_s": w,
             "peak_rss_mb": None, "images": n, "reps": reps} for name, w in walls.items()]


def bench_costs(model: str, paths: list[str], reps: int, log, batch: int = 64) -> list[dict]:
    """Where an image's time goes in one CPU scoring actor, measured in this process with one
    thread: each step of `Predictor.__call__` on its own over the same files, then the whole
    call (the default engine, batches of `batch` paths). Medians of `reps`; ms per image."""
    import hashlib

    from PIL import Image

    from leukray import quality, trust
    from leukray.data import decode, read_bytes
    from leukray.predictors import create_predictor, select_engine

    engine, _ = select_engine("auto", model)
    threads = torch.get_num_threads()
    pred = create_predictor(engine, model, threads=1)  # the torch engine sets the process's threads
    size, colour = pred.image_size, trust.decode_checks(pred.meta)
    colour = colour if isinstance(colour, dict) else None
    raw = [read_bytes(p) for p in paths]
    decoded = [decode(b, size)[0] for b in raw]
    resized = np.stack([np.asarray(im.resize((size, size), Image.BILINEAR)) for im in decoded])
    steps = {
        "read file": lambda: [read_bytes(p) for p in paths],
        "sha256": lambda: [hashlib.sha256(b).hexdigest() for b in raw],
        "JPEG decode (+ RGB, EXIF)": lambda: [decode(b, size) for b in raw],
        "quality checks" + (" + colour" if colour else ""): lambda: [quality.quality_flags(im, colour_model=colour)
                                                                    for im in decoded],
        f"resize to {size} px": lambda: [im.resize((size, size), Image.BILINEAR) for im in decoded],
        f"model ({engine}, 1 thread)": lambda: [pred.predict(resized[i:i + batch])
                                                for i in range(0, len(paths), batch)],
        "whole Predictor call": lambda: [pred({"path": np.array(paths[i:i + batch], dtype=object)})
                                         for i in range(0, len(paths), batch)],
    }
    ms: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            ms[name].append((time.perf_counter() - t0) * 1e3 / len(paths))
    torch.set_num_threads(threads)
    rows = [{"benchmark": "per-image cost, 1 process", "case": name, "ms_per_image": statistics.median(v),
             "images_per_s": 1e3 / statistics.median(v), "all_ms_per_image": v, "images": len(paths), "reps": reps}
            for name, v in ms.items()]
    # what the steps do not cover: array copies, the batch's columns, verdicts, labels
    rows[-1]["rest_ms_per_image"] = rows[-1]["ms_per_image"] - sum(r["ms_per_image"] for r in rows[:-1])
    log("  per image: " + ", ".join(f"{r['case']} {r['ms_per_image']:.2f} ms" for r in rows)
        + f" (of which the rest {rows[-1]['rest_ms_per_image']:.2f} ms)")
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'benchmark':<30}{'case':<30}{'img/s':>8}{'vs plain':>10}{'1st batch s':>12}{'peak RSS MB':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = f"{r['ratio_vs_plain']:.2f}x" if "ratio_vs_plain" in r else "-"
        first = f"{r['first_batch_s']:.1f}" if r.get("first_batch_s") is not None else "-"
        rss = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") is not None else "-"
        lines.append(f"{r['benchmark']:<30}{r['case']:<30}{r['images_per_s']:>8.0f}{ratio:>10}{first:>12}{rss:>12}")
    return "\n".join(lines)


DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "all-taleqani" / "Original"


def _export_for_auto(model: Path, log) -> None:
    """Export the benchmark's model as `leukray train` does, so that the Ray scoring cases
    measure the default engine (auto: ONNX Runtime where it is installed)."""
    from leukray.export import export_after_training

    export_after_training(model.parent, log=log)


def bench_trust(classes: list[str], paths: list[str], image_size: int, images: int = 60) -> dict:
    """Trust metadata for the benchmark's random-weight model, so that scoring pays for what
    it pays for with every trained model: the quality checks and the colour model (fitted on
    `images` of `paths`), calibration and the OOD verdict. Until session 6 the benchmark
    model had none, and its scoring rows left the checks out (their share of an image's time:
    the `costs` rows)."""
    from leukray import trust

    # spread over the listing, which is sorted by class
    colour = trust.colour_model_of(paths[::max(1, len(paths) // images)][:images], image_size)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(classes), 200)
    logits = 3 * (rng.normal(size=(200, len(classes))) + 2 * np.eye(len(classes))[labels])
    return trust.fit_arrays(logits, labels, np.ones(200, bool), colour)


def _bench_models(classes: list[str], image_size: int, paths: list[str]) -> tuple[Path, dict[str, str]]:
    """Random-weight models (speed does not depend on the weights): leuknet with trust
    metadata (`bench_trust`), exported as `leukray train` exports it, and efficientnet_lite0
    where the [pretrained] extra is installed."""
    from leukray.model import create_model, save_model

    model = Path(tempfile.mkdtemp()) / "model.pt"
    save_model(model, create_model("leuknet", len(classes)).eval(),
               {"arch": "leuknet", "classes": classes, "image_size": image_size,
                "mean": [0.8, 0.67, 0.7], "std": [0.12, 0.17, 0.1],
                "trust": bench_trust(classes, paths, image_size)})
    _export_for_auto(model, log=print)
    engine_models = {"leuknet": str(model)}
    if importlib.util.find_spec("efficientnet_lite_pytorch"):  # the [pretrained] extra
        lite = model.parent / "lite0.pt"
        save_model(lite, create_model("efficientnet_lite0", len(classes), mean=[0.5] * 3, std=[0.5] * 3).eval(),
                   {"arch": "efficientnet_lite0", "classes": classes, "image_size": image_size,
                    "mean": [0.5] * 3, "std": [0.5] * 3})
        engine_models["efficientnet_lite0"] = str(lite)
    return model, engine_models


def run(args: BenchmarkConfig) -> dict:
    """Run every benchmark of `args`, print the table, write the JSON report."""
    import json

    from leukray import runtime

    data = args.data or (str(DEFAULT_DATA) if DEFAULT_DATA.is_dir() else None)
    if data is None:
        from leukray.synthetic import make_dataset

        data = str(make_dataset(Path(tempfile.mkdtemp()) / "synth", per_class=200))
    listing = list_labeled_images(data)
    paths = [r["path"] for r in listing.records]
    model, engine_models = _bench_models(listing.classes, args.image_size, paths)
    report = {"machine": machine(), "data": data, "images": len(paths),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": []}

    def log(m):
        print(m, flush=True)

    if "engines" not in args.skip:
        log("engines, model only (PyTorch vs ONNX Runtime) ...")
        report["rows"] += bench_engines_model(engine_models, args.image_size, args.reps, log)
    if "finetune" not in args.skip and "efficientnet_lite0" in engine_models:
        log("fine-tuning step, frozen stages ...")
        report["rows"] += bench_train_step("efficientnet_lite0", args.image_size, [0, 4], max(args.reps, 5), log)
    if "costs" not in args.skip:
        log("per-image cost of each scoring step, one process ...")
        report["rows"] += bench_costs(str(model), paths[:1500], args.reps, log)
    runtime.init_ray()

    if "scoring" not in args.skip:
        log("scoring ...")
        report["rows"] += bench_scoring(str(model), paths, args.reps, SCORING_PLANS, log)
    if "training" not in args.skip:
        log("training ...")
        report["rows"] += bench_training(data, args.reps, [1, 2], args.epochs, args.image_size, log)
    if "scale" not in args.skip and args.scale:
        log("scale ...")
        report["rows"] += bench_scale(str(model), data, args.scale, log)
    if "engines" not in args.skip:
        log("engines, end to end (PyTorch vs ONNX Runtime) ...")
        report["rows"] += bench_engines_scoring(engine_models, paths, args.reps, log)
    if "int8" not in args.skip and args.int8_run:
        log("int8 (ONNX Runtime quantization) on the run's test split ...")
        report["rows"] += bench_int8(args.int8_run, args.reps, log)
    if "scaling" not in args.skip:
        log("scaling with the CPUs (Ray told n CPUs, all processes pinned to n cores) ...")
        report["rows"] += bench_scaling(str(model), paths[:args.scaling_files], args.image_size,
                                        args.scaling_cpus or cpu_steps(), args.reps, log)
    if "command" not in args.skip and args.command_files:
        # Each command is a fresh process and starts its own Ray. An idle one held here would
        # cost them, the CLI most: its Ray's dashboard agent retries Ray's fixed port 52365
        # for ~3.4 s before going on without it (ray.init cannot choose another, ray#14763).
        runtime.shutdown_ray()
        log(f"whole command at {args.command_files} files ...")
        report["rows"] += bench_command(str(model), data, args.command_files, args.reps, log)
    print()
    print(f"machine: {report['machine']}")
    print(format_table(report["rows"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nwritten {args.out}")
    return report
