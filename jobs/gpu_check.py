"""GPU check: the model, the training step and batch prediction on CUDA, without Ray.

    python jobs/gpu_check.py [--out gpu_check.json] [--sweep DATA.npz ...]

1. parity: the same weights give the same probabilities on CPU and CUDA, and one
   training step from the same state gives the same loss;
2. speed: batch prediction (fp32 and bf16 autocast) and training steps, images/s;
3. optionally a recipe sweep on preprocessed data (`--sweep`, npz files of 128 px JPEG
   bytes with labels and split columns), to compare training settings quickly.

Skips with exit code 0 and a message when no CUDA device is present (CI has none).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
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
        losses.append(loss)
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--sweep", nargs="*", default=[], help="npz files to run the recipe sweep on")
    p.add_argument("--configs", help="JSON list of TrainConfig overrides for the sweep (default: SWEEP)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device, skipped")
        return 0
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}

    def log(x):
        print(json.dumps(x), flush=True)

    report["parity"] = [parity(a, 128) for a in ("leuknet", "resnet18")]
    log(report["parity"])
    report["speed"] = [speed("leuknet", 128), speed("resnet18", 128)]
    log(report["speed"])
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
        Path(args.out).write_text(json.dumps(report, indent=2))
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
