"""Watching a `leukray` job run in a subprocess (fault and node-loss tests): wait for what it
writes, and fail at once, with the end of its log, when it exits first."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path


def wait_for(cond, timeout: float = 240, what: str = "condition", every: float = 0.2,
             proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll `cond` until true; a TimeoutError after `timeout`, and an AssertionError at once
    when `proc` (the job being watched) has exited without it; `log`'s end in both messages."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None and not cond():
            raise AssertionError(f"{what}: the job exited ({proc.returncode}) first\n{_tail(log)}")
        time.sleep(every)
    raise TimeoutError(f"{what} (not within {timeout:.0f}s)\n{_tail(log)}")


def _tail(log: Path | None) -> str:
    return log.read_text(errors="replace")[-3000:] if log and log.exists() else ""


def registered_checkpoints(run: Path) -> int:
    """Checkpoints the Ray Train controller has registered (only those are restored on a retry)."""
    try:
        snapshot = json.loads((run / "ray" / "train" / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return 0
    return len(snapshot.get("checkpoint_results", []))
