"""The one progress helper: a tqdm bar on a terminal, plain periodic lines elsewhere.

A carriage-return bar is right for a person at a terminal and wrong in a CI log or
`ray job logs`, where every redraw becomes a line (or one endless line). So the driver
draws a tqdm bar only when stderr is a terminal, and otherwise prints a `[leukray]` line
every LINE_EVERY_S seconds or LINE_EVERY_FRACTION of the total, whichever comes first.

Inside a Ray worker (the training loop of rank 0) stdout reaches the user through Ray's
log forwarding, line by line: there the bar is Ray's `tqdm_ray`, which the driver redraws
as a real bar, and only when the driver said it runs on a terminal (BARS_ENV, set by
`runtime.init_ray` before an embedded Ray starts, so its workers inherit it).

Quiet vs verbose (VERBOSE_ENV, the CLI's `--verbose`) is also decided here, one home for
both output concepts; `runtime.init_ray` applies it to Ray's own logging.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

VERBOSE_ENV = "LEUKRAY_VERBOSE"
BARS_ENV = "LEUKRAY_PROGRESS_BARS"
LINE_EVERY_S = 10.0
LINE_EVERY_FRACTION = 0.1


def verbose() -> bool:
    """`--verbose` or LEUKRAY_VERBOSE=1: show Ray's own logs too."""
    return os.environ.get(VERBOSE_ENV, "").lower() not in ("", "0", "false", "no")


def on_terminal() -> bool:
    """Whether this process draws bars: stderr is a terminal (set BARS_ENV=0/1 to force)."""
    forced = os.environ.get(BARS_ENV)
    if forced is not None:
        return forced == "1"
    return sys.stderr.isatty()


class Lines:
    """The non-terminal form: `[leukray] DESC: n/total (p%), rate, ETA, errors`, now and then."""

    def __init__(self, total: int, desc: str, unit: str):
        self.total, self.desc, self.unit, self.n, self.errors = max(0, total), desc, unit, 0, 0
        self.t0 = self.last_t = time.perf_counter()
        self.last_n = 0

    def update(self, n: int = 1, errors: int | None = None) -> None:
        self.n += n
        if errors is not None:
            self.errors = errors
        now = time.perf_counter()
        step = max(1, int(self.total * LINE_EVERY_FRACTION))
        if now - self.last_t >= LINE_EVERY_S or self.n - self.last_n >= step:
            self._print(now)

    def close(self) -> None:
        if self.n != self.last_n or self.n == 0:
            self._print(time.perf_counter())

    def _print(self, now: float) -> None:
        self.last_t, self.last_n = now, self.n
        rate = self.n / max(now - self.t0, 1e-9)
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = f", ETA {(self.total - self.n) / rate:.0f}s" if rate and self.total > self.n else ""
        errs = f", {self.errors} error(s)" if self.errors else ""
        print(f"[leukray] {self.desc}: {self.n}/{self.total} {self.unit}{pct}, {rate:.1f} {self.unit}/s{eta}{errs}",
              flush=True)


class Bar:
    """The terminal form, a tqdm bar (or Ray's tqdm_ray in a worker) with the same interface."""

    def __init__(self, total: int, desc: str, unit: str, in_worker: bool):
        if in_worker:
            from ray.experimental.tqdm_ray import tqdm

            self.bar = tqdm(total=total, desc=f"[leukray] {desc}", unit=unit)
        else:
            from tqdm import tqdm

            # The terminal's width from stdout: stderr may be leukray.stderrfilter's pipe.
            self.bar = tqdm(total=total, desc=f"[leukray] {desc}", unit=unit,
                            ncols=shutil.get_terminal_size((100, 24)).columns)
        self.errors = 0

    def update(self, n: int = 1, errors: int | None = None) -> None:
        if errors is not None and errors != self.errors and hasattr(self.bar, "set_postfix"):
            self.errors = errors
            self.bar.set_postfix(errors=errors, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def progress(total: int, desc: str, unit: str = "img", in_worker: bool = False) -> Bar | Lines:
    """A progress reporter for `total` units; call `.update(n, errors=...)` then `.close()`.

    `in_worker`: called inside a Ray task or actor, whose output Ray forwards line by line.
    """
    if on_terminal():
        return Bar(total, desc, unit, in_worker)
    return Lines(total, desc, unit)
