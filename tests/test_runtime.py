"""How leukray starts and stops the Ray it embeds."""

import atexit
import io
import os
import subprocess
import sys
import textwrap
import time

import pytest

from leukray import cli

# Starts an embedded Ray the way every command does, and records, as Ray's own exit hook
# stops each process, whether that process had already ended (then Ray does not wait on it).
EXIT_PROBE = textwrap.dedent("""
    import time
    from ray._private import node
    from leukray import runtime
    from leukray.config import RayConfig

    kill = node.Node._kill_process_type

    def recorded(self, kind, *args, **kwargs):
        ended = all(info.process.poll() is not None for info in self.all_processes.get(kind, []))
        start = time.perf_counter()
        kill(self, kind, *args, **kwargs)
        print(f"stopped {kind} ended_before={ended} seconds={time.perf_counter() - start:.2f}", flush=True)

    node.Node._kill_process_type = recorded
    runtime.init_ray(RayConfig(num_cpus=1), dashboard=False)
    print("started", flush=True)
    # the interpreter exits here: atexit runs leukray's hook, then Ray's ray.shutdown()
""")


@pytest.mark.parametrize("way", ["exit", "shutdown_ray"])
def test_an_embedded_ray_stops_without_waiting_on_its_autoscaler_monitor(tmp_path, way):
    """Ray stops an embedded cluster's processes one by one, the GCS before the autoscaler
    monitor, and gives each a second on SIGTERM; the monitor spends its second reporting its
    death to the GCS that is gone, and every command waited that second at exit. Ended first
    (leukray's exit hook, or `runtime.shutdown_ray`), it costs nothing."""
    script = EXIT_PROBE + ("" if way == "exit" else "runtime.shutdown_ray()\nprint('after', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    stopped = {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith("stopped ")}
    assert "monitor" in stopped and "gcs_server" in stopped, proc.stdout
    assert "ended_before=True" in stopped["monitor"], stopped["monitor"]
    assert "ended_before=False" in stopped["gcs_server"], "the probe must tell a running process apart"


def test_a_task_stage_runs_its_tasks_side_by_side_from_the_start(ray_session):
    """Ray Data's executor learns its resource limits from an actor it asks asynchronously,
    starts each execution with limits of zero (one task at a time) and by default reads them
    again only a second later: every decode stage ran alone for its first second. Two tasks
    that both fit start together now (the second started 1.01 s after the first before,
    0.21 s after, one-off)."""
    import ray

    def started(batch: dict) -> dict:  # defined here: the workers cannot import this module
        """Say when the task started, then hold its CPU share for a while."""
        import time

        start = time.time()
        time.sleep(1.5)
        return {"start": [start] * len(batch["i"])}

    def run() -> list[float]:
        ds = ray.data.from_items([{"i": i} for i in range(2)], override_num_blocks=2)
        ds = ds.map_batches(started, batch_size=None, num_cpus=0.25, compute=ray.data.TaskPoolStrategy(size=2))
        return sorted(ds.to_pandas()["start"].unique())

    run()  # worker processes that have imported Ray Data, as in any job after its first tasks
    first, second = run()
    assert second - first < 0.6, f"the second task started {second - first:.2f} s after the first"


def test_a_task_stage_hands_its_slot_on_as_soon_as_a_task_ends(ray_session):
    """Ray Data learns that tasks ended from a `ray.wait` for all its running tasks with a
    0.1 s timeout (ray-project/ray#45934): with two or more running, one that ended held its
    slot until the timeout. In a two-slot stage the (k + 2)-th task to start can start once k
    tasks have ended: its start minus the k-th end is a slot's idle time (medians, two one-off
    runs each: 0.165 s before, 0.043 s after)."""
    import statistics

    import ray
    from ray.data._internal.execution import streaming_executor_state

    from leukray import runtime

    def timed(batch: dict) -> dict:  # defined here: the workers cannot import this module
        """Record when the task's work started and ended."""
        import time

        start = time.time()
        time.sleep(0.15)
        return {"start": [start], "end": [time.time()]}

    def idle() -> list[float]:
        ds = ray.data.from_items([{"i": i} for i in range(12)], override_num_blocks=12)
        ds = ds.map_batches(timed, batch_size=None, num_cpus=0.25, compute=ray.data.TaskPoolStrategy(size=2))
        rows = ds.to_pandas()
        starts, ends = sorted(rows["start"]), sorted(rows["end"])
        return [start - end for start, end in zip(starts[2:], ends)]

    ray_default = streaming_executor_state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S
    with runtime.prompt_task_stages():
        idle()  # worker processes that have imported Ray Data, as in any job after its first tasks
        gaps = idle()
    assert statistics.median(gaps) < 0.09, f"slots idle between tasks: {[round(g, 3) for g in gaps]} s"
    # actor pools do not need it and the driver's loop would spin faster for nothing
    assert streaming_executor_state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S == ray_default


def test_training_ingest_decodes_with_the_short_task_wait(ray_session, synth_data, monkeypatch):
    """Decode-once training ingest is a stage of Ray tasks (then two passes of tasks over the
    decoded blocks): it runs inside `runtime.prompt_task_stages`, and only the good rows come
    out."""
    from contextlib import contextmanager

    import pandas as pd

    from leukray import runtime, train
    from leukray.data import list_labeled_images

    inside = []

    @contextmanager
    def recorded():
        inside.append("enter")
        yield
        inside.append("exit")

    monkeypatch.setattr(runtime, "prompt_task_stages", recorded)
    listing = list_labeled_images(str(synth_data))
    df = pd.DataFrame(listing.records[:12])
    ds, bad = train.labeled_dataset(df, listing.classes, 32, seed=0)
    assert inside == ["enter", "exit"]
    assert ds.count() == 12 and bad == []


# A command run through `leukray.cli.console` in a process with an embedded Ray, and what its
# exit does: whether Ray is still up when the exit handlers run (then Ray's own hook waits
# 0.5 s for workers' log lines before shutting it down) and whether the interpreter's
# teardown runs (it finalizes module globals such as `kept`).
LEAVE_PROBE = textwrap.dedent("""
    import atexit, sys
    import ray
    from ray._private import ray_constants
    from leukray import cli, runtime
    from leukray.config import RayConfig

    class Finalized:
        def __del__(self):
            print("finalized", flush=True)

    kept = Finalized()
    runtime.init_ray(RayConfig(num_cpus=1), dashboard=False)
    node = ray._private.worker._global_node
    print("raylet", node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid, flush=True)
    atexit.register(lambda: print(f"exit handlers ran, Ray up: {ray.is_initialized()}", flush=True))
    sys.stdout.write("a line still in stdout's buffer\\n")  # a pipe: block-buffered
    sys.exit(cli.console(sys.argv[1:]))
""")


@pytest.mark.parametrize("succeeds", [True, False])
def test_a_command_that_succeeded_ends_without_rays_exit_wait_and_the_teardown(tmp_path, succeeds):
    """~0.8 s of the ~1.2 s a Ray command spent after its last line (benchmarks/probes_s13.py
    exit). A failing command exits as before, so that a worker's last lines still print."""
    args = (["synth", "--output", str(tmp_path / "synth"), "--per-class", "1", "--size", "32"] if succeeds
            else ["score", "--model", str(tmp_path / "missing.pt"), "--input", str(tmp_path), "--output",
                  str(tmp_path / "out")])
    proc = subprocess.run([sys.executable, "-c", LEAVE_PROBE, *args], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    out = proc.stdout
    assert proc.returncode == (0 if succeeds else 2), out[-2000:] + proc.stderr[-2000:]
    assert "a line still in stdout's buffer" in out, out
    assert f"exit handlers ran, Ray up: {not succeeds}" in out, out
    assert ("finalized" in out) is not succeeds, out
    raylet = int(next(line.split()[1] for line in out.splitlines() if line.startswith("raylet ")))
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{raylet}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{raylet}"), "Ray's raylet outlived the command"


def test_a_command_whose_reader_is_gone_leaves_with_pythons_code_120(monkeypatch):
    """`leukray score ... | head`: the flush at the end fails; Python's own exit says 120."""
    class Gone(io.StringIO):
        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    codes = []
    monkeypatch.setattr(sys, "stdout", Gone())
    monkeypatch.delitem(sys.modules, "ray", raising=False)  # this test process's Ray stays up
    monkeypatch.setattr(cli.threading, "_shutdown", lambda: None)  # this test process's threads go on
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: None)
    monkeypatch.setattr(os, "_exit", codes.append)
    cli._leave(0)
    assert codes == [120]


# Commands that succeed with something a normal exit copes with: a thread pool left alive (its
# idle worker is not a daemon; the interpreter's thread shutdown wakes it, a plain join would
# wait for ever) and standard output closed from the start (`sys.stdout` is None).
IDLE_POOL_PROBE = textwrap.dedent("""
    import concurrent.futures, sys
    from leukray import cli

    pool = concurrent.futures.ThreadPoolExecutor(1)
    pool.submit(print, "a pool's task ran", flush=True).result()
    sys.exit(cli.console(sys.argv[1:]))
""")


@pytest.mark.parametrize("stdout", ["pipe", "closed"])
def test_a_command_that_succeeded_leaves_despite_an_idle_pool_or_a_closed_stdout(tmp_path, stdout):
    args = ["synth", "--output", str(tmp_path / "synth"), "--per-class", "1", "--size", "32"]
    proc = subprocess.run([sys.executable, "-c", IDLE_POOL_PROBE, *args], timeout=30, cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=None if stdout == "pipe" else lambda: os.close(1))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((tmp_path / "synth").rglob("*.jpg"))) == 4
    if stdout == "pipe":
        assert "a pool's task ran" in proc.stdout
