"""`leukray` command line: train, evaluate, score, demo, synth, report, export, explain.

Every subcommand runs on Ray: by default an embedded one (`ray.init()` in this process);
`--address auto` joins a local `ray start --head`; `--address HOST:PORT` a cluster. The
same functions back the `jobs/` scripts used with `ray job submit`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from leukray import storage
from leukray.config import (DataConfig, RayConfig, ScoreConfig, TrainConfig, add_arguments, from_args)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="leukray",
        description="Train, evaluate and bulk-score leukemia (ALL) classifiers on blood smear images, on Ray.",
        epilog="Run `leukray COMMAND --help` for the options of each command.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = _HelpFormatter

    t = sub.add_parser("train", help="split, train with Ray Train, save model.pt, evaluate on the test split",
                       description="Split a folder of class sub-folders, train a CNN with Ray Train, keep the best "
                                   "epoch by validation accuracy as RUN_DIR/model.pt and write test metrics. "
                                   "Re-running the same command resumes from the last checkpoint.")
    add_arguments(t, DataConfig, "data")
    add_arguments(t, TrainConfig, "training", only=("output", "arch", "weights", "freeze_stages", "epochs", "batch_size", "lr", "weight_decay",
                                                     "label_smoothing", "warmup_epochs", "patience", "augment",
                                                     "class_weights", "seed"))
    add_arguments(t, TrainConfig, "scaling and fault tolerance", only=("workers", "gpu", "amp", "cpus_per_worker",
                                                                       "threads_per_worker", "max_failures"))
    add_arguments(t, RayConfig, "ray")

    e = sub.add_parser("evaluate", help="test metrics of a model (its run's test split, or another labelled folder)",
                       description="Without --data: score the run's test split and (re)write RUN_DIR/metrics.json. "
                                   "With --data: evaluate on that folder of class sub-folders, results in --output.")
    e.add_argument("--model", required=True, help="run directory (or model.pt with --data)")
    e.add_argument("--data", help="labelled folder to evaluate on instead of the run's test split")
    e.add_argument("--output", help="where --data results go (default: MODEL_DIR/eval-<folder name>)")
    add_arguments(e, RayConfig, "ray")

    s = sub.add_parser("score", help="bulk-score images with Ray batch inference into Parquet",
                       description="Score every image under --input into Parquet part files in --output: one row "
                                   "per file (errors included), a probability per class. Re-running skips files "
                                   "already scored.")
    add_arguments(s, ScoreConfig, "scoring")
    add_arguments(s, RayConfig, "ray")

    d = sub.add_parser("demo", help="the whole pipeline end to end: (synthetic data), train, evaluate, score",
                       description="Run train -> evaluate -> score on --data, or on synthetic smear-like images "
                                   "generated into OUTPUT/data when no --data is given.")
    d.add_argument("--output", default="runs/demo", help="folder for data, run and predictions (default: runs/demo)")
    d.add_argument("--data", help="labelled folder to use instead of synthetic images")
    d.add_argument("--per-class", type=int, default=80, help="synthetic images per class (default: 80)")
    d.add_argument("--epochs", type=int, default=12, help="training epochs (default: 12)")
    d.add_argument("--workers", type=int, default=2, help="Ray Train workers (default: 2)")
    add_arguments(d, RayConfig, "ray")

    g = sub.add_parser("synth", help="write a synthetic smear-like dataset (class sub-folders of JPEGs)")
    g.add_argument("--output", required=True, help="folder to write <class>/WBC-<class>-NNN.jpg into")
    g.add_argument("--per-class", type=int, default=80, help="images per class (default: 80)")
    g.add_argument("--size", type=int, default=224, help="image side in pixels (default: 224)")
    g.add_argument("--seed", type=int, default=0)

    r = sub.add_parser("report", help="figures and report.md of a run (samples, curves, confusion, ROC, errors)",
                       description="Write RUN_DIR/report/report.md with PNG figures: samples per class, model "
                                   "summary with FLOPs, training curves, confusion matrix, per-class metrics and "
                                   "ROC curves, misclassified test images and Grad-CAM overlays.")
    r.add_argument("run_dir", help="run directory written by `leukray train`")
    r.add_argument("--output", help="report folder (default: RUN_DIR/report)")
    r.add_argument("--max-misclassified", type=int, default=48)
    r.add_argument("--samples-per-class", type=int, default=8)
    r.add_argument("--gradcam-per-class", type=int, default=4, help="Grad-CAM overlays of test images per class")

    x = sub.add_parser("export", help="TorchScript and ONNX copies of a model, with its metadata",
                       description="Write model.onnx (uint8 NHWC input 'image', output 'probs'), "
                                   "model.torchscript.pt and model.json; checks ONNX Runtime against PyTorch.")
    x.add_argument("--model", required=True, help="run directory or model.pt")
    x.add_argument("--output", help="folder (default: RUN_DIR/export, where `score --engine onnx` looks)")

    h = sub.add_parser("explain", help="Grad-CAM heatmap overlays (PNG) for images",
                       description="For each image under --input, write OUTPUT/<name>.png: the image and its "
                                   "Grad-CAM heatmap for the predicted (or --target) class.")
    h.add_argument("--model", required=True, help="run directory or model.pt")
    h.add_argument("--input", required=True, help="image file or folder")
    h.add_argument("--output", required=True, help="folder for the PNGs")
    h.add_argument("--target", help="class to explain (default: the predicted class)")

    b = sub.add_parser("benchmark", help="Ray paths vs plain PyTorch: scoring, training, scaling, peak RSS",
                       description="Side by side on the same files, model, batch size and recipe: scoring "
                                   "JPEG->Parquet (Ray actors vs a DataLoader loop), steady-state training epochs "
                                   "(Ray Train with 1 and 2 workers vs a plain loop), start-up to first batch, peak "
                                   "RSS, and scoring at 2k/20k images. Prints a table, writes JSON.")
    from leukray.benchmark import add_arguments as add_benchmark_arguments

    add_benchmark_arguments(b)

    for sp in (t, e, s, d, g, r, x, h, b):
        sp.formatter_class = fmt
    return p


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless there is none or its help already explains it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "default:" in text or "(default" in text:
            return text
        return super()._get_help_string(action)


def cmd_train(args) -> dict:
    from leukray.train import fit

    result = fit(from_args(DataConfig, args), from_args(TrainConfig, args), from_args(RayConfig, args))
    print(f"[leukray] done in {result['timings']['total_s']:.0f}s: model {result['model']}, "
          f"metrics {result['run_dir'].rstrip('/')}/metrics.json")
    return result


def cmd_evaluate(args) -> dict:
    from leukray.evaluate import evaluate_folder, evaluate_run

    ray_cfg = from_args(RayConfig, args)
    if args.data:
        if storage.is_uri(args.model) and not args.output:
            raise ValueError("evaluate --data with a model on a URI needs --output (a local folder)")
        model_dir = Path(args.model) if Path(args.model).is_dir() else Path(args.model).parent
        out = args.output or str(model_dir / f"eval-{Path(args.data).name}")
        return evaluate_folder(args.model, args.data, out, ray_cfg)
    with storage.synced_run_dir(args.model) as run_dir:  # a URI run: evaluated in a local copy
        return evaluate_run(run_dir, ray_cfg)


def cmd_score(args) -> dict:
    from leukray.infer import score

    cfg = from_args(ScoreConfig, args)
    if not cfg.input or not cfg.output:
        raise ValueError("score needs --input and --output")
    return score(cfg, from_args(RayConfig, args))


def cmd_demo(args) -> dict:
    from leukray.infer import score
    from leukray.synthetic import make_dataset
    from leukray.train import fit

    t0 = time.perf_counter()
    out = Path(args.output)
    data = args.data
    if not data:
        data = str(out / "data")
        print(f"[leukray] no --data: generating {args.per_class} synthetic images per class in {data}")
        make_dataset(data, per_class=args.per_class)
    ray_cfg = from_args(RayConfig, args)
    group_size = 20 if args.data else 5
    result = fit(DataConfig(data=data, group_size=group_size),
                 TrainConfig(output=str(out / "run"), epochs=args.epochs, workers=args.workers, patience=args.epochs),
                 ray_cfg)
    stats = score(ScoreConfig(model=result["run_dir"], input=data, output=str(out / "predictions"), overwrite=True),
                  ray_cfg)
    m = result["metrics"]
    print("\n[leukray] demo finished in {:.0f}s".format(time.perf_counter() - t0))
    print(f"  model:       {result['model']}")
    print(f"  metrics:     {Path(result['run_dir']) / 'metrics.json'}  (test accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f})")
    print(f"  predictions: {stats['output']}  ({stats['scored']} rows; read with pandas.read_parquet)")
    return {"train": result, "score": stats}


def cmd_report(args) -> None:
    from leukray.explain import gradcam_section
    from leukray.report import report_dir, write_report

    with storage.synced_run_dir(args.run_dir) as run_dir:
        extra = gradcam_section(run_dir, report_dir(run_dir, args.output), args.gradcam_per_class)
        path = write_report(run_dir, args.output, args.max_misclassified, args.samples_per_class,
                            extra_sections=[extra] if extra else None)
    if storage.is_uri(args.run_dir) and args.output is None:
        path = f"{args.run_dir.rstrip('/')}/{Path(path).relative_to(run_dir).as_posix()}"
    print(f"[leukray] report: {path}")


def cmd_export(args) -> None:
    from leukray.export import export_model
    from leukray.model import resolve_model_path

    model = args.model
    if storage.is_uri(model):  # export in a local copy of the run, mirrored back (with export/)
        run = model.rstrip("/").rsplit("/", 1)[0] if model.endswith(".pt") else model
        with storage.synced_run_dir(run) as run_dir:
            info = export_model(run_dir, args.output or str(run_dir / "export"))
        out = args.output or f"{run.rstrip('/')}/export"
    else:
        out = args.output or str(resolve_model_path(model).parent / "export")
        info = export_model(model, out)
    print(f"[leukray] exported to {out}: {json.dumps(info, default=str)[:400]}")


def cmd_explain(args) -> None:
    from leukray.explain import explain_files
    from leukray.inputs import list_inputs

    paths = [it["path"] for it in list_inputs(args.input).items if it["member"] is None]
    written = explain_files(args.model, paths, args.output, target=args.target)
    print(f"[leukray] wrote {len(written)} Grad-CAM overlays to {args.output}")


def cmd_benchmark(args) -> dict:
    from leukray.benchmark import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"train": cmd_train, "evaluate": cmd_evaluate, "score": cmd_score, "demo": cmd_demo,
                "report": cmd_report, "export": cmd_export, "explain": cmd_explain,
                "benchmark": cmd_benchmark}
    try:
        if args.command == "synth":
            from leukray.synthetic import make_dataset

            root = make_dataset(args.output, per_class=args.per_class, size=args.size, seed=args.seed)
            print(f"[leukray] wrote {args.per_class} images per class to {root}")
            return 0
        commands[args.command](args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"leukray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"leukray {args.command}: interrupted (re-run the same command to resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
