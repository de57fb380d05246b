"""A real local cluster: `ray start --head` on loopback, `ray job submit` of the train job."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local_head(tmp_path_factory):
    """A 2-CPU head on 127.0.0.1 with its own ports and temp dir; stopped afterwards."""
    port, dash, agent = _free_port(), _free_port(), _free_port()
    # Token authentication on, as a production head should run; the token lives in this
    # test's own HOME (~/.ray/auth_token), shared by `ray start` and `ray job submit`.
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "HOME": str(home)}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], check=True, env=env, capture_output=True, timeout=60)
    temp_dir = tempfile.mkdtemp(prefix="lkray-", dir="/tmp")  # short: Ray's socket paths live under it
    subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--temp-dir={temp_dir}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
         # another Ray on this machine (the test session's own) holds the default agent port
         f"--dashboard-agent-listen-port={agent}", "--disable-usage-stats"],
        check=True, env=env, capture_output=True, text=True, timeout=180,
    )
    try:
        yield {"gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        _stop_head(temp_dir)


def _stop_head(temp_dir: str) -> None:
    """Stop this head's processes only. `ray stop` would also kill every other Ray on the
    machine, the test session's own embedded one included."""
    import psutil

    from multinode import stop_processes

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if temp_dir in " ".join(p.info["cmdline"] or []):
                procs.append(p)
        except psutil.Error:
            pass
    stop_processes(procs)


def _ray(local_head, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the `ray` CLI; a job submitted before the head's job agent is up is retried."""
    for _ in range(30):
        proc = subprocess.run([str(BIN / "ray"), *args], env=local_head["env"], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)
        if "No available agent" not in proc.stdout + proc.stderr:
            return proc
        time.sleep(2)
    return proc


def test_ray_job_submit_trains_then_scores_on_a_local_head(local_head, synth_data, tmp_path):
    out = tmp_path / "run"
    proc = _ray(local_head, "job", "submit", "--address", local_head["dashboard"], "--working-dir", str(ROOT),
                "--", sys.executable, "jobs/train.py", "--data", str(synth_data), "--output", str(out),
                "--epochs", "1", "--workers", "2", "--image-size", "48", "--group-size", "4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] > 0 and (out / "model.pt").is_file()

    # the score job, submitted without waiting, with a runtime env; then status and logs
    preds = tmp_path / "preds"
    runtime_env = json.dumps({"env_vars": {"LEUKRAY_JOB_TAG": "ci-score"}})
    sub = _ray(local_head, "job", "submit", "--address", local_head["dashboard"], "--working-dir", str(ROOT),
               "--runtime-env-json", runtime_env, "--no-wait", "--", sys.executable, "jobs/score.py",
               "--model", str(out), "--input", str(synth_data), "--output", str(preds))
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job_id = next(w.strip("'") for w in sub.stdout.split() if w.strip("'").startswith("raysubmit_"))
    deadline = time.time() + 300
    while time.time() < deadline:
        status = _ray(local_head, "job", "status", "--address", local_head["dashboard"], job_id).stdout.lower()
        if any(word in status for word in ("succeeded", "failed", "stopped")):
            break
        time.sleep(2)
    assert "succeeded" in status, status
    logs = _ray(local_head, "job", "logs", "--address", local_head["dashboard"], job_id).stdout
    assert "predictions:" in logs
    import pandas as pd

    assert len(pd.read_parquet(preds)) == len(list(Path(synth_data).rglob("*.jpg")))
