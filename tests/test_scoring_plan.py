"""The scoring pipeline scales with the cluster: sizes from its resources, decode fans out."""

import json
import subprocess
import sys
import textwrap

import pytest

from leukray.config import ScoreConfig
from leukray.runtime import ClusterCPUs, scoring_plan


def test_cpu_plan_is_one_decoding_actor_per_cpu():
    plan = scoring_plan(ScoreConfig(), ClusterCPUs(total=16, per_node_max=16), files=64000)
    assert (plan.actors, plan.threads_per_actor, plan.gpus_per_actor) == (16, 1, 0.0)
    assert plan.decode_in_actors and plan.decode_tasks == 0
    assert "each decoding its own batches" in plan.describe()


def test_cpu_plan_with_decode_tasks_leaves_decode_as_many_tasks_as_cpus():
    plan = scoring_plan(ScoreConfig(decode="tasks"), ClusterCPUs(total=16, per_node_max=16), files=64000)
    assert (plan.actors, plan.decode_in_actors, plan.decode_tasks) == (16, False, 16)
    assert plan.decode_cpus != plan.cpus_per_actor, "equal resources would let Ray Data fuse decode into the actors"
    # the actors' reservations leave the decode stage a budget of at least one task per CPU
    assert 16 - 16 * plan.cpus_per_actor >= 16 * plan.decode_cpus


def test_gpu_plan_is_one_actor_per_gpu_and_decode_gets_the_cpus():
    plan = scoring_plan(ScoreConfig(gpu=True), ClusterCPUs(total=32, per_node_max=16, gpus=2, nodes=2), files=64000)
    assert (plan.actors, plan.gpus_per_actor, plan.decode_in_actors) == (2, 1.0, False)
    assert plan.decode_tasks == 32, "one decode task per CPU: more would only add worker start-ups"
    assert plan.decode_tasks * plan.decode_cpus <= 32 - 2 * plan.cpus_per_actor


def test_overrides_win_and_actors_never_exceed_batches():
    cfg = ScoreConfig(actors=3, cpus_per_actor=2.0, threads_per_actor=4)
    plan = scoring_plan(cfg, ClusterCPUs(total=16, per_node_max=16), files=64000)
    assert (plan.actors, plan.cpus_per_actor, plan.threads_per_actor) == (3, 2.0, 4)
    assert scoring_plan(ScoreConfig(), ClusterCPUs(total=16, per_node_max=16), files=128).actors == 2


PROBE = textwrap.dedent("""
    import json, sys, time
    import numpy as np, ray
    from PIL import Image
    from ray.util.state import list_tasks
    from leukray import runtime
    from leukray.config import RayConfig, ScoreConfig
    from leukray.infer import score_paths
    from leukray.model import create_model, save_model

    root, decode, BATCHES = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2 * BATCHES):  # batches of 2: several per CPU
        paths.append(f"{root}/{i:03d}.png")
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(paths[-1])
    save_model(f"{root}/model.pt", create_model("leuknet", 4).eval(), {"arch": "leuknet", "classes":
               ["Benign", "Early", "Pre", "Pro"], "image_size": 32, "mean": [0.8, 0.67, 0.7], "std": [0.12, 0.17, 0.1]})
    runtime.init_ray(RayConfig(num_cpus=16))  # Ray is told 16 CPUs, whatever the machine has
    # Start dispatching once the whole pool is up: 16 actors importing torch on 2 real cores come
    # up over ~15 s, and the first few could drain the 80 small batches alone (it happened once
    # on CI). What is tested is the plan's room for 16 at once, not that start-up race.
    ray.data.DataContext.get_current().wait_for_min_actors_s = 600
    # Decode tasks (the GPU plan's stage, here on CPUs) beside two actors: starting 16 model
    # processes would only slow the test, the decode stage's room comes from the cluster either
    # way. Default CPU plan: one actor per CPU, each decoding its own batches.
    kw = {"decode": "tasks", "actors": 2} if decode == "tasks" else {}
    score_paths([{"path": p} for p in paths], ScoreConfig(model=root, output=f"{root}/out", batch_size=2, **kw),
                log=lambda *_: None)
    name = "MapBatches(preprocess_batch)" if decode == "tasks" else "MapWorker(MapBatches(TorchPredictor)).submit"

    def spans():
        found = []
        for t in list_tasks(address=ray.get_runtime_context().gcs_address, detail=True, limit=10000,
                            raise_on_missing_output=False):
            states = {e["state"]: e["created_ms"] for e in t.events}
            if t.name == name and {"RUNNING", "FINISHED"} <= set(states):
                found.append((states["RUNNING"], states["FINISHED"], t.worker_pid))
        return found

    for _ in range(30):  # workers report task events every second or so: wait for the last ones
        found = spans()
        if len(found) >= BATCHES:
            break
        time.sleep(1)
    with open(f"{root}/spans.json", "w") as f:  # not stdout: Ray's driver prints its own lines there
        json.dump(found, f)
""")


