"""`leukray` command line: train, cv, evaluate, refit, score, demo, synth, report, export, explain.

Every subcommand runs on Ray: by default an embedded one (`ray.init()` in this process);
`--address auto` joins a local `ray start --head`; `--address HOST:PORT` a cluster. The
same functions back the `jobs/` scripts used with `ray job submit`.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

from leukray import runtime, stderrfilter, storage
from leukray.progress import VERBOSE_ENV
from leukray.config import (BenchmarkConfig, CvConfig, DataConfig, DemoConfig, EvaluateConfig, ExplainConfig,
                            ExportConfig, RayConfig, RefitConfig, ReportConfig, ScoreConfig, SynthConfig, TrainConfig,
                            add_arguments, from_args)

# Subcommand -> (one-line help, description, its configs with their argparse group titles).
# Each command function takes those configs, in this order.
COMMANDS: dict[str, tuple[str, str, tuple[tuple[type, str], ...]]] = {
    "train": ("split, train with Ray Train, save model.pt, evaluate on the test split",
              "Split a folder of class sub-folders, train a CNN with Ray Train, keep the best epoch by validation "
              "accuracy as RUN_DIR/model.pt and write test metrics. Re-running the same command resumes from the "
              "last checkpoint.", ((DataConfig, "data"), (TrainConfig, "training"), (RayConfig, "ray"))),
    "cv": ("grouped cross-validation: a train run per fold, out-of-fold predictions, metrics with 95 % intervals",
           "Split --data into --folds grouped, stratified folds (the same groups as `train`); train each as a normal "
           "run directory OUTPUT/fold-K (its test split is fold K), several at once when the cluster has room; "
           "write OUTPUT/oof.parquet (every image scored by the fold that held it out) and OUTPUT/cv_metrics.json "
           "(mean and t interval across folds, Wilson / group-bootstrap intervals on the pooled predictions). "
           "Re-running skips finished folds and resumes an interrupted one.",
           ((DataConfig, "data"), (TrainConfig, "training"), (CvConfig, "cross-validation"), (RayConfig, "ray"))),
    "evaluate": ("test metrics of a model (its run's test split, or another labelled folder)",
                 "Without --data: score the run's test split and (re)write RUN_DIR/metrics.json. With --data: "
                 "evaluate on that folder of class sub-folders, results in --output.",
                 ((EvaluateConfig, "evaluation"), (RayConfig, "ray"))),
    "refit": ("refit a run's trust metadata (calibration, colour model, OOD threshold) with the current rules",
              "Refit the temperature, the colour model and the OOD and review thresholds of an existing local run "
              "on its own split, store them in RUN_DIR/model.pt (same weights, same model_id), then do what the end "
              "of `leukray train` does: re-export, re-score the test split into metrics.json, rewrite the model "
              "card. For runs trained before these checks existed, or before a rule changed.",
              ((RefitConfig, "refit"), (RayConfig, "ray"))),
    "score": ("bulk-score images with Ray batch inference into Parquet",
              "Score every image under --input into Parquet part files in --output: one row per file (errors "
              "included), a probability per class. Re-running skips files already scored.",
              ((ScoreConfig, "scoring"), (RayConfig, "ray"))),
    "demo": ("the whole pipeline end to end: (synthetic data), train, evaluate, score",
             "Run train -> evaluate -> score on --data, or on synthetic smear-like images generated into "
             "OUTPUT/data when no --data is given.", ((DemoConfig, "demo"), (RayConfig, "ray"))),
    "synth": ("write a synthetic smear-like dataset (class sub-folders of JPEGs)",
              "Write --per-class images of each class as OUTPUT/<class>/WBC-<class>-NNN.jpg.",
              ((SynthConfig, "synthetic data"),)),
    "report": ("report.html (+ report.md) of a training run, or report.html of a scoring output",
               "For a run directory: RUN_DIR/report/report.md and a self-contained report.html with figures: "
               "samples per class, model summary with FLOPs, training curves, confusion matrix, per-class metrics "
               "and ROC curves, misclassified test images and Grad-CAM overlays. For a `leukray score` output "
               "folder: report.html with totals, classes per folder, the malignant-probability distribution, the "
               "most suspicious images and every error reason.", ((ReportConfig, "report"),)),
    "export": ("TorchScript and ONNX copies of a model, with its metadata",
               "Write model.onnx (uint8 NHWC input 'image', output 'probs'), model.torchscript.pt and model.json; "
               "checks ONNX Runtime against PyTorch.", ((ExportConfig, "export"),)),
    "explain": ("Grad-CAM heatmap overlays (PNG) for images",
                "For each image under --input, write OUTPUT/<name>.png: the image and its Grad-CAM heatmap for "
                "the predicted (or --target) class.", ((ExplainConfig, "explain"),)),
    "benchmark": ("Ray paths vs plain PyTorch: scoring, training, scaling, peak RSS",
                  "Side by side on the same files, model, batch size and recipe: scoring JPEG->Parquet (Ray actors "
                  "vs a DataLoader loop), steady-state training epochs (Ray Train with 1 and 2 workers vs a plain "
                  "loop), start-up to first batch, peak RSS, and scoring at 2k/20k images. Prints a table, writes "
                  "JSON.", ((BenchmarkConfig, "benchmark"),)),
}


def _parser() -> argparse.ArgumentParser:
    """The `leukray` parser: each subcommand's flags come from its config dataclasses."""
    p = argparse.ArgumentParser(
        prog="leukray",
        description="Train, evaluate and bulk-score leukemia (ALL) classifiers on blood smear images, on Ray.",
        epilog="Run `leukray COMMAND --help` for the options of each command.",
    )
    _add_verbose(p, default=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, description, configs) in COMMANDS.items():
        # argparse %-formats help texts (for %(default)s); ours hold literal "%" ("95 % intervals")
        sp = sub.add_parser(name, help=help_text.replace("%", "%%"), description=description,
                            formatter_class=_HelpFormatter)
        for cls, title in configs:
            add_arguments(sp, cls, title)
        _add_verbose(sp, default=argparse.SUPPRESS)
    return p


