"""Connecting to Ray and sizing resource requests to the cluster.

On a 2-CPU machine, training workers or inference actors that each hold a whole CPU
leave Ray Data's read tasks none and the job hangs without a word. Every request leukray
makes goes through the helpers here, which leave room for reads.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from leukray.config import RayConfig

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train V2 echoes every print() of a worker through its logger too: print once.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# ...and would log each ray.train.report at INFO; leukray prints its own epoch lines.
os.environ.setdefault("RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING", "0")


def init_ray(cfg: RayConfig | None = None) -> None:
    """Start an embedded Ray (address None), or connect ("auto", "ray://...", host:port).

    Inside `ray job submit` the job sets RAY_ADDRESS and `ray.init()` joins that cluster.
    """
    import ray

    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return
    kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
    # "local" starts a new embedded Ray even when a `ray start` head runs on this machine
    # (plain `ray.init()` would silently join it).
    address = cfg.address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        # The dashboard serves the state API that Ray Train's controller polls; keep it on
        # loopback only.
        kwargs.update(num_cpus=cfg.num_cpus or os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1")
    ray.init(address=address, **kwargs)
    from ray.data import DataContext

    # Ray Data's per-operator progress bars flood a terminal or CI log; keep the global one.
    ctx = DataContext.get_current()
    ctx.enable_operator_progress_bars = False
    # Blocks come out in input order: with the seeds, the same command trains on the same
    # sequence of batches, so a rerun reproduces its metrics.
    ctx.execution_options.preserve_order = True
    # Ray Data logs every dataset execution at INFO; leukray reports its own progress.
    logging.getLogger("ray.data").setLevel(logging.WARNING)


@dataclass
class ClusterCPUs:
    total: float
    per_node_max: float

    @classmethod
    def current(cls) -> "ClusterCPUs":
        import ray

        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cpus = [n.get("Resources", {}).get("CPU", 0.0) for n in nodes]
        return cls(total=sum(cpus) or 1.0, per_node_max=max(cpus) if cpus else 1.0)


def worker_cpus(requested: float | None, workers: int, cluster: ClusterCPUs) -> float:
    """CPUs per training worker: whole CPUs when there are plenty, else a fraction that
    leaves one CPU of the cluster for Ray Data tasks."""
    if requested is not None:
        return requested
    spare = max(cluster.total - 1.0, 0.5)
    return round(max(0.1, min(1.0, spare / workers)), 2)


def torch_threads(requested: int | None, workers_per_node: int, cluster: ClusterCPUs) -> int:
    """Ray sets one intra-op thread per worker; give each worker its share of a node's cores."""
    if requested:
        return requested
    return max(1, int(cluster.per_node_max // max(1, workers_per_node)))
