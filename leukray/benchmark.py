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

from leukray.config import DataConfig, ScoreConfig, TrainConfig
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

def score_plain(model_path: str, paths: list[str], output: str, batch_size: int, workers: int, threads: int) -> int:
    """The 50-line script a user would write: DataLoader decode -> model -> Parquet."""
    from leukray.baseline import FileDataset
    from leukray.model import load_model
    from leukray.model import probabilities

    torch.set_num_threads(threads)
    model, meta = load_model(model_path)
    loader = torch.utils.data.DataLoader(FileDataset(paths, meta["image_size"]), batch_size=batch_size,
                                         num_workers=workers)
    probs = []
    with torch.inference_mode():
        for x in loader:
            probs.append(probabilities(model(x)).numpy())
    p = np.concatenate(probs)
    table = {"path": paths, "predicted_label": [meta["classes"][i] for i in p.argmax(1)]}
    table.update({f"prob_{c}": p[:, i] for i, c in enumerate(meta["classes"])})
    pq.write_table(pa.table(table), output)
    return len(paths)


PLAIN = "plain DataLoader"


def bench_scoring(model: str, paths: list[str], reps: int, actors: list[int | None], log) -> list[dict]:
    """`score_paths` (Ray: decode tasks -> model actors) against `score_plain`, per actor
    count in `actors` (None: the default plan, sized to the cluster)."""
    from leukray.infer import score_paths

    cpus = os.cpu_count() or 1
    items = [{"path": p} for p in paths]
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="leukray-bench-"))
    cases = [("ray, default plan" if a is None else f"ray, {a} actor(s)", a) for a in actors] + [(PLAIN, 0)]
    results: dict[str, list] = {name: [] for name, _ in cases}
    for rep in range(reps):
        for name, a in cases:  # interleaved, so drifts in machine load hit both sides alike
            out = tmp / f"{rep}-{a}"
            with peak_rss() as rss:
                t0 = time.perf_counter()
                if name == PLAIN:
                    score_plain(model, paths, str(tmp / f"plain-{rep}.parquet"), 64, workers=cpus, threads=cpus)
                else:
                    score_paths(items, ScoreConfig(model=model, output=str(out), actors=a, overwrite=True),
                                log=lambda *_: None)
                seconds = time.perf_counter() - t0
            results[name].append((len(paths) / seconds, rss["mb"]))
            log(f"  scoring {name}: {len(paths) / seconds:.0f} img/s, peak RSS {rss['mb']:.0f} MB")
    plain = statistics.median(r[0] for r in results[PLAIN])
    for name, _ in cases:
        rate = statistics.median(r[0] for r in results[name])
        rows.append({"benchmark": "scoring JPEG -> Parquet", "case": name, "images_per_s": rate,
                     "ratio_vs_plain": rate / plain, "peak_rss_mb": max(r[1] for r in results[name]),
                     "images": len(paths), "reps": reps})
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
            t0 = time.perf_counter()
            stats = score(ScoreConfig(model=model, input=str(src), output=str(tmp / "out")), log=lambda *_: None)
            seconds = time.perf_counter() - t0
        rows.append({"benchmark": "scoring at scale (Ray)", "case": f"{n} images", "images": n,
                     "images_per_s": n / seconds, "peak_rss_mb": rss["mb"], "rows": stats["scored"]})
        log(f"  scale {n}: {n / seconds:.0f} img/s, peak RSS {rss['mb']:.0f} MB")
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


def add_arguments(p) -> None:
    p.add_argument("--data", help="labelled folder (default: ../shared/data/all-taleqani/Original if present, "
                                  "else generated synthetic images)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per case; medians are reported")
    p.add_argument("--epochs", type=int, default=4, help="epochs per training run (epoch 1 excluded from steady state)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--scale", type=int, nargs="*", default=[2000, 20000], help="archive sizes for the RSS test")
    p.add_argument("--skip", nargs="*", default=[], choices=["scoring", "training", "scale", "engines", "finetune"])
    p.add_argument("--out", default="benchmarks/results/latest.json", help="JSON written at the end")


def run(args) -> dict:
    """Run every benchmark of `args`, print the table, write the JSON report."""
    import json

    from leukray import runtime
    from leukray.model import create_model, save_model

    data = args.data or (str(DEFAULT_DATA) if DEFAULT_DATA.is_dir() else None)
    if data is None:
        from leukray.synthetic import make_dataset

        data = str(make_dataset(Path(tempfile.mkdtemp()) / "synth", per_class=200))
    listing = list_labeled_images(data)
    paths = [r["path"] for r in listing.records]
    model = Path(tempfile.mkdtemp()) / "model.pt"  # speed does not depend on the weights
    save_model(model, create_model("leuknet", len(listing.classes)).eval(),
               {"arch": "leuknet", "classes": listing.classes, "image_size": args.image_size,
                "mean": [0.8, 0.67, 0.7], "std": [0.12, 0.17, 0.1]})
    report = {"machine": machine(), "data": data, "images": len(paths),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": []}

    def log(m):
        print(m, flush=True)

    engine_models = {"leuknet": str(model)}
    if importlib.util.find_spec("efficientnet_lite_pytorch"):  # the [pretrained] extra
        lite = model.parent / "lite0.pt"
        save_model(lite, create_model("efficientnet_lite0", len(listing.classes), mean=[0.5] * 3, std=[0.5] * 3)
                   .eval(), {"arch": "efficientnet_lite0", "classes": listing.classes,
                             "image_size": args.image_size, "mean": [0.5] * 3, "std": [0.5] * 3})
        engine_models["efficientnet_lite0"] = str(lite)
    if "engines" not in args.skip:
        log("engines, model only (PyTorch vs ONNX Runtime) ...")
        report["rows"] += bench_engines_model(engine_models, args.image_size, args.reps, log)
    if "finetune" not in args.skip and "efficientnet_lite0" in engine_models:
        log("fine-tuning step, frozen stages ...")
        report["rows"] += bench_train_step("efficientnet_lite0", args.image_size, [0, 4], max(args.reps, 5), log)
    runtime.init_ray()

    if "scoring" not in args.skip:
        log("scoring ...")
        report["rows"] += bench_scoring(str(model), paths, args.reps, [None, 2], log)
    if "training" not in args.skip:
        log("training ...")
        report["rows"] += bench_training(data, args.reps, [1, 2], args.epochs, args.image_size, log)
    if "scale" not in args.skip and args.scale:
        log("scale ...")
        report["rows"] += bench_scale(str(model), data, args.scale, log)
    if "engines" not in args.skip:
        log("engines, end to end (PyTorch vs ONNX Runtime) ...")
        report["rows"] += bench_engines_scoring(engine_models, paths, args.reps, log)
    print()
    print(f"machine: {report['machine']}")
    print(format_table(report["rows"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nwritten {args.out}")
    return report
