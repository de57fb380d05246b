"""Connecting to Ray and sizing resource requests to the cluster.

On a 2-CPU machine, training workers or inference actors that each hold a whole CPU
leave Ray Data's read tasks none and the job hangs without a word. Every request leukray
makes goes through the helpers here, which leave room for reads.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

from leukray import progress
from leukray.config import RayConfig, ScoreConfig
from leukray.storage import is_uri

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train V2 echoes every print() of a worker through its logger too: print once.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# ...and would log each ray.train.report at INFO; leukray prints its own epoch lines.
os.environ.setdefault("RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING", "0")

# Quiet (the default), set before Ray starts so every process of an embedded cluster
# inherits it: Ray Data's loggers (its hints about progress UIs, "execution finished") only
# at ERROR; and Ray Train's own DataConfig sets a deprecated Ray Data option in its
# DatasetManager actor (leukray never does), a RayDeprecationWarning per run. A message
# filter: PYTHONWARNINGS needs no import of ray at interpreter start. Likewise torch's
# warning when Ray Data turns its own read-only Arrow buffers into tensors (leukray's batches
# are copied before any in-place write: `train._batches`, `recipe.augment`).
EXCLUDE_RESOURCES_WARNING = "`ExecutionOptions.exclude_resources` is deprecated"
READ_ONLY_ARRAY_WARNING = "The given NumPy array is not writable"
QUIET_ENV = {"RAY_DATA_LOG_LEVEL": "ERROR",
             "PYTHONWARNINGS": f"ignore:{EXCLUDE_RESOURCES_WARNING},ignore:{READ_ONLY_ARRAY_WARNING}"}
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def ray_log_level() -> str:
    """Level of Ray's Python loggers (and Ray Train's `LoggingConfig`): WARNING when quiet."""
    return "INFO" if progress.verbose() else "WARNING"


def _quiet_env(local: bool) -> None:
    """The environment of the Ray processes this driver starts (embedded Ray only: joined
    clusters keep theirs). On one machine there is no node to preempt: Ray Train's
    PreemptionWatcher actor only logs a core_worker.cc error at creation (ray#53727)."""
    if local:
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        os.environ[progress.BARS_ENV] = "1" if progress.on_terminal() else "0"
    if not progress.verbose():
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
        for message in (EXCLUDE_RESOURCES_WARNING, READ_ONLY_ARRAY_WARNING):
            warnings.filterwarnings("ignore", message=message)
        # A new local cluster turns token authentication on, and says so at WARNING each time.
        logging.getLogger(AUTH_LOGGER).setLevel(logging.ERROR)


def init_ray(cfg: RayConfig | None = None, dashboard: bool = True) -> None:
    """Start an embedded Ray (address None), or connect ("auto", "ray://...", host:port).

    Inside `ray job submit` the job sets RAY_ADDRESS and `ray.init()` joins that cluster.
    `dashboard`: an embedded Ray starts its dashboard (on loopback). Training needs it: it
    serves the state API that Ray Train's controller polls. Scoring does not, and starting it
    took ~3 s of every embedded `score` (a cluster that lives as long as the command).
    """
    import ray

    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return
    level = getattr(logging, ray_log_level())
    # Workers' output (leukray's epoch lines, tracebacks) reaches the user. Ray's loggers in
    # the driver and in every worker of this job (Ray Train's "Checkpoint successfully
    # created", its controller's INFO lines) at `level`.
    kwargs: dict = {"logging_level": level, "log_to_driver": True,
                    "logging_config": ray.LoggingConfig(log_level=ray_log_level())}
    # "local" starts a new embedded Ray even when a `ray start` head runs on this machine
    # (plain `ray.init()` would silently join it).
    address = cfg.address or os.environ.get("RAY_ADDRESS") or "local"
    _quiet_env(address == "local")
    if address == "local":
        cpus = cfg.num_cpus or os.cpu_count()
        # Ray keeps at most one idle worker process per CPU and kills the rest soon after;
        # decode tasks of DECODE_TASK_CPUS run more processes than CPUs, so between two
        # batches their workers were killed and restarted (a Python start-up and the imports
        # each time). Keep one idle worker per decode-task slot.
        kwargs.update(num_cpus=cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                      _system_config={"num_workers_soft_limit": int(cpus / DECODE_TASK_CPUS)})
    ray.init(address=address, **kwargs)
    if address == "local":
        # Runs before Ray's own exit hook (registered when Ray is imported); once is enough.
        atexit.unregister(stop_monitor)
        atexit.register(stop_monitor)
    _configure_data(level)


def stop_monitor() -> None:
    """Kill the autoscaler monitor of the Ray this process started (no-op otherwise).

    `ray.shutdown()` stops an embedded Ray's processes one after the other, the GCS before
    the monitor, and gives each a second to end on SIGTERM. The monitor's SIGTERM handler
    reports its own death to the GCS, gone by then, so it never ends in time: every
    embedded command waited that full second at exit. Killed first it is skipped (Ray passes
    over processes that already ended); an embedded cluster lives as long as the command and
    has nothing to autoscale. Ray's process table is not public API, hence the guards.
    """
    import ray
    from ray._private import ray_constants

    node = getattr(ray._private.worker, "_global_node", None)
    for info in getattr(node, "all_processes", {}).get(ray_constants.PROCESS_TYPE_MONITOR, []):
        if info.process.poll() is None:
            info.process.kill()
            try:  # bounded, as Ray bounds its own (a process stuck in the kernel outlives SIGKILL)
                info.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def shutdown_ray() -> None:
    """`ray.shutdown()` without the monitor's second (`stop_monitor`); nothing, not even
    importing Ray, when this process has no Ray up (a command that never needed one)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    stop_monitor()
    ray.shutdown()


def _configure_data(level: int) -> None:
    """Ray Data: no bars of its own (leukray draws one per stage, `leukray.progress`), no
    plan printed at each execution, its loggers at `level`; --verbose restores all three."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress.verbose()
    ctx.enable_operator_progress_bars = False  # per-operator bars flood a terminal or CI log
    ctx.print_on_execution_start = progress.verbose()
    # Blocks come out in input order: with the seeds, the same command trains on the same
    # sequence of batches, so a rerun reproduces its metrics.
    ctx.execution_options.preserve_order = True
    # Ray Data logs every dataset execution at INFO, and hints about its progress UI at WARNING.
    logging.getLogger("ray.data").setLevel(level if progress.verbose() else logging.ERROR)
    _refresh_data_limits_sooner()


# Seconds between two reads of the cluster's resources by Ray Data's executor (Ray: 1 s).
DATA_LIMITS_REFRESH_S = 0.2


def _refresh_data_limits_sooner() -> None:
    """Ray Data 2.60 learns what it may use from its autoscaling coordinator actor, asked
    asynchronously (ray-project/ray#62725): the first answer is not back at the executor's
    first read, so each execution starts with limits of zero, under which Ray Data still runs
    one task, and reads them again only a second later. Every task stage (training ingest,
    `--decode tasks`, the GPU plan's decode) ran one task at a time for its first second,
    whatever the cluster's size (README, Benchmarks, session 11). Actor pools start their
    actors at once and were not held back. A class attribute of Ray's, hence the guard."""
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager
    except ImportError:
        return
    if getattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S", 0) > DATA_LIMITS_REFRESH_S:
        ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = DATA_LIMITS_REFRESH_S


# Seconds Ray Data's executor waits in `ray.wait` for its tasks (Ray: 0.1 s), while a stage
# of tasks runs (`prompt_task_stages`).
DATA_TASK_WAIT_S = 0.02
_TASK_WAIT_ATTR = "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S"


@contextmanager
def prompt_task_stages():
    """While a Ray Data execution that has a stage of tasks runs in this process, its executor
    learns sooner that a task ended.

    Ray Data hands Ray a task only when its budget has room, so a task stage runs as many
    tasks as fit and no more. The executor learns which ended from one `ray.wait` for all its
    running tasks with a 0.1 s timeout (ray-project/ray#45934, #42377): with two or more
    running, a task that ended held its slot until every other one had output ready or the
    timeout passed, whatever the task's size. Actor pools keep tasks queued at each actor and
    do not wait on it, and the shorter wait costs the driver CPU while it waits, so only
    executions with a task stage get it (README, Benchmarks, session 12). A module constant of
    Ray's, hence the guard; restored on the way out.
    """
    try:
        from ray.data._internal.execution import streaming_executor_state as state
    except ImportError:
        state = None
    old = getattr(state, _TASK_WAIT_ATTR, None)
    if old is not None:
        setattr(state, _TASK_WAIT_ATTR, min(old, DATA_TASK_WAIT_S))
    try:
        yield
    finally:
        if old is not None:
            setattr(state, _TASK_WAIT_ATTR, old)


@dataclass
class ClusterCPUs:
    """What the cluster has: CPUs (total and on the largest node), GPUs, nodes."""

    total: float
    per_node_max: float
    gpus: float = 0.0
    nodes: int = 1

    @classmethod
    def current(cls) -> "ClusterCPUs":
        import ray

        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        cpus = [r.get("CPU", 0.0) for r in nodes]
        return cls(total=sum(cpus) or 1.0, per_node_max=max(cpus) if cpus else 1.0,
                   gpus=sum(r.get("GPU", 0.0) for r in nodes), nodes=max(1, len(nodes)))


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


# --------------------------------------------------------------------------- scoring

# Where `leukray score` decodes (`--decode`). On CPU-only clusters inside the model actors:
# each actor reads, decodes and scores its own batches, so no image crosses the object
# store and there is one process per CPU, busy all the time; faster than two stages on 2
# cores (benchmarks/results/scaling.json: "ray, default plan" against "ray, decode tasks +
# actors"). When actors hold GPUs, decoding is a separate stage of CPU tasks fanned out over
# the cluster, and the GPU actors never decode.
DECODE_AUTO, DECODE_IN_ACTORS, DECODE_AS_TASKS = "auto", "actors", "tasks"
DECODE_WHERE = (DECODE_AUTO, DECODE_IN_ACTORS, DECODE_AS_TASKS)
# Logical CPUs of one decode task and of one CPU scoring actor beside decode tasks. The
# reservations are tokens for Ray Data's budget, not the cores a process may use: actors
# holding three quarters each left the decode stage a budget of one task on 2 CPUs while
# the cores stood partly idle, so beside decode tasks an actor reserves little more than a
# task. The OS shares the cores between the stages and Ray Data's backpressure keeps
# whichever is ahead from running away. The two must still differ: Ray Data fuses a task
# stage into the actor stage after it when their resources match (then the actors would
# decode after all).
DECODE_TASK_CPUS = 0.25
CPU_ACTOR_CPUS_BESIDE_DECODE = 0.3
# An actor that decodes too is busy all the time; three quarters leave room on every CPU
# for Ray's own tasks (the shared-path probe, Ray Data's bookkeeping).
CPU_ACTOR_CPUS = 0.75
# A GPU actor only moves batches to the device; a whole CPU and two threads are plenty.
GPU_ACTOR_CPUS = 1.0
GPU_ACTOR_THREADS = 2
# Rows of one Ray task (a block), apart from the model's batch (`--batch-size`, what one
# model call sees; the predictor splits a task's rows into such batches). Every task costs
# the driver's Ray Data executor the same bookkeeping whatever its size, CPU taken from the
# actors on a small machine: 512-row tasks halved the driver's CPU time against one-batch
# tasks (the `scale` row of `leukray benchmark` records it as driver_cpu_s). Tasks stay small
# enough that every slot (actor or decode task) gets several, so that the first results come
# soon, the last ones do not wait on one slow slot, and a node that joins mid-job finds work.
TASKS_PER_SLOT = 8
MAX_TASK_ROWS = 512


@dataclass
class ScoringPlan:
    """The stages of `leukray score`: decode tasks (unless the actors decode) and the model's
    actor pool."""

    actors: int
    cpus_per_actor: float
    threads_per_actor: int
    gpus_per_actor: float
    decode_cpus: float  # logical CPUs per decode task
    decode_tasks: int  # how many fit beside the actors at once, over the whole cluster (0: the actors decode)
    max_actors: int = 0  # > actors: the pool may grow to this as nodes join (0: fixed size)
    rows_per_task: int = 64  # rows of one Ray task (block); model calls take --batch-size of them

    @property
    def decode_in_actors(self) -> bool:
        """The actors read and decode their own batches: there is no decode stage."""
        return self.decode_tasks == 0

    def describe(self) -> str:
        device = f"{self.gpus_per_actor:g} GPU + " if self.gpus_per_actor else ""
        grow = f" (up to {self.max_actors} as nodes join)" if self.max_actors > self.actors else ""
        actors = (f"{self.actors} actor(s){grow} x {device}{self.cpus_per_actor:g} CPU, "
                  f"{self.threads_per_actor} thread(s) each")
        tasks = f"; {self.rows_per_task} files per task"
        if self.decode_in_actors:
            return f"decode + model: {actors}, each decoding its own batches{tasks}"
        return f"decode: up to {self.decode_tasks} task(s) x {self.decode_cpus:g} CPU; model: {actors}{tasks}"

    def blocks(self, files: int) -> int:
        """How many blocks (Ray tasks per stage) `files` rows make: none above rows_per_task."""
        return max(1, -(-files // self.rows_per_task))


def scoring_plan(cfg: ScoreConfig, cluster: ClusterCPUs, files: int) -> ScoringPlan:
    """Size the stages from the cluster; --actors/--cpus-per-actor/--threads-per-actor win.

    CPU: one single-threaded actor per CPU (never more than there are batches), decoding its
    own batches unless `--decode tasks`. GPU: one actor per GPU, which never decodes unless
    `--decode actors`. Decode tasks get the CPUs the actors leave. Tasks hold
    `rows_per_task` files: TASKS_PER_SLOT per slot, between one batch and MAX_TASK_ROWS.
    """
    in_actors = cfg.decode == DECODE_IN_ACTORS or (cfg.decode == DECODE_AUTO and not cfg.gpu)
    batches = max(1, -(-files // cfg.batch_size))
    if cfg.gpu:
        actors = cfg.actors or max(1, int(cluster.gpus))
        cpus = cfg.cpus_per_actor or GPU_ACTOR_CPUS
        threads = cfg.threads_per_actor or GPU_ACTOR_THREADS
    else:
        actors = cfg.actors or max(1, int(cluster.total))
        cpus = cfg.cpus_per_actor or (CPU_ACTOR_CPUS if in_actors else CPU_ACTOR_CPUS_BESIDE_DECODE)
        threads = cfg.threads_per_actor or 1
    actors = max(1, min(actors, batches))
    # Decoding is single-threaded CPU work: more decode processes than CPUs only add worker
    # start-ups (on a 16-core H200 machine 60 decode workers made the first 5 s of a 2,000-file
    # job score 126 images), so the stage gets the CPUs the actors leave, one task per CPU at most.
    room = max(1, min(int((cluster.total - actors * cpus) // DECODE_TASK_CPUS), int(cluster.total)))
    # A pool that may grow (nodes joining) lets decode grow in proportion: the new nodes' CPUs
    # would otherwise sit behind the decode stage's cap.
    max_actors = max(actors, min(cfg.max_actors or 0, batches))
    if max_actors > actors:
        room = -(-room * max_actors // actors)
    decode_tasks = 0 if in_actors else room
    slots = max(max_actors, decode_tasks)
    rows = min(max(-(-files // (slots * TASKS_PER_SLOT)), cfg.batch_size), max(MAX_TASK_ROWS, cfg.batch_size))
    return ScoringPlan(actors=actors, cpus_per_actor=cpus, threads_per_actor=threads,
                       gpus_per_actor=1.0 if cfg.gpu else 0.0, decode_cpus=DECODE_TASK_CPUS,
                       decode_tasks=decode_tasks, max_actors=max_actors if max_actors > actors else 0,
                       rows_per_task=rows)


# --------------------------------------------------------------------------- several nodes

SHARED_CHECK_TIMEOUT_S = 120.0
SHARED_CHECK_MARKER = ".leukray-shared-check-"


def _probe_paths(read: list[str], marker: str | None) -> list[str]:
    """Runs on one node: the paths of `read`, and `marker` (a file the driver just wrote),
    that this node cannot see."""
    missing = [p for p in read if not os.path.exists(p)]
    return missing + ([marker] if marker and not os.path.isfile(marker) else [])


def check_shared_paths(read: dict[str, str] | None = None, write: dict[str, str] | None = None) -> None:
    """Refuse, before any work starts, a path that some node of a multi-node cluster cannot see.

    On one node every path is shared. On several, a local folder (/tmp, a home directory, a
    disk of the driver's machine) exists on one machine only, and the failure would come late
    and far away: a Train worker's checkpoint upload or an actor's model load on another node,
    minutes in. A zero-CPU task pinned to each alive node stats the paths there. `read` paths
    (data, model) need only exist there (a copy on each node's disk is fine for reading);
    `write` folders (run directory) get a marker file with a fresh name, so a same-named local
    folder on another node does not pass for the shared one. URIs (s3://...) are skipped.
    `{flag: path}`: the flag names the option in the message.
    """
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive")}
    local = {flag: os.path.abspath(p) for flag, p in {**(read or {}), **(write or {})}.items() if p and not is_uri(p)}
    if len(nodes) < 2 or not local:
        return
    markers = {}
    for flag, path in (write or {}).items():
        if flag in local:
            os.makedirs(local[flag], exist_ok=True)
            markers[flag] = os.path.join(local[flag], SHARED_CHECK_MARKER + uuid.uuid4().hex)
            open(markers[flag], "w").close()
    try:
        probe = ray.remote(num_cpus=0, max_retries=0)(_probe_paths)
        refs = {node: [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
                    [local[f]] if f not in markers else [], markers.get(f)) for f in local] for node in nodes}
        ready, _ = ray.wait([r for rs in refs.values() for r in rs], num_returns=len(nodes) * len(local),
                            timeout=SHARED_CHECK_TIMEOUT_S)
        _refuse_unseen(local, nodes, refs, set(ready))
    finally:
        for m in markers.values():
            os.remove(m)


def _node_cannot_see(ref) -> bool:
    """The probe's answer; a node that died since `ray.nodes()` listed it (its task can no
    longer be scheduled there, or its worker went with it) runs no work either: not refused."""
    import ray

    try:
        return bool(ray.get(ref))
    except (ray.exceptions.TaskUnschedulableError, ray.exceptions.NodeDiedError, ray.exceptions.WorkerCrashedError):
        return False


def _refuse_unseen(local: dict[str, str], nodes: dict[str, str], refs: dict, ready: set) -> None:
    """Raise ValueError naming each path and the nodes that do not see it; a node that did not
    answer in time is reported, not refused (it may be busy starting)."""
    flags = list(local)
    blind: dict[str, list[str]] = {}
    for node, node_refs in refs.items():
        for flag, ref in zip(flags, node_refs):
            if ref not in ready:
                print(f"[leukray] node {node[:8]} ({nodes[node]}) did not answer the shared-path check in "
                      f"{SHARED_CHECK_TIMEOUT_S:.0f}s; {flag} not checked there", flush=True)
            elif _node_cannot_see(ref):
                blind.setdefault(flag, []).append(f"{node[:8]} ({nodes[node]})")
    if blind:
        raise ValueError("; ".join(
            f"{flag} {local[flag]} is not visible on {len(ids)} of the {len(nodes)} nodes of the Ray cluster "
            f"(node {', '.join(ids)})" for flag, ids in blind.items())
            + ". On several nodes, data, model and run directory must be on storage every node mounts at the "
              "same path (NFS/EFS/...), or (run directory, output) a URI such as s3://bucket/path")
