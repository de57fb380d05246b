"""Session 13's measurement of where a scoring job's fixed start goes, as a command (README,
Benchmarks, session 13). Prints its raw runs and medians; nothing is written.

    python benchmarks/probes_s13.py actor-start [--reps 5]
    python benchmarks/probes_s13.py exit [--reps 5]

In one embedded Ray on this machine's CPUs, interleaved, each case starting two actors of
0.75 CPU (what `leukray score`'s default plan starts on 2 CPUs):
- `plain Ray actor`: seconds from `.remote()` until its constructor runs;
- `plain Ray actor + DataContext argument`: the same with Ray Data's context as an argument,
  which makes the new worker import Ray Data (and pandas, pydantic) before the constructor;
- `Ray Data actor pool, empty UDF`: `map_batches(UDF, compute=ActorPoolStrategy(size=2))` over
  64 rows, seconds from the start of iteration until the UDF's constructor runs, and to the end;
- `leukray scoring job, 2,769 files`: `score_paths`' first results and the rate after them,
  and the machine's busy share (/proc/stat) over the job's first second.
`exit` runs the whole `leukray score` command (a fresh process, `python -m leukray.cli`) on the
2,769 files and times it, and the seconds from its last console line to the process's end.
The model and data are `leukray benchmark`'s (random weights: speed does not depend on them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from leukray import runtime  # noqa: E402
from leukray.benchmark import DEFAULT_DATA, _bench_models  # noqa: E402
from leukray.config import ScoreConfig  # noqa: E402
from leukray.data import list_labeled_images  # noqa: E402
from leukray.infer import score_paths  # noqa: E402
from probes_s12 import _cpu_ticks  # noqa: E402

ACTOR_CPUS = 0.75


class _Stamped:
    """An actor (or Ray Data UDF) that records when its constructor ran."""

    def __init__(self, context=None):
        self.born = time.time()

    def born_at(self) -> float:
        return self.born

    def __call__(self, batch: dict) -> dict:
        batch["born"] = [self.born] * len(batch["x"])
        return batch


def _plain_actors(with_context: bool) -> float:
    import ray
    import ray.data

    cls = ray.remote(num_cpus=ACTOR_CPUS)(_Stamped)
    arg = ray.data.DataContext.get_current() if with_context else None
    t0 = time.time()
    actors = [cls.remote(arg) for _ in range(2)]
    born = ray.get([a.born_at.remote() for a in actors])
    for a in actors:
        ray.kill(a)
    return max(born) - t0


def _data_pool() -> tuple[float, float]:
    import ray

    t0 = time.time()
    ds = ray.data.from_items([{"x": i} for i in range(64)], override_num_blocks=4).map_batches(
        _Stamped, compute=ray.data.ActorPoolStrategy(size=2), num_cpus=ACTOR_CPUS, batch_size=None)
    born = [b for batch in ds.iter_batches(batch_size=None, batch_format="numpy") for b in batch["born"]]
    return max(born) - t0, time.time() - t0


def _scoring_job(model: str, items: list[dict], out: Path) -> tuple[float, float, float]:
    """(first results s, img/s after them, busy share of the machine over the first second)."""
    ticks = []

    def first_second():
        ticks.append(_cpu_ticks())
        time.sleep(1.0)
        ticks.append(_cpu_ticks())

    sampler = threading.Thread(target=first_second)
    sampler.start()
    r = score_paths(items, ScoreConfig(model=model, output=str(out), overwrite=True), log=lambda *_: None)
    sampler.join()
    (a_all, a_idle), (b_all, b_idle) = ticks
    return r["startup"]["first_results_s"], r["startup"]["images_per_s_after"], 1 - (b_idle - a_idle) / (b_all - a_all)


def actor_start(reps: int) -> None:
    listing = list_labeled_images(str(DEFAULT_DATA))
    paths = [r["path"] for r in listing.records]
    model, _ = _bench_models(listing.classes, 128, paths)
    items = [{"path": p} for p in paths]
    tmp = Path(tempfile.mkdtemp(prefix="leukray-probe-"))
    runtime.init_ray()
    _plain_actors(True)  # the first actors of a fresh Ray find its prestarted workers: not a later job's case
    runs: dict[str, list] = {}
    for rep in range(reps):
        cases = {
            "plain Ray actor": lambda: _plain_actors(False),
            "plain Ray actor + DataContext argument": lambda: _plain_actors(True),
            "Ray Data actor pool, empty UDF": _data_pool,
            f"leukray scoring job, {len(paths):,} files": lambda: _scoring_job(str(model), items, tmp / f"o{rep}"),
        }
        for name, case in cases.items():
            value = case()
            runs.setdefault(name, []).append(value)
            shown = ", ".join(f"{v:.2f}" for v in value) if isinstance(value, tuple) else f"{value:.2f}"
            print(f"rep {rep} {name}: {shown}", flush=True)
    print()
    print("medians (s until both constructors ran; pool: and to the end; scoring job: first results s, "
          "img/s after, busy share of the first second)")
    for name, values in runs.items():
        if isinstance(values[0], tuple):
            shown = ", ".join(f"{statistics.median(v[i] for v in values):.2f}" for i in range(len(values[0])))
        else:
            shown = f"{statistics.median(values):.2f}"
        print(f"  {name}: {shown}")
    print(f"machine: {os.cpu_count()} CPUs")


def command_exit(reps: int) -> None:
    import subprocess

    listing = list_labeled_images(str(DEFAULT_DATA))
    model, _ = _bench_models(listing.classes, 128, [r["path"] for r in listing.records])
    out = Path(tempfile.mkdtemp(prefix="leukray-probe-")) / "scores"
    cmd = [sys.executable, "-m", "leukray.cli", "score", "--model", str(model), "--input", str(DEFAULT_DATA),
           "--output", str(out), "--overwrite"]
    runs = []
    for rep in range(reps):
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        last = t0
        for _ in proc.stdout:
            last = time.perf_counter()
        if proc.wait() != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode})")
        end = time.perf_counter()
        runs.append((end - t0, end - last))
        print(f"rep {rep}: whole command {end - t0:.2f} s, last line to exit {end - last:.2f} s", flush=True)
    print(f"medians: whole command {statistics.median(r[0] for r in runs):.2f} s, "
          f"last line to exit {statistics.median(r[1] for r in runs):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=["actor-start", "exit"])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    {"actor-start": actor_start, "exit": command_exit}[args.probe](args.reps)


if __name__ == "__main__":
    main()
