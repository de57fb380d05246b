"""GPU check: the model on CUDA, then the real Ray commands against plain PyTorch.

    PYTHONPATH=/tmp/site:$PWD python jobs/gpu_check.py [--out gpu_check.json] [--sweep DATA.npz ...]
    python jobs/gpu_check.py --device cpu --per-class 8 --epochs 2 --image-size 64   # dry run, no GPU

1. parity: the same weights give the same probabilities on CPU and CUDA, and one
   training step from the same state gives the same loss;
2. speed: batch prediction (fp32 and bf16 autocast) and training steps, images/s;
3. when Ray is importable: `leukray synth --per-class N`, then `leukray train --gpu` and
   `leukray score --gpu` as subprocesses (the commands users run), and the plain loops of
   `leukray.baseline` on the same files, model and recipe; prints the side-by-side table
   (start-up, ingest img/s, epoch img/s, scoring img/s, wall) and writes it into --out;
4. optionally a recipe sweep on preprocessed data (`--sweep`, npz files of 128 px JPEG
   bytes with labels and split columns), to compare training settings quickly.

Skips with exit code 0 and a message when no CUDA device is present (CI has none), unless
`--device cpu` asks for the Ray part on CPUs (a dry run of 3, e.g. before a one-shot GPU run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from leukray.baseline import predict, train_plain  # noqa: E402
from leukray.config import TrainConfig  # noqa: E402
from leukray.data import preprocess  # noqa: E402
from leukray.model import create_model  # noqa: E402
from leukray.recipe import train_step  # noqa: E402


def parity(arch: str, size: int) -> dict:
    torch.manual_seed(0)
    cpu = create_model(arch, 4).eval()
    gpu = create_model(arch, 4)
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda().eval()
    x = torch.randint(0, 256, (32, size, size, 3), dtype=torch.uint8)
    p_cpu = predict(cpu, x)
    p_gpu = predict(gpu, x.cuda())
    cfg = TrainConfig(augment=False)
    y = torch.randint(0, 4, (32,))
    losses = []
    for model, dev in ((cpu, "cpu"), (gpu, "cuda")):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        loss, _ = train_step(model, opt, x.to(dev), y.to(dev), cfg, 0.0, torch.Generator().manual_seed(0), None)
        losses.append(float(loss))
    return {"arch": arch, "max_abs_prob_diff": float(np.abs(p_cpu - p_gpu).max()),
            "train_loss_cpu": losses[0], "train_loss_cuda": losses[1]}


def speed(arch: str, size: int, batch: int = 256, reps: int = 20) -> dict:
    model = create_model(arch, 4).cuda().eval()
    x = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device="cuda")
    out = {"arch": arch, "size": size, "batch": batch}
    for name, ctx in (("fp32", torch.autocast("cuda", enabled=False)), ("bf16", torch.autocast("cuda", torch.bfloat16))):
        times = []
        with torch.inference_mode(), ctx:
            for i in range(reps + 3):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                torch.softmax(model(x).float(), 1)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        out[f"predict_{name}_images_per_s"] = batch / float(np.median(times[3:]))
    cfg = TrainConfig(arch=arch, batch_size=batch)
    model.train()
    opt = torch.optim.AdamW(model.parameters())
    y = torch.randint(0, 4, (batch,), device="cuda")
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(reps + 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(model, opt, x, y, cfg, 1e-3, gen, None)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out["train_images_per_s"] = batch / float(np.median(times[3:]))
    return out


def load_npz(path: str, size: int) -> dict:
    z = np.load(path)
    offs, blob = z["offsets"], z["jpeg"].tobytes()
    images = np.stack([preprocess(blob[a:b], size)[0] for a, b in zip(offs[:-1], offs[1:])])
    return {"images": torch.from_numpy(images), "labels": torch.from_numpy(z["labels"]).long(),
            **{k: z[k] for k in z.files if k.startswith("split_")}}


def tta_predict(model, images: torch.Tensor) -> np.ndarray:
    """Average over the 8 flips/rotations of the square (cells have no orientation)."""
    probs = 0
    for k in range(4):
        for flip in (False, True):
            x = torch.rot90(images, k, (1, 2))
            x = torch.flip(x, (2,)) if flip else x
            probs = probs + predict(model, x.contiguous())
    return probs / 8


def sweep(data: dict, name: str, configs: list[dict], log, device: str = "cuda") -> list[dict]:
    results = []
    for overrides in configs:
        policy = overrides.pop("split", "grouped")
        split = data[f"split_{policy}"]
        sel = {s: torch.from_numpy(np.flatnonzero(split == s)) for s in ("train", "val", "test")}
        cfg = dataclasses.replace(TrainConfig(), **overrides)
        t0 = time.perf_counter()
        imgs, labels = data["images"], data["labels"]
        model, hist = train_plain(imgs[sel["train"]].to(device), labels[sel["train"]].to(device), cfg, 4, device,
                                  val=(imgs[sel["val"]].to(device), labels[sel["val"]]))
        test_x, test_y = imgs[sel["test"]].to(device), labels[sel["test"]].numpy()
        pred = predict(model, test_x).argmax(1)
        pred_tta = tta_predict(model, test_x).argmax(1)
        row = {"data": name, "split": policy, **overrides,
               "test_accuracy": float((pred == test_y).mean()), "test_accuracy_tta": float((pred_tta == test_y).mean()),
               "benign_recall": float((pred[test_y == 0] == 0).mean()),
               "benign_recall_tta": float((pred_tta[test_y == 0] == 0).mean()),
               "final_val_accuracy": hist[-1]["val_accuracy"], "best_val_accuracy": max(h["val_accuracy"] for h in hist),
               "n_test": int(len(test_y)), "seconds": time.perf_counter() - t0}
        log(row)
        results.append(row)
    return results


SWEEP = [
    {}, {"seed": 1}, {"seed": 2},
    {"epochs": 80}, {"arch": "leuknet_wide"}, {"lr": 1e-3}, {"batch_size": 32}, {"weight_decay": 0.05},
    {"label_smoothing": 0.0, "class_weights": False}, {"augment": False},
    {"split": "random"},
]


ROOT = Path(__file__).resolve().parents[1]
STARTUP_KEYS = ("ray_init_s", "listing_hashing_s", "decode_s", "train_start_s", "first_batch_s")  # timings.json


def leukray_cli(*argv: str) -> tuple[float, str]:
    """Run `leukray ARGV` as users do (a new process, embedded Ray); returns (wall s, output)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "leukray.cli", *argv], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"leukray {' '.join(argv)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout + proc.stderr


