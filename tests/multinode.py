"""A Ray cluster of several nodes on this machine, for the multi-node and node-loss tests.

Each node is its own `ray start` (a head with 0 CPUs, workers with their own logical CPUs),
on loopback, with token authentication as in production, its own ports and its own
`--temp-dir` (one log monitor per node would otherwise tail one shared session folder and
print every line once per node). Ray's own multi-node tests work the same way
(`ray.cluster_utils.Cluster`); the `ray start` CLI is used here because it is what the README
tells users to run.

A node is killed the way a machine dies: its raylet and every process under it at once
(SIGKILL), found through its temp dir, never by name. Teardown stops only this cluster's
processes and asserts none is left.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
OBJECT_STORE_BYTES = 256 * 2**20  # per node: the tests move small images only
START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def signal_all(procs: list, method: str) -> None:
    """`p.terminate()` or `p.kill()` on each process; one that is already gone is fine."""
    for p in procs:
        try:
            getattr(p, method)()
        except psutil.Error:
            pass


def stop_processes(procs: list, grace_s: float = 20) -> None:
    """SIGTERM, then SIGKILL whatever is still alive after `grace_s`."""
    signal_all(procs, "terminate")
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    signal_all(alive, "kill")
    psutil.wait_procs(alive, timeout=grace_s)


@dataclass
class Node:
    name: str
    temp_dir: str
    node_id: str = ""
    cpus: int = 0


@dataclass
class MultiNodeCluster:
    """Start with `start_head()`, then `add_worker()` per node; `shutdown()` at the end."""

    root: Path
    nodes: dict[str, Node] = field(default_factory=dict)
    seen_pids: dict[int, float] = field(default_factory=dict)  # pid -> create_time, for the teardown check

    def __post_init__(self) -> None:
        home = self.root / "home"
        home.mkdir(parents=True, exist_ok=True)
        # The token lives in this cluster's own HOME (~/.ray/auth_token), shared by every
        # `ray start`, the leukray drivers and the state queries below (README: RAY_AUTH_MODE).
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "HOME": str(home),
                    "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            self.env.pop(var, None)
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], check=True, env=self.env,
                       capture_output=True, timeout=60)
        # short: Ray's socket paths live under it
        self.tmp = tempfile.mkdtemp(prefix="lkmn-", dir="/tmp")
        self.port, self.dash = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dash}"

    # ------------------------------------------------------------------ nodes

    def _ray_start(self, node: Node, args: list[str], mask: str | None) -> None:
        cmd = [str(BIN / "ray"), "start", "--node-ip-address=127.0.0.1", f"--temp-dir={node.temp_dir}",
               f"--num-cpus={node.cpus}", f"--object-store-memory={OBJECT_STORE_BYTES}",
               f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
               "--disable-usage-stats", *args]
        if mask:  # this node sees an empty folder at `mask`: a local disk, not the shared one
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f'mount -t tmpfs tmpfs "{mask}" && exec "$@"', "sh", *cmd]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=START_TIMEOUT_S)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    def start_head(self) -> Node:
        """A head with 0 CPUs: drivers, the Train controller and the Ray Data coordinator live
        here (they are pinned to the driver's node), no training worker or scoring actor does."""
        head = Node("head", os.path.join(self.tmp, "head"))
        self._ray_start(head, ["--head", f"--port={self.port}", "--dashboard-host=127.0.0.1",
                               f"--dashboard-port={self.dash}"], None)
        self.nodes["head"] = head
        head.node_id = self._new_node_ids(set(), 1)[0]
        return head

    def add_worker(self, name: str, cpus: int = 2, mask: str | None = None) -> Node:
        node = Node(name, os.path.join(self.tmp, name), cpus=cpus)
        before = set(self.alive_node_ids())
        self._ray_start(node, [f"--address={self.address}"], mask)
        self.nodes[name] = node
        node.node_id = self._new_node_ids(before, 1)[0]
        return node

    def _new_node_ids(self, before: set[str], count: int) -> list[str]:
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline:
            new = [n for n in self.alive_node_ids() if n not in before]
            if len(new) >= count:
                return new
            time.sleep(1)
        raise TimeoutError("node did not register with the GCS")

    def alive_node_ids(self) -> list[str]:
        return [n["node_id"] for n in self.state("nodes") if n["state"] == "ALIVE"]

    def node_name(self, node_id: str) -> str:
        return next(n.name for n in self.nodes.values() if n.node_id == node_id)

    def processes(self, node: Node) -> list[psutil.Process]:
        """The node's processes: those that name its temp dir, and everything under them
        (worker processes rename themselves `ray::...` and no longer show the temp dir)."""
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["cmdline"]):
            try:
                if node.temp_dir in " ".join(p.info["cmdline"] or []):
                    found[p.pid] = p
                    for c in p.children(recursive=True):
                        found[c.pid] = c
            except psutil.Error:
                pass
        for p in found.values():
            try:
                self.seen_pids[p.pid] = p.create_time()
            except psutil.Error:
                pass
        return list(found.values())

    def kill_node(self, name: str) -> float:
        """SIGKILL the node's raylet and every process of the node at once; returns the time."""
        node = self.nodes.pop(name)
        procs = self.processes(node)
        assert any("raylet" in " ".join(p.cmdline()) for p in procs), "found the node's raylet"
        t = time.time()
        signal_all(procs, "kill")
        psutil.wait_procs(procs, timeout=30)
        return t

    # ------------------------------------------------------------------ state

    def state(self, kind: str) -> list[dict]:
        """`ray list <kind>` as dicts (dead actors included: where they ran stays recorded)."""
        proc = subprocess.run([str(BIN / "ray"), "list", kind, "--address", self.dashboard, "--format", "json",
                               "--detail", "--limit", "10000"], env=self.env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        text = proc.stdout.strip()  # "No resource in the cluster" when there is none
        return json.loads(text) if text.startswith("[") else []

    def actor_nodes(self, marker: str) -> dict[str, str]:
        """actor id -> node id, for actors whose class name contains `marker`."""
        return {a["actor_id"]: a["node_id"] for a in self.state("actors") if marker in a["class_name"]}

    def leukray(self, *args: str, log: Path) -> subprocess.Popen:
        """A leukray driver on this cluster (it connects to the head: Ray prefers the head
        among the nodes of one host)."""
        return subprocess.Popen([sys.executable, "-m", "leukray.cli", *args, "--address", self.address],
                                env=self.env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    # ------------------------------------------------------------------ teardown

    def shutdown(self) -> list[str]:
        """Stop this cluster's processes only (`ray stop` would stop every Ray on the machine);
        returns those still alive afterwards (the fixture asserts there are none)."""
        stop_processes([p for node in self.nodes.values() for p in self.processes(node)])
        return self.leftovers()

    def leftovers(self) -> list[str]:
        """Processes of this cluster still running: any naming one of its temp dirs, and any
        pid seen as one of its processes that still has the same start time."""
        left = []
        for p in psutil.process_iter(["cmdline", "create_time"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                if self.tmp in cmd or self.seen_pids.get(p.pid) == p.info["create_time"]:
                    if p.status() != psutil.STATUS_ZOMBIE:
                        left.append(f"{p.pid} {cmd[:120]}")
            except psutil.Error:
                pass
        return left