BATCHES = 80


def _peak_processes(spans: list) -> int:
    """Most worker processes busy at the same moment. One process's spans are merged first:
    its next task's RUNNING event can be stamped before the previous one's FINISHED (which
    the caller records), and counting spans would then see 17 at once on 16 CPUs."""
    by_pid: dict[int, list] = {}
    for start, end, pid in sorted(spans):
        merged = by_pid.setdefault(pid, [])
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    edges = sorted((t, step) for runs in by_pid.values() for start, end in runs for t, step in ((start, 1), (end, -1)))
    running = peak = 0
    for _, step in edges:  # an end sorts before a start at the same millisecond: no false overlap
        running += step
        peak = max(peak, running)
    return peak


def test_peak_counts_processes_not_overlapping_spans_of_one_process():
    assert _peak_processes([(0, 10, 1), (9, 20, 1), (5, 15, 2)]) == 2
    assert _peak_processes([(0, 10, 1), (10, 20, 2)]) == 1  # one ends as the other starts
    assert _peak_processes([(0, 10, 1), (1, 9, 2), (2, 8, 3)]) == 3


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["tasks", "actors"])
def test_decoding_runs_on_more_than_half_of_16_cpus_at_once(tmp_path, decode):
    """Issue 11: Ray told it has 16 CPUs decodes more than 8 batches at the same time, in
    decode tasks (`--decode tasks`, the GPU plan's stage) or in the default CPU plan's
    actors, read from Ray's own task records (RUNNING -> FINISHED events), not from timings."""
    proc = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path), decode, str(BATCHES)], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    spans = json.loads((tmp_path / "spans.json").read_text())
    # Ray's task events of a few actor tasks may lack a state (its event buffer); most must be there
    assert len(spans) == BATCHES if decode == "tasks" else len(spans) >= 0.75 * BATCHES
    peak = _peak_processes(spans)
    assert peak > 8, f"at most {peak} processes decoding ({decode}) at once on 16 CPUs"
    print(f"\n[scoring plan] 16 logical CPUs: at most {peak} processes decoding ({decode}) at once (Ray's task events)")
    assert len({pid for _, _, pid in spans}) > 8


def test_max_actors_lets_the_pool_and_decode_grow_in_proportion():
    cluster = ClusterCPUs(total=4, per_node_max=2, nodes=2)
    fixed = scoring_plan(ScoreConfig(actors=2, cpus_per_actor=0.5, decode="tasks"), cluster, files=64000)
    growing = scoring_plan(ScoreConfig(actors=2, cpus_per_actor=0.5, max_actors=6, decode="tasks"), cluster,
                           files=64000)
    assert (fixed.max_actors, growing.max_actors) == (0, 6)
    assert growing.decode_tasks == 3 * fixed.decode_tasks
    assert "up to 6 as nodes join" in growing.describe()
    assert scoring_plan(ScoreConfig(actors=2, max_actors=6), cluster, files=192).max_actors == 3


def test_max_actors_below_actors_is_refused_before_anything_is_read(tmp_path):
    from leukray.infer import check_score_config

    with pytest.raises(ValueError, match=r"--max-actors \(2\) must be at least --actors \(4\)"):
        check_score_config(ScoreConfig(model=str(tmp_path / "absent"), output=str(tmp_path / "out"), actors=4,
                                       max_actors=2))


@pytest.mark.parametrize("cfg, cluster, files, rows", [
    (ScoreConfig(), ClusterCPUs(total=2, per_node_max=2), 20000, 512),  # the cap: the driver's cost per task
    (ScoreConfig(), ClusterCPUs(total=2, per_node_max=2), 2769, 174),  # 8 tasks for each of the 2 actors
    (ScoreConfig(), ClusterCPUs(total=2, per_node_max=2), 100, 64),  # never below one model batch
    (ScoreConfig(batch_size=1024), ClusterCPUs(total=2, per_node_max=2), 20000, 1024),  # nor above it
    (ScoreConfig(gpu=True), ClusterCPUs(total=32, per_node_max=16, gpus=2, nodes=2), 20000, 79),  # 32 decode slots
    (ScoreConfig(max_actors=6), ClusterCPUs(total=2, per_node_max=2), 4800, 100),  # room for the grown pool
])
def test_tasks_hold_several_batches_and_every_slot_gets_several_tasks(cfg, cluster, files, rows):
    plan = scoring_plan(cfg, cluster, files=files)
    assert plan.rows_per_task == rows
    assert plan.blocks(files) * plan.rows_per_task >= files > (plan.blocks(files) - 1) * plan.rows_per_task
    assert f"{rows} files per task" in plan.describe()
