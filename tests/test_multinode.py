"""Several nodes on this machine (tests/multinode.py): where Train workers and scoring actors
land, a path some node cannot see refused, and the loss of a node survived.

Each test leaves the cluster with two 2-CPU worker nodes for the next; the recovery times are
printed (`pytest -s`) for the README's "On several nodes".
"""

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from leukray.synthetic import draw_smear
from multinode import MultiNodeCluster, wait_for

pytestmark = pytest.mark.slow

TRAIN = ["--workers", "2", "--cpus-per-worker", "1", "--image-size", "48", "--group-size", "4", "--batch-size", "32"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = MultiNodeCluster(tmp_path_factory.mktemp("multinode"))
    try:
        c.start_head()
        c.add_worker("w1")
        c.add_worker("w2")
        yield c
    finally:
        left = c.shutdown()
        assert not left, f"Ray processes of the test cluster left behind: {left}"


def _workers(cluster: MultiNodeCluster) -> set[str]:
    return {n.node_id for name, n in cluster.nodes.items() if name != "head"}


def _replace_lost(cluster: MultiNodeCluster, keep: int = 2) -> None:
    """Back to `keep` worker nodes for the next test (a killed one gets a fresh successor)."""
    i = len(cluster.nodes) + 10
    while len(_workers(cluster)) < keep:
        cluster.add_worker(f"w{i}")
        i += 1


@pytest.fixture(scope="module")
def mn_run(cluster, synth_data, tmp_path_factory):
    """A 2-worker training run on the cluster, and the node each Train worker ran on."""
    tmp = tmp_path_factory.mktemp("mnrun")
    run, log = tmp / "run", tmp / "train.log"
    proc = cluster.leukray("train", "--data", str(synth_data), "--output", str(run), "--epochs", "2", *TRAIN, log=log)
    assert proc.wait(timeout=400) == 0, log.read_text()[-3000:]
    return {"run": run, "log": log.read_text(), "worker_nodes": cluster.actor_nodes("RayTrainWorker")}


def _smears(folder: Path, n: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(draw_smear(i % 4, rng, 64)).save(folder / f"{i:05d}.jpg")
    return folder


def test_training_spreads_two_workers_over_two_nodes(cluster, mn_run):
    nodes = list(mn_run["worker_nodes"].values())
    assert len(nodes) == 2, mn_run["worker_nodes"]
    assert len(set(nodes)) == 2 and set(nodes) <= _workers(cluster), (nodes, cluster.nodes)
    run = mn_run["run"]
    for name in ("model.pt", "metrics.json", "history.json", "split.csv", "config.json"):
        assert (run / name).is_file(), name
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [1, 2]
    assert json.loads((run / "metrics.json").read_text())["n"] > 0
    assert mn_run["log"].count("[leukray] epoch 1/2 ") == 1  # one log monitor per node, each its own temp dir


def test_scoring_runs_actors_on_two_nodes_one_row_per_file(cluster, mn_run, tmp_path):
    src = _smears(tmp_path / "in", 200)
    out, log = tmp_path / "out", tmp_path / "score.log"
    before = set(cluster.actor_nodes("MapWorker"))
    proc = cluster.leukray("score", "--model", str(mn_run["run"]), "--input", str(src), "--output", str(out),
                           "--actors", "4", "--cpus-per-actor", "0.5", "--batch-size", "16", log=log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    actors = {a: n for a, n in cluster.actor_nodes("MapWorker").items() if a not in before}
    assert len(set(actors.values()) & _workers(cluster)) >= 2, actors
    df = pd.read_parquet(out)
    assert len(df) == 200 and df["path"].is_unique and df["error"].isna().all()
    assert set(df["path"]) == {str(p) for p in src.glob("*.jpg")}
