"""Batch inference with Ray Data: score files with a trained model, write Parquet.

Pipeline: `map_batches(Predictor, compute=ActorPoolStrategy)`, actors that load the model
once, over batches of paths:
- on CPUs, one single-threaded actor per CPU reads, hashes, decodes, resizes and scores its
  own batches: no image crosses the object store;
- on GPUs (or `--decode tasks`), a decode stage first: `map_batches(preprocess_batch)` as
  Ray tasks of a quarter CPU, as many at once as the cluster has CPUs to spare, streaming
  into one actor per GPU that never decodes (bounded memory).
The driver streams result batches into Parquet part files (`leukray.output`). Sizes come
from the cluster's resources (`runtime.scoring_plan`): how many actors and decode tasks, and
how many files one Ray task holds (several model batches: each task costs Ray Data's driver
the same, whatever its size).

Guarantees:
- one row per input file: files that cannot be read or decoded get a row with `error`
  set and null predictions, the job goes on;
- part files are written atomically under deterministic names (a hash of the paths they
  hold), so a killed run leaves only whole parts; re-running into the same output skips
  files already scored (same path and sha256) and re-scores changed ones, and
  `overwrite=True` starts over. Nothing is ever appended twice;
- every flag is checked before anything in the output is touched (`check_score_config`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import pyarrow as pa

from leukray import progress, runtime, storage, trust
from leukray.config import RayConfig, ScoreConfig
from leukray.data import preprocess_batch
from leukray.inputs import Inputs, item_key, key_of, list_inputs
from leukray.output import PartWriter, check_output_folder, error_batch, reconcile, result_table, resume
from leukray.predictors import AUTO, PREDICTORS, benign_index, read_model_meta, resolve_model_file, select_engine


@dataclass
class _Sink:
    """Result batches -> Parquet parts of about `rows_per_part` rows, and the counts."""

    writer: PartWriter
    rows_per_part: int
    meta: dict
    scored_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    pending: list = field(default_factory=list)
    pending_rows: int = 0
    scored: int = 0
    errors: dict = field(default_factory=dict)
    not_assessable: int = 0
    needs_review: int = 0

    def add(self, batch: dict) -> None:
        classes = list(self.meta["classes"])
        table = result_table(batch, classes, benign_index(classes), self.meta["model_id"], self.scored_at)
        self.pending.append(table)
        self.pending_rows += table.num_rows
        self.scored += table.num_rows
        decoded = table.column("error").is_null().to_numpy(zero_copy_only=False)
        self.not_assessable += int((decoded & ~table.column("assessable").to_numpy(zero_copy_only=False)).sum())
        self.needs_review += int(table.column("needs_review").to_numpy(zero_copy_only=False).sum())
        for e in table.column("error").drop_null().to_pylist():
            reason = e.split(":")[0]
            self.errors[reason] = self.errors.get(reason, 0) + 1
        if self.pending_rows >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.writer.write(pa.concat_tables(self.pending))
        self.pending, self.pending_rows = [], 0


def _dataset(todo: list[dict], cfg: ScoreConfig, model_file: str, meta: dict, log):
    """The two-stage Ray Dataset (decode tasks -> model actors) over `todo`: blocks of the
    plan's `rows_per_task` files, one Ray task each; the model sees `--batch-size` at a time.
    Returns it with its plan."""
    plan = runtime.scoring_plan(cfg, runtime.ClusterCPUs.current(), len(todo))
    kwargs = {"model_path": model_file, "threads": plan.threads_per_actor, "device": "cuda" if cfg.gpu else "cpu",
              "review_threshold": cfg.review_threshold, "batch_size": cfg.batch_size}
    if cfg.explain:  # beside the Parquet folder, not in it: pd.read_parquet(OUTPUT) must see only parts
        kwargs.update(explain_dir=os.path.abspath(cfg.output).rstrip("/") + "_explanations",
                      explain_threshold=cfg.explain_threshold)
    ds = input_dataset(todo, plan, int(meta["image_size"]), trust.decode_checks(meta))
    # A whole block per call; Ray Data insists on a batch size with GPUs (blocks are no larger).
    ds = ds.map_batches(PREDICTORS[cfg.engine], fn_constructor_kwargs=kwargs,
                        batch_size=plan.rows_per_task if cfg.gpu else None,
                        compute=_actor_pool(plan), num_cpus=plan.cpus_per_actor,
                        num_gpus=plan.gpus_per_actor)
    log(f"[leukray] scoring {len(todo)} files, {cfg.engine} engine; {plan.describe()}")
    return ds, plan


def input_dataset(todo: list[dict], plan: runtime.ScoringPlan, size: int, quality: bool | dict = False):
    """`todo` in blocks of the plan's `rows_per_task` files, read and decoded by the plan's
    decode tasks, a whole block per task, unless the actors decode (`Predictor.__call__`).
    Also what `leukray benchmark` times as the decode stage alone."""
    import ray

    blocks = plan.blocks(len(todo))
    ds = ray.data.from_items(todo, override_num_blocks=blocks)
    if plan.decode_in_actors:
        return ds
    return ds.map_batches(preprocess_batch, fn_kwargs={"size": size, "quality": quality}, batch_size=None,
                          num_cpus=plan.decode_cpus,
                          # never more tasks than blocks (Ray Data warns about an unreachable limit)
                          compute=ray.data.TaskPoolStrategy(size=min(plan.decode_tasks, blocks)))


def _actor_pool(plan: runtime.ScoringPlan):
    """A fixed pool of `plan.actors`; with --max-actors, one that Ray Data grows while the
    model stage is busy and the cluster has room (a node that joins mid-job gets actors)."""
    import ray

    if plan.max_actors:
        return ray.data.ActorPoolStrategy(min_size=plan.actors, max_size=plan.max_actors)
    return ray.data.ActorPoolStrategy(size=plan.actors)


def _stream(ds, sink: _Sink, total: int) -> tuple[float, float]:
    """Result batches -> the sink, with a progress bar (`leukray.progress`): files done of
    `total`, rate, ETA and error rows so far. Returns the seconds until the first batch
    and the rate after it (rows of the later batches per second since the first came)."""
    bar = progress.progress(total, "scoring", unit="file")
    start = time.perf_counter()
    first = at_first = None
    done = sink.scored
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        sink.add(batch)
        if first is None:
            first, at_first = time.perf_counter(), sink.scored
        bar.update(sink.scored - done, errors=sum(sink.errors.values()))
        done = sink.scored
    bar.close()
    end = time.perf_counter()
    if first is None:
        return end - start, 0.0
    return first - start, (sink.scored - at_first) / (end - first) if end > first else 0.0


def score_paths(
    items: list[dict],
    cfg: ScoreConfig,
    ray_cfg: RayConfig | None = None,
    log=print,
    errors: list[tuple[str, str | None, str]] = (),
) -> dict:
    """Score `items` (dicts with a `path`, optionally archive `member`/`offset`/`size` and
    pass-through columns such as `label`) into Parquet parts under cfg.output.
    `errors` are inputs that failed while listing; they get error rows too."""
    t0 = time.perf_counter()
    check_score_config(cfg)  # before anything in cfg.output is read, cleared or written
    engine, why = select_engine(cfg.engine, cfg.model, cfg.gpu, cfg.explain)
    if engine == "torch" and cfg.engine == AUTO:
        log(f"[leukray] engine {why}")
    cfg = dataclasses.replace(cfg, engine=engine)
    model_file = resolve_model_file(cfg.engine, cfg.model)
    meta = read_model_meta(model_file, cfg.engine)
    if trust.missing_warning(meta):
        log(trust.missing_warning(meta))
    items = [{"member": None, "offset": -1, "size": -1, **it} for it in items]
    sink = _Sink(PartWriter(cfg.output), cfg.rows_per_part, meta)
    done = resume(sink.writer, items, cfg.overwrite, log)
    todo = [it for it in items if key_of(it) not in done]
    new_errors = [e for e in errors if item_key(e[0], e[1]) not in done]
    if new_errors:
        sink.add(error_batch(new_errors, len(meta["classes"])))
    startup = {}
    if todo:
        t_ray = time.perf_counter()
        runtime.init_ray(ray_cfg, dashboard=cfg.dashboard)
        # Actors on any node load the model and read the inputs (the driver alone writes --output).
        runtime.check_shared_paths(read={"--model": model_file, "--input": todo[0]["path"]})
        t_ds = time.perf_counter()
        ds, plan = _dataset(todo, cfg, model_file, meta, log)
        t_run = time.perf_counter()
        with nullcontext() if plan.decode_in_actors else runtime.prompt_task_stages():
            first_s, rate = _stream(ds, sink, len(todo))
        startup = {"checks_s": t_ray - t0, "ray_s": t_ds - t_ray, "dataset_s": t_run - t_ds,
                   "first_results_s": first_s, "images_per_s_after": rate}
    sink.flush()
    seconds = time.perf_counter() - t0
    return {"scored": sink.scored, "errors": sink.errors, "already_scored": len(done), "startup": startup,
            "total": len(items) + len(errors), "seconds": seconds, "not_assessable": sink.not_assessable,
            "needs_review": sink.needs_review,
            "images_per_s": sink.scored / seconds if seconds else 0.0, "output": cfg.output,
            "model_id": meta["model_id"]}


def check_score_config(cfg: ScoreConfig) -> None:
    """Refuse every bad flag combination with a ValueError (FileNotFoundError for a missing
    model) before any side effect: `--overwrite` deletes the parts in --output, so a
    check that ran after it would turn a typo into lost predictions."""
    problems = []
    if cfg.explain and (cfg.engine not in ("torch", AUTO) or storage.is_uri(cfg.output)):
        problems.append("--explain needs --engine torch and a local --output folder")
    if cfg.batch_size < 1 or cfg.rows_per_part < 1:
        problems.append("--batch-size and --rows-per-part must be at least 1")
    if (cfg.actors is not None and cfg.actors < 1) or (cfg.cpus_per_actor is not None and cfg.cpus_per_actor <= 0) \
            or (cfg.threads_per_actor is not None and cfg.threads_per_actor < 1):
        problems.append("--actors, --cpus-per-actor and --threads-per-actor must be positive")
    if cfg.max_actors is not None and cfg.max_actors < (cfg.actors or 1):
        problems.append(f"--max-actors ({cfg.max_actors}) must be at least --actors ({cfg.actors or 1})")
    if cfg.output and not storage.is_uri(cfg.output) and os.path.exists(cfg.output) and not os.path.isdir(cfg.output):
        problems.append(f"--output {cfg.output} is a file, not a folder")
    if cfg.review_threshold is not None and not 0 <= cfg.review_threshold <= 1:
        problems.append(f"--review-threshold must be in [0, 1], got {cfg.review_threshold}")
    if cfg.max_file_bytes <= 0:
        problems.append(f"--max-file-bytes must be positive, got {cfg.max_file_bytes}")
    if cfg.decode not in runtime.DECODE_WHERE:
        problems.append(f"--decode must be one of {', '.join(runtime.DECODE_WHERE)}, got {cfg.decode!r}")
    if problems:
        raise ValueError("; ".join(problems))
    # FileNotFoundError (e.g. "run `leukray export` first"); ValueError for a truncated or pickled file
    read_model_meta(cfg.model, "torch" if cfg.engine == AUTO else cfg.engine)
    check_output_folder(cfg.output, cfg.overwrite)  # a file, or Parquet files leukray did not write
    if cfg.gpu and cfg.engine.startswith("onnx"):
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError("--gpu --engine onnx needs onnxruntime-gpu (no CUDAExecutionProvider)")


def score(cfg: ScoreConfig, ray_cfg: RayConfig | None = None, log=print) -> dict:
    """`leukray score`: check the flags and the output folder, list the input (never entering
    the output or its explanations), drop rows to redo, score every image file, summarize."""
    if not cfg.input or not cfg.output:
        raise ValueError("score needs --input and --output")
    check_score_config(cfg)
    t0 = time.perf_counter()
    own = os.path.abspath(cfg.output).rstrip("/")
    inputs: Inputs = list_inputs(cfg.input, exclude=(own, own + "_explanations"))
    if not inputs.items and not inputs.errors:
        raise ValueError(f"--input {cfg.input}: no image files found")
    kept = {"retried": 0, "stale": 0, "missing": 0}
    if not cfg.overwrite:
        kept = reconcile(cfg.output, inputs, cfg.drop_missing, log)
    items = [{**it, "max_bytes": cfg.max_file_bytes} for it in inputs.items]
    listed = time.perf_counter() - t0
    stats = score_paths(items, cfg, ray_cfg, log, errors=inputs.errors)
    if stats["startup"]:
        stats["startup"] = {"listing_s": listed, **stats["startup"]}
    stats.update(skipped_non_images=len(inputs.skipped), skipped=inputs.skipped, folded=inputs.folded, **kept)
    log(format_summary(stats))
    return stats


def format_summary(stats: dict) -> str:
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(stats["errors"].items())) or "none"
    lines = [
        f"[leukray] {stats['total']} input files: scored {stats['scored']} now in {stats['seconds']:.1f}s "
        f"({stats['images_per_s']:.0f} img/s), {stats['already_scored']} already scored; errors: {errors}",
        f"[leukray] predictions: {stats['output']}",
    ]
    if stats.get("startup"):
        lines.insert(1, format_startup(stats["startup"]))
    if stats.get("not_assessable") or stats.get("needs_review"):
        lines.insert(1, f"[leukray] not assessable (no predicted_label, see quality_flags): "
                        f"{stats.get('not_assessable', 0)}; needs review (low confidence): "
                        f"{stats.get('needs_review', 0)}")
    if stats.get("folded"):
        lines.append(f"[leukray] folded {stats['folded']} duplicate paths of the list (each file scored once)")
    if stats.get("retried"):
        lines.append(f"[leukray] retried {stats['retried']} earlier error rows (unreadable then)")
    if stats.get("missing"):
        lines.append(f"[leukray] {stats['missing']} earlier rows are of files that no longer exist")
    skipped = stats.get("skipped") or []
    if skipped:
        lines.append(f"[leukray] skipped {len(skipped)} non-image files, e.g. {skipped[:3]}")
    return "\n".join(lines)


def format_startup(startup: dict) -> str:
    """One line: where the time before the first results went, and the rate after them
    (what a larger archive would see; the overall rate includes the fixed start-up)."""
    parts = [f"listing the input {startup['listing_s']:.1f}s"] if "listing_s" in startup else []
    parts += [f"model and output folder {startup['checks_s']:.1f}s", f"Ray {startup['ray_s']:.1f}s",
              f"dataset {startup['dataset_s']:.1f}s", f"first batch {startup['first_results_s']:.1f}s"]
    return (f"[leukray] before the first results: {', '.join(parts)}; after them "
            f"{startup['images_per_s_after']:.0f} img/s")