def _add_verbose(p: argparse.ArgumentParser, default) -> None:
    """`--verbose` before or after the command (SUPPRESS: a subcommand does not reset it)."""
    p.add_argument("--verbose", "-v", action="store_true", default=default,
                   help=f"show Ray's own logs and progress too (or set {VERBOSE_ENV}=1)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless there is none or its help already explains it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "default:" in text or "(default" in text:
            return text
        return super()._get_help_string(action)


def cmd_train(data: DataConfig, train: TrainConfig, ray_cfg: RayConfig) -> dict:
    from leukray.train import fit

    result = fit(data, train, ray_cfg)
    print(f"[leukray] done in {result['timings']['total_s']:.0f}s: model {result['model']}, "
          f"metrics {result['run_dir'].rstrip('/')}/metrics.json")
    return result


def cmd_cv(data: DataConfig, train: TrainConfig, cv: CvConfig, ray_cfg: RayConfig) -> dict:
    from leukray.cv import cross_validate

    if storage.is_uri(train.output):
        raise ValueError("cv --output must be a local folder (each fold's run directory goes under it)")
    return cross_validate(data, train, cv, ray_cfg)


def cmd_evaluate(cfg: EvaluateConfig, ray_cfg: RayConfig) -> dict:
    from leukray.evaluate import evaluate_folder, evaluate_run

    if cfg.data:
        if storage.is_uri(cfg.model) and not cfg.output:
            raise ValueError("evaluate --data with a model on a URI needs --output (a local folder)")
        model_dir = Path(cfg.model) if Path(cfg.model).is_dir() else Path(cfg.model).parent
        out = cfg.output or str(model_dir / f"eval-{Path(cfg.data).name}")
        return evaluate_folder(cfg.model, cfg.data, out, ray_cfg)
    with storage.synced_run_dir(cfg.model) as run_dir:  # a URI run: evaluated in a local copy
        return evaluate_run(run_dir, ray_cfg)


def cmd_score(cfg: ScoreConfig, ray_cfg: RayConfig) -> dict:
    from leukray.infer import score

    if not cfg.input or not cfg.output:
        raise ValueError("score needs --input and --output")
    return score(cfg, ray_cfg)


def cmd_demo(cfg: DemoConfig, ray_cfg: RayConfig) -> dict:
    from leukray.infer import score
    from leukray.train import check_train_config, fit

    t0 = time.perf_counter()
    out = Path(cfg.output)
    data = cfg.data or str(out / "data")
    data_cfg = DataConfig(data=data, group_size=20 if cfg.data else 5)
    train_cfg = TrainConfig(output=str(out / "run"), epochs=cfg.epochs, workers=cfg.workers, patience=cfg.epochs)
    check_train_config(data_cfg, train_cfg, data_exists=bool(cfg.data))  # before the synthetic data is written
    if not cfg.data:
        from leukray.synthetic import check_synth_args

        synth = SynthConfig(output=data, per_class=cfg.per_class)
        check_synth_args(synth.per_class, synth.size)
        print(f"[leukray] no --data: generating {cfg.per_class} synthetic images per class in {data}")
        cmd_synth(synth)
    result = fit(data_cfg, train_cfg, ray_cfg)
    stats = score(ScoreConfig(model=result["run_dir"], input=data, output=str(out / "predictions"), overwrite=True),
                  ray_cfg)
    m = result["metrics"]
    print("\n[leukray] demo finished in {:.0f}s".format(time.perf_counter() - t0))
    print(f"  model:       {result['model']}")
    print(f"  metrics:     {Path(result['run_dir']) / 'metrics.json'}  (test accuracy {m['accuracy']:.4f}, "
          f"macro-F1 {m['macro_f1']:.4f})")
    print(f"  predictions: {stats['output']}  ({stats['scored']} rows; read with pandas.read_parquet)")
    return {"train": result, "score": stats}


def cmd_synth(cfg: SynthConfig) -> None:
    from leukray.synthetic import make_dataset

    root = make_dataset(cfg.output, per_class=cfg.per_class, size=cfg.size, seed=cfg.seed)
    print(f"[leukray] wrote {cfg.per_class} images per class to {root}")


def cmd_report(cfg: ReportConfig) -> None:
    from leukray.report import write_any

    path = write_any(cfg.run_dir, cfg.output, cfg.max_misclassified, cfg.samples_per_class, cfg.gradcam_per_class,
                     model=cfg.model)
    print(f"[leukray] report: {path}")


def cmd_export(cfg: ExportConfig) -> None:
    from leukray.export import export_with_options
    from leukray.modelfile import resolve_model_path

    model = cfg.model
    if storage.is_uri(model):  # export in a local copy of the run, mirrored back (with export/)
        run = model.rstrip("/").rsplit("/", 1)[0] if model.endswith(".pt") else model
        with storage.synced_run_dir(run) as run_dir:
            info = export_with_options(run_dir, cfg.output or str(run_dir / "export"), cfg)
        out = cfg.output or f"{run.rstrip('/')}/export"
    else:
        out = cfg.output or str(resolve_model_path(model).parent / "export")
        info = export_with_options(model, out, cfg)
    print(f"[leukray] exported to {out}: {json.dumps(info, default=str)[:400]}")


def cmd_explain(cfg: ExplainConfig) -> None:
    from leukray.explain import explain_files
    from leukray.inputs import list_inputs

    paths = [it["path"] for it in list_inputs(cfg.input).items if it["member"] is None]
    written = explain_files(cfg.model, paths, cfg.output, target=cfg.target)
    print(f"[leukray] wrote {len(written)} Grad-CAM overlays to {cfg.output}")


def cmd_refit(cfg: RefitConfig, ray_cfg: RayConfig) -> dict:
    from leukray.train import finish_run
    from leukray.trust import confidence_warning, refit

    if storage.is_uri(cfg.model) or not Path(cfg.model).is_dir():
        raise ValueError(f"--model must be a local run directory, got {cfg.model}")
    saved = refit(cfg.model, cfg.seed)
    print(json.dumps({k: v for k, v in saved["trust"].items() if k != "colour_model"}, indent=2))
    if warning := confidence_warning(saved["trust"]):
        print(warning)
    return finish_run(Path(cfg.model), ray_cfg)


def cmd_benchmark(cfg: BenchmarkConfig) -> dict:
    from leukray.benchmark import run

    return run(cfg)


RUN = {"train": cmd_train, "cv": cmd_cv, "evaluate": cmd_evaluate, "refit": cmd_refit, "score": cmd_score,
       "demo": cmd_demo, "synth": cmd_synth, "report": cmd_report, "export": cmd_export, "explain": cmd_explain,
       "benchmark": cmd_benchmark}


def console(argv: list[str] | None = None) -> int:
    """The `leukray` command (and `python -m leukray.cli`): `main` with Ray's known-harmless
    C++ lines taken out of stderr (`leukray.stderrfilter`), unless --verbose; a command that
    succeeded then ends at once (`_leave`). Only here, not in `main`: a library caller or a
    test harness keeps its own file descriptors and its process."""
    code = main(argv, filter_stderr=True)
    if code == 0:
        _leave(code)
    return code


def _leave(code: int) -> NoReturn:
    """End the process as a normal exit would, less two waits that a finished command does
    not need (~0.8 s of the ~1.2 s from a Ray command's last line to its end):
    - Ray's exit hook sleeps 0.5 s before shutting Ray down, so that workers' last log lines
      can still reach the console; a command that succeeded has its results written and its
      summary printed, and a failing one (its worker's traceback) keeps the normal exit;
    - the interpreter's teardown after the exit handlers (~0.3 s, in no Python frame:
      extension modules' finalizers; nothing of leukray's is left to close by then).
    As at a normal exit, in its order: the interpreter's own thread shutdown (it wakes idle
    thread-pool workers, then waits for threads that are not daemons), Ray shut down
    (`runtime.shutdown_ray`: only a Ray this process started or joined), every exit handler
    (stderr's filter, logging), then standard output and error flushed."""
    threading._shutdown()  # what the interpreter calls first at exit; a plain join would wait on idle pools
    runtime.shutdown_ray()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # started with the descriptor closed (`>&-`): nothing to flush
            continue
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone (`leukray ... | head`): Python's own exit says 120
            code = code or 120
    os._exit(code)


def main(argv: list[str] | None = None, filter_stderr: bool = False) -> int:
    args = _parser().parse_args(argv)
    if args.verbose:  # before Ray starts: its processes inherit the setting
        os.environ[VERBOSE_ENV] = "1"
    if filter_stderr:
        stderrfilter.install_for_command()
    try:
        RUN[args.command](*(from_args(cls, args) for cls, _ in COMMANDS[args.command][2]))
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"leukray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"leukray {args.command}: interrupted (re-run the same command to resume)", file=sys.stderr)
        return 130
    except Exception as e:
        if not _from_ray(e):
            raise
        print(f"leukray {args.command}: error in a Ray worker: {_worker_error(e)}\n"
              f"leukray {args.command}: full logs: {_logs_dir()}", file=sys.stderr)
        return 1
    return 0


def _from_ray(e: BaseException) -> bool:
    """Errors Ray raises on the driver for a failed task, actor or Train worker group."""
    from ray.exceptions import RayError
    from ray.train import TrainingFailedError

    return isinstance(e, (RayError, TrainingFailedError))


WORKER_ERROR_LINES = 40


def _worker_error(e: BaseException) -> str:
    """The worker's own exception, type and message: Ray Train's error keeps each rank's
    (`worker_failures`), a task's or actor's keeps it as `cause`. Ray's summary of a
    training failure is a middle-truncated snippet that can cut the message itself."""
    failures = getattr(e, "worker_failures", None) or {}
    rank, err = min(failures.items(), key=lambda kv: kv[0]) if failures else (None, e)
    err = getattr(err, "controller_failure", None) or err
    cause = getattr(err, "cause", None)
    err = cause if isinstance(cause, BaseException) else err
    where = f"rank {rank}: " if rank is not None else ""
    return f"{where}{type(err).__name__}: {_first_lines(err)}"


def _first_lines(e: BaseException) -> str:
    """The error's text, capped: the full text is in the logs."""
    lines = str(e).strip().splitlines()
    more = f"\n  ... {len(lines) - WORKER_ERROR_LINES} more lines" if len(lines) > WORKER_ERROR_LINES else ""
    return "\n".join(lines[:WORKER_ERROR_LINES]) + more


def _logs_dir() -> str:
    """Where Ray wrote every worker's stdout/stderr: the session's logs folder of this
    machine (of each node, on a cluster)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is not None:
        return f"{node.get_logs_dir_path()} (worker-*.err, worker-*.out; on a cluster, each node's)"
    return "/tmp/ray/session_latest/logs on each node of the Ray cluster (`ray logs` lists them)"

if __name__ == "__main__":
    sys.exit(console())
