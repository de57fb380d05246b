"""Scoring against S3-compatible storage: a moto S3 server on loopback, inputs listed and
read from s3://, Parquet parts written to s3://, resume and --overwrite on S3.

No S3 settings are passed in code or URIs: `leukray score` runs with the standard AWS
environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION and
AWS_ENDPOINT_URL, which pyarrow's `FileSystem.from_uri` honours). It runs in a subprocess
because the Ray workers of this test session were started before those variables existed.
"""

import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from leukray.synthetic import draw_smear

pytest.importorskip("moto.server", reason="needs moto[server] (dev extra)")

pytestmark = pytest.mark.slow  # a moto server and leukray subprocesses, each with its own Ray

BUCKET = "bucket"
KEY_ID, SECRET, REGION = "testing-key", "testing-secret", "us-east-1"  # dummies; moto accepts any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    try:
        with opener.open(url, timeout=1) as r:
            return r.status < 500
    except OSError:
        return False


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """A moto S3 server on 127.0.0.1:<free port>, for this module only."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while not _answers(f"{endpoint}/moto-api/"):
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited ({proc.returncode}): {log.read_text()[-2000:]}")
            if time.time() > deadline:
                raise TimeoutError(f"moto_server did not answer on {endpoint} within 30 s")
            time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _s3fs(endpoint: str, **kw):
    import pyarrow.fs

    return pyarrow.fs.S3FileSystem(access_key=KEY_ID, secret_key=SECRET, region=REGION, scheme="http",
                                   endpoint_override=endpoint.split("://", 1)[1], connect_timeout=5,
                                   request_timeout=30, **kw)


def _env(endpoint: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "AWS_PROFILE", "AWS_SESSION_TOKEN") and "proxy" not in k.lower()}
    env.update(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION=REGION,
               AWS_ENDPOINT_URL=endpoint, AWS_EC2_METADATA_DISABLED="true", RAY_USAGE_STATS_ENABLED="0")
    return env


def _leukray_score(model: str, endpoint: str, *extra: str, timeout: float = 180) -> str:
    cmd = [sys.executable, "-m", "leukray.cli", "score", "--model", model, "--input", f"s3://{BUCKET}/in",
           "--output", f"s3://{BUCKET}/out", "--num-cpus", "2", *extra]
    proc = subprocess.Popen(cmd, env=_env(endpoint), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its embedded Ray
        out, _ = proc.communicate()
        raise AssertionError(f"leukray score timed out:\n{out[-3000:]}") from None
    assert proc.returncode == 0, out[-3000:]
    return out


def test_score_reads_and_writes_s3(trained_run, s3_endpoint):
    import pyarrow as pa
    import pyarrow.fs
    import pyarrow.parquet as pq

    fs = _s3fs(s3_endpoint, allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    rng = np.random.default_rng(3)
    for i in range(12):
        buf = io.BytesIO()
        Image.fromarray(draw_smear(i % 4, rng, 64)).save(buf, "JPEG")
        with fs.open_output_stream(f"{BUCKET}/in/cells/{i:02d}.jpg") as f:
            f.write(buf.getvalue())
    with fs.open_output_stream(f"{BUCKET}/in/corrupt.jpg") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # a truncated JPEG
    with fs.open_output_stream(f"{BUCKET}/in/notes.txt") as f:
        f.write(b"not an image: listed as skipped, no row")

    def rows() -> pa.Table:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{BUCKET}/out", allow_not_found=True))
        names = sorted(i.path for i in infos if i.is_file)
        assert names and all(n.rsplit("/", 1)[1].startswith("part-") and n.endswith(".parquet") for n in names), names
        return pa.concat_tables([pq.read_table(n, filesystem=fs) for n in names])

    model = trained_run["run_dir"]
    log = _leukray_score(model, s3_endpoint)
    t = rows().to_pandas()
    expected = sorted([f"s3://{BUCKET}/in/cells/{i:02d}.jpg" for i in range(12)] + [f"s3://{BUCKET}/in/corrupt.jpg"])
    assert sorted(t["path"]) == expected, log[-2000:]
    assert t["path"].is_unique and t["member"].isna().all()
    corrupt = t["path"] == f"s3://{BUCKET}/in/corrupt.jpg"
    assert t.loc[corrupt, "error"].iloc[0].startswith("corrupt or truncated")
    assert t.loc[~corrupt, "error"].isna().all(), t.loc[~corrupt, "error"].tolist()
    good = t[t["error"].isna()]
    probs = good[[c for c in t.columns if c.startswith("prob_")]]
    assert len(probs.columns) == 4 and np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert good["sha256"].str.len().eq(64).all() and good["width"].eq(64).all()
    assert "skipped 1 non-image files" in log

    # Resume on S3: everything is already scored, nothing is appended twice.
    log = _leukray_score(model, s3_endpoint)
    assert "13 already scored" in log, log[-2000:]
    again = rows().to_pandas()
    assert len(again) == 13 and sorted(again["path"]) == expected

    # --overwrite starts over: still exactly one row per image file.
    log = _leukray_score(model, s3_endpoint, "--overwrite")
    t = rows().to_pandas()
    assert len(t) == 13 and sorted(t["path"]) == expected, log[-2000:]
    assert not [i.path for i in fs.get_file_info(pyarrow.fs.FileSelector(f"{BUCKET}/out"))
                if "/.tmp-" in i.path], "temporary parts are moved into place"


def _leukray(args: list[str], endpoint: str, tmpdir, timeout: float = 300) -> tuple[int, str]:
    """Run `leukray ARGS` with the S3 settings in its environment and its own folder of local
    working copies (a fresh one per call stands for another machine)."""
    env = {**_env(endpoint), "LEUKRAY_RUN_CACHE": str(tmpdir)}
    proc = subprocess.Popen([sys.executable, "-m", "leukray.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"leukray {args[0]} timed out:\n{out[-3000:]}") from None
    return proc.returncode, out


def test_training_run_directory_on_s3(synth_data, s3_endpoint, tmp_path):
    """`train --output s3://...`: checkpoints, model and metrics land on S3; a re-run from
    another working copy resumes from the S3 checkpoint; `score --model s3://...` uses it."""
    import json

    import pyarrow.fs
    import pyarrow.parquet as pq

    fs = _s3fs(s3_endpoint, allow_bucket_creation=True)
    fs.create_dir("runs-bucket")
    key = f"runs-bucket/leukray/{tmp_path.name}"  # its own per attempt: a rerun must not resume the last one
    run = f"s3://{key}"
    train = ["train", "--data", str(synth_data), "--output", run, "--image-size", "64", "--group-size", "4",
             "--batch-size", "32", "--num-cpus", "2"]

    rc, log = _leukray(train + ["--epochs", "2"], s3_endpoint, tmp_path / "machine-a")
    assert rc == 0, log[-3000:]
    infos = fs.get_file_info(pyarrow.fs.FileSelector(key, recursive=True))
    files = {i.path.split(f"{tmp_path.name}/", 1)[1] for i in infos if i.type == pyarrow.fs.FileType.File}
    for name in ("config.json", "split.csv", "model.pt", "history.json", "metrics.json", "timings.json"):
        assert name in files, sorted(files)
    assert any(f.startswith("predictions/test/part-") and f.endswith(".parquet") for f in files), sorted(files)
    checkpoints = sorted(f for f in files if f.startswith("ray/train/checkpoint_") and f.endswith("/checkpoint.pt"))
    assert checkpoints, sorted(files)
    with fs.open_input_stream(f"{key}/metrics.json") as f:
        metrics = json.loads(f.read())
    test_rows = pq.read_table(f"{key}/predictions/test", filesystem=fs).num_rows
    assert metrics["n"] == test_rows > 0

    # Same run, another machine (empty TMPDIR), more epochs: resumes from the S3 checkpoint.
    rc, log = _leukray(train + ["--epochs", "3"], s3_endpoint, tmp_path / "machine-b")
    assert rc == 0, log[-3000:]
    assert "resumed from checkpoint after epoch 2" in log, log[-3000:]
    with fs.open_input_stream(f"{key}/history.json") as f:
        assert [h["epoch"] for h in json.loads(f.read())] == [1, 2, 3]

    # The run's config travels with it: another network in the same run is refused.
    rc, log = _leukray(train + ["--arch", "resnet18"], s3_endpoint, tmp_path / "machine-c", timeout=120)
    assert rc == 2 and "holds a run with train.arch='leuknet'" in log, log[-3000:]

    # Scoring reads the model straight from the run directory on S3.
    rc, log = _leukray(["score", "--model", run, "--input", str(synth_data), "--output", str(tmp_path / "scores"),
                        "--num-cpus", "2"], s3_endpoint, tmp_path / "machine-d")
    assert rc == 0, log[-3000:]
    scored = pq.read_table(tmp_path / "scores").to_pandas()
    assert len(scored) == 120 and scored["error"].isna().all()
    with fs.open_input_stream(f"{key}/model.pt") as f:
        meta = torch.load(io.BytesIO(f.read()), weights_only=True)["meta"]
    assert (scored["model_id"] == meta["model_id"]).all() and meta["best_epoch"] >= 1