def ray_side(work: Path, args, gpu: list[str]) -> tuple[dict, pd.DataFrame]:
    """`leukray train` and `leukray score` on the synthetic data; figures from their own files."""
    run, n_files = work / "run", sum(1 for _ in (work / "data").rglob("*.jpg"))
    train_wall, out = leukray_cli("train", "--data", str(work / "data"), "--output", str(run), "--epochs",
                                  str(args.epochs), "--patience", str(args.epochs), "--image-size", str(args.image_size),
                                  "--workers", "1", "--split", "random", *gpu)
    print(out[-2500:], flush=True)
    t = json.loads((run / "timings.json").read_text())
    hist = json.loads((run / "history.json").read_text())
    split = pd.read_csv(run / "split.csv")
    score_wall, out = leukray_cli("score", "--model", str(run), "--input", str(work / "data"), "--output",
                                  str(work / "pred"), "--overwrite", *gpu)
    print(out[-1500:], flush=True)
    n_ingest = int(split["split"].isin(["train", "val"]).sum())
    return {"startup_s": t.get("startup_s"), "startup": {k: t[k] for k in STARTUP_KEYS if k in t},
            "ingest_images_per_s": n_ingest / t["decode_s"],
            "epoch_images_per_s": statistics.median(h["train_images_per_s"] for h in hist[1:] or hist),
            "scoring_images_per_s": n_files / score_wall, "wall_s": train_wall,
            "train_wall_s": train_wall, "score_wall_s": score_wall}, split


