"""Run directories on URIs (leukray.storage), checked with file:// URIs: no server needed.
The S3 path end to end is in test_s3.py."""

from pathlib import Path

import pytest

from leukray import storage


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in root.rglob("*") if p.is_file()}


def test_synced_run_dir_mirrors_a_uri_and_leaves_ray_train_storage_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("LEUKRAY_RUN_CACHE", str(tmp_path / "tmp"))
    remote = tmp_path / "remote"
    (remote / "ray" / "train").mkdir(parents=True)
    (remote / "ray" / "train" / "checkpoint.pt").write_text("ckpt")
    (remote / "config.json").write_text("{}")
    (remote / "predictions" / "test").mkdir(parents=True)
    (remote / "predictions" / "test" / "part-old.parquet").write_text("old")
    uri = remote.as_uri()
    assert storage.is_uri(uri) and not storage.is_uri(str(remote))
    assert storage.ray_storage_path(uri, tmp_path) == f"{uri}/ray"

    with storage.synced_run_dir(uri) as local:
        assert local != remote and str(local).startswith(str(tmp_path / "tmp"))
        assert _tree(local) == {"config.json": "{}", "predictions/test/part-old.parquet": "old"}  # no ray/
        (local / "predictions" / "test" / "part-old.parquet").unlink()
        (local / "predictions" / "test" / "part-new.parquet").write_text("new")
        (local / "model.pt").write_text("weights")
    assert _tree(remote) == {"ray/train/checkpoint.pt": "ckpt", "config.json": "{}", "model.pt": "weights",
                             "predictions/test/part-new.parquet": "new"}

    # A failed command writes nothing back.
    with pytest.raises(RuntimeError):
        with storage.synced_run_dir(uri) as local:
            (local / "model.pt").write_text("half-written")
            raise RuntimeError("boom")
    assert (remote / "model.pt").read_text() == "weights"

    # Local paths are used as they are.
    with storage.synced_run_dir(str(tmp_path / "plain")) as local:
        assert local == tmp_path / "plain"
