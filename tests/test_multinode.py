"""Several nodes on this machine (tests/multinode.py): where Train workers and scoring actors
land, a path some node cannot see refused, and the loss of a node survived.

Each test leaves the cluster with two 2-CPU worker nodes for the next; the recovery times are
printed (`pytest -s`) for the README's "On several nodes".
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from leukray.synthetic import draw_smear
from jobwatch import registered_checkpoints, wait_for
from multinode import MultiNodeCluster

pytestmark = pytest.mark.slow

# Half a CPU per worker: after a node loss both workers fit on the surviving 2-CPU node with a
# CPU left for Ray Data to rebuild the lost dataset blocks (with 1 CPU each, observed: stuck).
TRAIN = ["--workers", "2", "--cpus-per-worker", "0.5", "--image-size", "48", "--group-size", "4", "--batch-size", "32"]


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


@pytest.fixture
def lossy_cluster(cluster):
    """The module's cluster, for a test that kills a node: made whole again afterwards, pass
    or fail, so that the next test, or a rerun of this one, starts with two worker nodes."""
    yield cluster
    _replace_lost(cluster)


@pytest.fixture(scope="module")
def mn_run(cluster, synth_data, tmp_path_factory):
    """A 2-worker training run on the cluster, and the node each Train worker ran on."""
    tmp = tmp_path_factory.mktemp("mnrun")
    run, log = tmp / "run", tmp / "train.log"
    proc = cluster.leukray("train", "--data", str(synth_data), "--output", str(run), "--epochs", "2", *TRAIN, log=log)
    assert proc.wait(timeout=400) == 0, log.read_text()[-3000:]
    return {"run": run, "log": log.read_text(), "worker_nodes": cluster.actor_nodes("RayTrainWorker")}


def _smears(folder: Path, n: int, distinct: int | None = None) -> Path:
    """`n` smear JPEGs; past `distinct` of them, hard links to the first ones (a long job
    without the time to draw every image: scoring reads each path as its own file)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    distinct = n if distinct is None else distinct
    for i in range(n):
        if i < distinct:
            Image.fromarray(draw_smear(i % 4, rng, 64)).save(folder / f"{i:05d}.jpg")
        else:
            os.link(folder / f"{i % distinct:05d}.jpg", folder / f"{i:05d}.jpg")
    return folder