def plain_side(split: pd.DataFrame, args, device: str) -> dict:
    """The plain loops of `leukray.baseline` on the same split: DataLoader decode, train, predict."""
    from leukray.baseline import decode_all

    workers = os.cpu_count() or 0
    classes = sorted(split["label"].unique(), key=str.casefold)
    train = split[split["split"] == "train"]
    t0 = time.perf_counter()
    images = decode_all(train["path"].tolist(), args.image_size, workers=workers)
    decode_s = time.perf_counter() - t0
    labels = torch.tensor([classes.index(c) for c in train["label"]])
    cfg = TrainConfig(epochs=args.epochs, patience=args.epochs)
    _, hist = train_plain(images.to(device), labels.to(device), cfg, len(classes), device)
    wall = time.perf_counter() - t0
    model = create_model("leuknet", len(classes)).to(device)
    t1 = time.perf_counter()
    all_images = decode_all(split["path"].tolist(), args.image_size, workers=workers)
    predict(model, all_images.to(device))
    return {"startup_s": decode_s, "ingest_images_per_s": len(train) / decode_s,
            "epoch_images_per_s": statistics.median(h["train_images_per_s"] for h in hist[1:] or hist),
            "scoring_images_per_s": len(split) / (time.perf_counter() - t1), "wall_s": wall}


TABLE = [("start-up to first batch, s", "startup_s"), ("ingest (decode), img/s", "ingest_images_per_s"),
         ("steady epoch, img/s", "epoch_images_per_s"),
         ("scoring (whole command for Ray), img/s", "scoring_images_per_s"), ("train wall, s", "wall_s")]


def print_table(ray: dict, plain: dict) -> None:
    def cell(v, width):
        return f"{'n/a':>{width}s}" if v is None else f"{v:{width}.1f}"

    print(f"\n{'':42s}{'Ray (leukray)':>16s}{'plain':>12s}")
    for name, key in TABLE:
        print(f"{name:42s}{cell(ray.get(key), 16)}{cell(plain.get(key), 12)}")
    print("Ray start-up split: " + ", ".join(f"{k} {v:.1f}" for k, v in ray.get("startup", {}).items()
                                             if v is not None), flush=True)


def ray_vs_plain(args, device: str) -> dict:
    """Part 3: the real Ray path against the plain loops; prints the table."""
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-check-"))
    synth_s, _ = leukray_cli("synth", "--output", str(work / "data"), "--per-class", str(args.per_class))
    gpu = ["--gpu"] if device == "cuda" else []
    ray, split = ray_side(work, args, gpu)
    plain = plain_side(split, args, device)
    print_table(ray, plain)
    return {"device": device, "files": len(split), "epochs": args.epochs, "image_size": args.image_size,
            "synth_s": synth_s, "ray": ray, "plain": plain, "workdir": str(work)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="JSON report (written after each part)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: skip the CUDA checks and run the Ray part on CPUs (a dry run on tiny data)")
    p.add_argument("--per-class", type=int, default=500, help="synthetic images per class for the Ray part")
    p.add_argument("--epochs", type=int, default=6, help="training epochs of the Ray part (and the plain loop)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--workdir", help="folder for data, run and predictions (default: a new temporary one)")
    p.add_argument("--no-ray", action="store_true", help="only the model-level checks")
    p.add_argument("--sweep", nargs="*", default=[], help="npz files to run the recipe sweep on")
    p.add_argument("--configs", help="JSON list of TrainConfig overrides for the sweep (default: SWEEP)")
    return p.parse_args()


def model_checks(report: dict, log) -> None:
    report["parity"] = [parity(a, 128) for a in ("leuknet", "resnet18")]
    log(report["parity"])
    report["speed"] = [speed("leuknet", 128), speed("resnet18", 128)]
    log(report["speed"])


def main() -> int:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device, skipped")
        return 0
    report = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "cpus": os.cpu_count()}

    def log(x):
        print(json.dumps(x), flush=True)

    def save():
        Path(args.out).write_text(json.dumps(report, indent=2))

    if args.device == "cuda":
        model_checks(report, log)
        save()
    try:
        import ray  # noqa: F401
    except ImportError:
        print("gpu_check: Ray is not importable, the Ray part is skipped")
    else:
        if not args.no_ray:
            report["ray_vs_plain"] = ray_vs_plain(args, args.device)
            save()
    report["sweep"] = []
    for path in args.sweep:
        name = Path(path).stem
        size = int(name.rsplit("-", 1)[1])
        data = load_npz(path, size)
        if args.configs:
            configs = json.loads(args.configs)
        else:
            configs = [dict(c) for c in SWEEP] if name.startswith("Original-128") else [{}, {"split": "random"}]
        report["sweep"] += sweep(data, name, configs, log)
        save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
