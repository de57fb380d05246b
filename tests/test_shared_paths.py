"""The shared-path check (runtime.check_shared_paths) on an embedded Ray: a node that died
after `ray.nodes()` listed it is not a node that cannot see the path (issue 12: a node killed
just before a job started made `score` fail with TaskUnschedulableError)."""

import ray

from leukray import runtime


def _with_dead_node(monkeypatch) -> str:
    """`ray.nodes()` lists one more alive node, which does not exist (as a node killed a moment
    ago does until Ray's health check marks it dead)."""
    real = ray.nodes
    ghost = "ab" * 28
    monkeypatch.setattr(ray, "nodes", lambda: real() + [{"NodeID": ghost, "Alive": True,
                                                          "NodeManagerAddress": "192.0.2.9"}])
    return ghost


def test_a_node_that_died_since_the_listing_is_skipped(ray_session, monkeypatch, tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(b"x")
    _with_dead_node(monkeypatch)
    runtime.check_shared_paths(read={"--model": str(model)}, write={"--output": str(tmp_path / "run")})
    assert not list((tmp_path / "run").glob(runtime.SHARED_CHECK_MARKER + "*"))


def test_a_path_missing_on_a_live_node_is_still_refused(ray_session, monkeypatch, tmp_path):
    _with_dead_node(monkeypatch)
    missing = tmp_path / "nowhere" / "model.pt"
    try:
        runtime.check_shared_paths(read={"--model": str(missing)})
    except ValueError as e:
        assert f"--model {missing} is not visible on 1 of the 2 nodes" in str(e)
    else:
        raise AssertionError("a path no live node sees was not refused")
