"""Session 12's one-off measurements that need no patched code, as commands (README,
Benchmarks, session 12). Each prints its raw runs and medians; nothing is written.

    python benchmarks/probes_s12.py task-wait [--reps 3] [--files 20000]
        the default CPU plan (an actor pool) with Ray Data's task wait and with the short one
        of `runtime.prompt_task_stages`, interleaved: img/s and driver CPU seconds
    python benchmarks/probes_s12.py busy [--reps 3]
        the default plan and `--decode tasks` on the 2,769 files, interleaved: seconds, the
        machine's busy share (/proc/stat), first results and the rate after them

Both start an embedded Ray on this machine's CPUs and use `leukray benchmark`'s random-weight
model and data (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leukray import runtime  # noqa: E402
from leukray.benchmark import DEFAULT_DATA, _bench_models, symlinked_archive  # noqa: E402
from leukray.config import ScoreConfig  # noqa: E402
from leukray.data import list_labeled_images  # noqa: E402
from leukray.infer import score, score_paths  # noqa: E402


def _cpu_ticks() -> tuple[int, int]:
    """(all, idle + iowait) jiffies of the machine since boot."""
    fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    return sum(fields), fields[3] + fields[4]


def task_wait(model: str, paths: list[str], reps: int, files: int) -> None:
    from ray.data._internal.execution import streaming_executor_state as state

    tmp = Path(tempfile.mkdtemp(prefix="leukray-probe-"))
    src = symlinked_archive(sorted(paths), files, tmp)
    ray_wait = state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S
    runs: dict[str, list[tuple[float, float]]] = {"Ray's wait": [], "short wait": []}
    for _ in range(reps):
        for name, wait in (("Ray's wait", ray_wait), ("short wait", runtime.DATA_TASK_WAIT_S)):
            state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S = wait
            t0, c0 = time.perf_counter(), time.process_time()
            score(ScoreConfig(model=model, input=str(src), output=str(tmp / "out"), overwrite=True),
                  log=lambda *_: None)
            rate, cpu = files / (time.perf_counter() - t0), time.process_time() - c0
            runs[name].append((rate, cpu))
            print(f"{name} ({wait} s): {rate:.0f} img/s, driver CPU {cpu:.2f} s", flush=True)
    state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S = ray_wait
    for name, values in runs.items():
        print(f"median, {name}: {statistics.median(r for r, _ in values):.0f} img/s, "
              f"driver CPU {statistics.median(c for _, c in values):.2f} s")


def busy(model: str, paths: list[str], reps: int) -> None:
    items = [{"path": p} for p in paths]
    tmp = Path(tempfile.mkdtemp(prefix="leukray-probe-"))
    for rep in range(reps):
        for decode in ("auto", "tasks"):
            t0, (all0, idle0) = time.perf_counter(), _cpu_ticks()
            stats = score_paths(items, ScoreConfig(model=model, output=str(tmp / f"{rep}-{decode}"), overwrite=True,
                                                   decode=decode), log=lambda *_: None)
            seconds, (all1, idle1) = time.perf_counter() - t0, _cpu_ticks()
            start = stats["startup"]
            print(f"--decode {decode}: {seconds:.2f} s, busy {1 - (idle1 - idle0) / (all1 - all0):.0%}, "
                  f"first results {start['first_results_s']:.2f} s, then {start['images_per_s_after']:.0f} img/s",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=["task-wait", "busy"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--files", type=int, default=20000, help="task-wait: files in the archive")
    args = parser.parse_args()
    listing = list_labeled_images(str(DEFAULT_DATA))
    paths = [r["path"] for r in listing.records]
    model, _ = _bench_models(listing.classes, 128, paths)
    runtime.init_ray()
    if args.probe == "task-wait":
        task_wait(str(model), paths, args.reps, args.files)
    else:
        busy(str(model), paths, args.reps)


if __name__ == "__main__":
    main()
