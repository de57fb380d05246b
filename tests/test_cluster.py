"""A real local cluster: `ray start --head` on loopback, `ray job submit` of the train job."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local_head(tmp_path_factory):
    """A 2-CPU head on 127.0.0.1 with its own ports and temp dir; stopped afterwards."""
    port, dash = _free_port(), _free_port()
    # Token authentication on, as a production head should run; the token lives in this
    # test's own HOME (~/.ray/auth_token), shared by `ray start` and `ray job submit`.
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "HOME": str(home)}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], check=True, env=env, capture_output=True, timeout=60)
    subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats"],
        check=True, env=env, capture_output=True, text=True, timeout=180,
    )
    try:
        yield {"gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ray_job_submit_trains_on_a_local_head(local_head, synth_data, tmp_path):
    out = tmp_path / "run"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", local_head["dashboard"], "--working-dir", str(ROOT),
           "--", sys.executable, "jobs/train.py", "--data", str(synth_data), "--output", str(out),
           "--epochs", "1", "--workers", "2", "--image-size", "48", "--group-size", "4"]
    t0 = time.time()
    proc = subprocess.run(cmd, env=local_head["env"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] > 0 and (out / "model.pt").is_file()
    print(f"job took {time.time() - t0:.0f}s")