def _resume(pids: list[int]) -> None:
    """SIGCONT each of `pids` that still exists."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


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
    src = _smears(tmp_path / "in", 800)
    out, log = tmp_path / "out", tmp_path / "score.log"
    before = set(cluster.actor_nodes("MapWorker"))
    proc = cluster.leukray("score", "--model", str(mn_run["run"]), "--input", str(src), "--output", str(out),
                           "--actors", "4", "--cpus-per-actor", "0.5", "--batch-size", "16", log=log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    actors = {a: n for a, n in cluster.actor_nodes("MapWorker").items() if a not in before}
    assert len(set(actors.values()) & _workers(cluster)) >= 2, actors
    df = pd.read_parquet(out)
    assert len(df) == 800 and df["path"].is_unique and df["error"].isna().all()
    assert set(df["path"]) == {str(p) for p in src.glob("*.jpg")}


def test_path_some_node_cannot_see_is_refused(cluster, synth_data, tmp_path):
    """A node whose view of a folder is its own local disk (a tmpfs over it, in its own mount
    namespace): training into that folder is refused before any work starts."""
    local = tmp_path / "local-only"
    local.mkdir()
    cluster.add_worker("wmask", cpus=1, mask=str(local))
    try:
        run, log = local / "run", tmp_path / "train.log"
        proc = cluster.leukray("train", "--data", str(synth_data), "--output", str(run), "--epochs", "1", *TRAIN,
                               log=log)
        assert proc.wait(timeout=300) != 0
        text = log.read_text()
        assert f"--output {run} is not visible on 1 of the 4 nodes of the Ray cluster" in text, text[-3000:]
        assert "NFS" in text and not (run / "model.pt").exists()
        assert not list(run.glob(".leukray-shared-check-*"))  # the marker is cleaned up
        # what score would check (the model its actors load): a read path, existence only
        (local / "model.pt").write_bytes(b"not a real model")
        check = (f"import ray; from leukray import runtime; ray.init(address={cluster.address!r}); "
                 f"runtime.check_shared_paths(read={{'--model': {str(local / 'model.pt')!r}}})")
        proc = subprocess.run([sys.executable, "-c", check], env=cluster.env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode != 0 and f"--model {local / 'model.pt'} is not visible on 1 of the 4 nodes" \
            in proc.stderr, proc.stderr[-3000:]
    finally:
        cluster.kill_node("wmask")


def test_a_node_that_joins_mid_scoring_gets_actors(cluster, mn_run, tmp_path):
    """With --max-actors above --actors, the pool grows onto a node that joins mid-job. Actors
    of 1.5 CPU: one per 2-CPU node, so the third can only start on the new (4-CPU) node. Ray
    Data grows a busy pool only, and a node's `ray start` here took up to 26 s: once the first
    part is written the test stops the two actors' processes (SIGSTOP) until the new node has
    an actor, so the job cannot end first however fast the host (the 32,000 files of the torch
    engine did, in 19 s, in session 13's CI; 8,000 earlier)."""
    src = _smears(tmp_path / "in", 32000, distinct=8000)
    out, log = tmp_path / "out", tmp_path / "score.log"
    before = set(cluster.actor_nodes("MapWorker"))
    proc = cluster.leukray("score", "--model", str(mn_run["run"]), "--input", str(src), "--output", str(out),
                           "--engine", "torch", "--actors", "2", "--max-actors", "3", "--cpus-per-actor", "1.5",
                           "--batch-size", "16", "--rows-per-part", "64", log=log)
    name = f"wjoin{len(cluster.nodes)}"
    new_actors = lambda: {a: n for a, n in cluster.actor_nodes("MapWorker").items() if a not in before}  # noqa: E731
    paused = []
    try:
        wait_for(lambda: any(out.glob("part-*.parquet")), timeout=300, what="first part", proc=proc, log=log)
        alive = lambda: [a["pid"] for a in cluster.state("actors")  # noqa: E731
                         if "MapWorker" in a["class_name"] and a["state"] == "ALIVE" and a["actor_id"] not in before]
        wait_for(lambda: len(alive()) == 2, timeout=120, what="both actors alive", every=1, proc=proc, log=log)
        paused = alive()  # the pool does not wait for its actors: the second may start after the first part
        assert len(paused) == 2, paused
        for pid in paused:
            os.kill(pid, signal.SIGSTOP)
        assert proc.poll() is None, "the job ended before its actors were paused:\n" + log.read_text()[-3000:]
        t_join = time.time()
        joined = cluster.add_worker(name, cpus=4).node_id
        wait_for(lambda: joined in new_actors().values(), timeout=300, what="an actor on the new node", every=2,
                 proc=proc, log=log)
        t_actor = time.time()
        _resume(paused)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        _resume(paused)
        if proc.poll() is None:
            proc.kill()
        if name in cluster.nodes:
            cluster.kill_node(name)  # back to two worker nodes for the next test
    assert "model: 2 actor(s) (up to 3 as nodes join)" in log.read_text()
    df = pd.read_parquet(out)
    assert len(df) == 32000 and df["path"].is_unique and df["error"].isna().all()
    print(f"\n[multinode] scoring: a node joined mid-job; an actor was running there {t_actor - t_join:.1f}s after "
          f"its `ray start` began")


def test_scoring_survives_the_loss_of_a_worker_node(lossy_cluster, mn_run, tmp_path):
    """4 actors of 0.4 CPU, each decoding its own batches (the CPU plan): all four restart on
    the surviving 2-CPU node and redo the batches lost with the node from the driver's lists
    of paths. (With `--decode tasks` and 0.5 CPU each they took 2.0 of 2.0 CPUs and the decode
    tasks that rebuild the lost blocks never started: README, "On several nodes".)"""
    cluster = lossy_cluster
    src = _smears(tmp_path / "in", 2400)  # long enough that the kill lands mid-job
    out, log = tmp_path / "out", tmp_path / "score.log"
    before_actors = set(cluster.actor_nodes("MapWorker"))
    proc = cluster.leukray("score", "--model", str(mn_run["run"]), "--input", str(src), "--output", str(out),
                           "--actors", "4", "--cpus-per-actor", "0.4", "--batch-size", "16", "--rows-per-part", "32",
                           log=log)
    parts = lambda: {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}  # noqa: E731
    try:
        wait_for(lambda: len(parts()) >= 1, timeout=300, what="first part", proc=proc, log=log)
        alive = [n for a, n in cluster.actor_nodes("MapWorker").items() if a not in before_actors and n]
        victim = cluster.node_name(max(set(alive) & _workers(cluster), key=alive.count))
        written = parts()
        t_kill = cluster.kill_node(victim)
        wait_for(lambda: len(parts()) > len(written) + 2, timeout=300, what="progress after the kill", proc=proc, log=log)
        t_progress = time.time()
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
        t_done = time.time()
    finally:
        if proc.poll() is None:
            proc.kill()
    df = pd.read_parquet(out)
    assert len(df) == 2400 and df["path"].is_unique and df["error"].isna().all()
    after = parts()
    assert all(after.get(name) == mtime for name, mtime in written.items())  # parts before the loss kept as they were
    print(f"\n[multinode] scoring: node {victim} killed with {len(written)} of {len(after)} parts written; "
          f"3 more parts (surviving actors) {t_progress - t_kill:.1f}s after the kill, "
          f"all done {t_done - t_kill:.1f}s after it")


EPOCHS = 6


def test_training_survives_the_loss_of_a_train_workers_node(lossy_cluster, synth_data, tmp_path):
    cluster = lossy_cluster
    run, log = tmp_path / "run", tmp_path / "train.log"
    before = set(cluster.actor_nodes("RayTrainWorker"))
    proc = cluster.leukray("train", "--data", str(synth_data), "--output", str(run), "--epochs", str(EPOCHS),
                           "--max-failures", "1", *TRAIN, log=log)
    try:
        wait_for(lambda: registered_checkpoints(run) >= 1, timeout=300, what="first registered checkpoint", proc=proc, log=log)
        running = {a: n for a, n in cluster.actor_nodes("RayTrainWorker").items() if a not in before}
        victim_id = sorted(set(running.values()) & _workers(cluster))[0]  # SPREAD: one worker per node
        victim = cluster.node_name(victim_id)
        t_kill = cluster.kill_node(victim)
        wait_for(lambda: "resumed from checkpoint after epoch" in log.read_text(), timeout=300, what="resume", proc=proc, log=log)
        t_resumed = time.time()
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
        t_done = time.time()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    workers = {a: n for a, n in cluster.actor_nodes("RayTrainWorker").items() if a not in before}
    assert victim_id in workers.values() and len(workers) >= 4, workers  # a worker ran there; then a new group of 2
    assert set(workers.values()) - {victim_id} <= _workers(cluster)  # the new group: surviving nodes
    resumed_after = int(text.split("resumed from checkpoint after epoch ")[1].split()[0])
    assert resumed_after >= 1
    # Ray Train re-runs, by design, the epochs after the last registered checkpoint; none before
    for epoch in range(1, resumed_after + 1):
        assert text.count(f"[leukray] epoch {epoch}/{EPOCHS} ") == 1, epoch
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    assert (run / "model.pt").is_file() and json.loads((run / "metrics.json").read_text())["n"] > 0
    print(f"\n[multinode] training: node {victim} killed; resumed from the checkpoint after epoch {resumed_after} "
          f"{t_resumed - t_kill:.1f}s after the kill, finished {t_done - t_kill:.1f}s after it")
