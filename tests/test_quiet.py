"""A quiet tool with progress bars (issue 14): leukray's own lines and progress, not Ray's
chatter; `--verbose` brings Ray's lines back; a worker's error still reaches the user.

The unit tests are fast; the subprocess runs of `leukray` start their own Ray (slow).
"""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from leukray import progress
from leukray.cli import _parser, main

ROOT = Path(__file__).resolve().parents[1]
# Lines that must never reach a user without --verbose (issue 14's list).
FORBIDDEN = ("core_worker.cc", "Checkpoint successfully created", "RayDeprecationWarning", "tqdm is not installed")


# --------------------------------------------------------------------------- progress, unit

def test_lines_are_periodic_plain_lines_without_carriage_returns(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LINE_EVERY_S", 3600.0)  # only the 10 % steps print
    bar = progress.Lines(total=100, desc="scoring", unit="file")
    for _ in range(100):
        bar.update(1, errors=2)
    bar.close()
    out = capsys.readouterr().out
    assert "\r" not in out
    lines = out.splitlines()
    assert len(lines) == 10, lines  # every 10 %, and close() adds nothing new at 100 %
    assert lines[-1].startswith("[leukray] scoring: 100/100 file (100%)") and "2 error(s)" in lines[-1]
    assert "ETA" in lines[0] and "ETA" not in lines[-1]


def test_lines_print_on_time_as_well(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    bar = progress.Lines(total=1000, desc="epoch 1/2", unit="img")
    bar.update(1)
    bar.update(1)
    assert capsys.readouterr().out.count("[leukray] epoch 1/2: ") == 2


def test_progress_is_a_bar_only_on_a_terminal(monkeypatch):
    monkeypatch.delenv(progress.BARS_ENV, raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    assert isinstance(progress.progress(10, "x"), progress.Lines)
    monkeypatch.setenv(progress.BARS_ENV, "1")  # what init_ray passes to workers of a terminal driver
    bar = progress.progress(10, "x")
    assert isinstance(bar, progress.Bar)
    bar.update(3, errors=1)
    bar.close()
    assert "[leukray] x" in sys.stderr.getvalue() and "errors=1" in sys.stderr.getvalue()


@pytest.mark.parametrize("argv", [["--verbose", "synth"], ["synth", "--verbose"], ["synth", "-v"]])
def test_verbose_flag_before_or_after_the_command(argv, monkeypatch, tmp_path):
    monkeypatch.setenv(progress.VERBOSE_ENV, "")  # restored (unset) after the test: main() sets it
    args = argv + ["--output", str(tmp_path / "d"), "--per-class", "1"]
    assert _parser().parse_args(args).verbose is True
    assert main(args) == 0
    assert os.environ[progress.VERBOSE_ENV] == "1" and progress.verbose()


def test_quiet_is_the_default(monkeypatch):
    monkeypatch.delenv(progress.VERBOSE_ENV, raising=False)
    assert _parser().parse_args(["synth", "--output", "x"]).verbose is False
    assert not progress.verbose()
    monkeypatch.setenv(progress.VERBOSE_ENV, "0")
    assert not progress.verbose()


# --------------------------------------------------------------------------- leukray as a user runs it

def _env() -> dict:
    """A user's environment: none of the settings init_ray passes to the Ray it starts."""
    from leukray import runtime

    env = {k: v for k, v in os.environ.items()
           if k not in (progress.VERBOSE_ENV, progress.BARS_ENV, "PYTHONWARNINGS", *runtime.QUIET_ENV)}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _leukray(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`leukray ARGS` with stdout and stderr into one pipe, as in a CI log."""
    return subprocess.run([sys.executable, "-m", "leukray.cli", *args], cwd=ROOT, env=_env(), timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    # 40 per class: the grouped split of the demo needs 7 groups of 5 per class.
    proc = _leukray("demo", "--per-class", "40", "--epochs", "2", "--output", str(out))
    (out / "output.txt").write_text(proc.stdout)  # what a user saw, kept for a failing test
    return out, proc


@pytest.mark.slow
def test_demo_shows_progress_and_no_ray_chatter(demo):
    _, proc = demo
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    for s in FORBIDDEN:  # Ray Train's PreemptionWatcher line is off; Ray Data's actor-pool line filtered
        assert s not in out, f"{s!r} in the demo's output:\n{out}"
    assert "\r" not in out  # a pipe gets plain lines, not a redrawn bar
    for line in ("[leukray] decoding train+val: ", "[leukray] epoch 1/2: ", "[leukray] epoch 2/2: ",
                 "[leukray] scoring: ", "[leukray] demo finished"):
        assert line in out, f"no {line!r} in:\n{out}"
    assert "100%" in out


@pytest.mark.slow
def test_verbose_brings_rays_own_lines_back(demo, tmp_path):
    run, proc = demo
    assert proc.returncode == 0, proc.stdout[-3000:]
    args = ("score", "--model", str(run / "run"), "--input", str(run / "data" / "Pro"), "--output")
    quiet = _leukray(*args, str(tmp_path / "quiet"))
    loud = _leukray("--verbose", *args, str(tmp_path / "loud"))
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stdout[-2000:] + loud.stdout[-2000:]

    def ray_lines(text: str) -> list[str]:
        return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("[leukray]")]

    assert not ray_lines(quiet.stdout), quiet.stdout
    assert ray_lines(loud.stdout), loud.stdout
    assert "has constructor arguments in the object store" in loud.stdout  # --verbose filters nothing
    assert "[leukray] scoring: 40/40 file (100%)" in loud.stdout


@pytest.mark.slow
def test_an_embedded_score_starts_the_dashboard_only_when_asked(demo, tmp_path):
    """It cost every embedded `score` ~3 s of start-up and serves nothing scoring needs;
    `--dashboard` brings it back (Ray's own start line, shown with --verbose, names it)."""
    run, proc = demo
    assert proc.returncode == 0, proc.stdout[-3000:]
    args = ("--verbose", "score", "--model", str(run / "run"), "--input", str(run / "data" / "Pro"), "--output")
    unwatched = _leukray(*args, str(tmp_path / "unwatched"))
    watched = _leukray(*args, str(tmp_path / "watched"), "--dashboard")
    assert unwatched.returncode == 0 and watched.returncode == 0, unwatched.stdout[-2000:] + watched.stdout[-2000:]
    assert "Started a local Ray instance." in unwatched.stdout
    assert "View the dashboard at" not in unwatched.stdout
    assert "View the dashboard at" in watched.stdout


@pytest.mark.slow
def test_an_error_in_a_training_worker_shows_its_message_and_the_logs(tmp_path):
    """A corrupt --weights file is read by the Train worker, not the driver."""
    from leukray.synthetic import make_dataset

    data = make_dataset(str(tmp_path / "data"), per_class=40, size=64, seed=0)
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"not a state dict " * 100)
    proc = _leukray("train", "--data", str(data), "--output", str(tmp_path / "run"), "--weights", str(bad),
                    "--epochs", "1", "--group-size", "5")
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:]
    assert "leukray train: error in a Ray worker: " in out, out[-3000:]
    # the worker's own exception, type and message (the path of the file it could not load)
    assert f"error in a Ray worker: rank 0: ValueError: --weights {bad} does not load" in out, out[-3000:]
    logs = [ln for ln in out.splitlines() if ln.startswith("leukray train: full logs: ")]
    assert logs, out[-3000:]
    assert os.path.isdir(logs[0].split("full logs: ", 1)[1].split(" (")[0])
