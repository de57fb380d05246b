"""Scoring keeps its promise against hostile archives, lists and special files (issue 15).

One test per row B1-B11 of the issue's table, plus the rough edges. The model is an
untrained LeukNet saved once per session: only rows and errors matter here, not scores.
"""

import io
import lzma
import os
import resource
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from leukray.config import ScoreConfig
from leukray.infer import score
from leukray.synthetic import draw_smear

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def model_dir(ray_session, tmp_path_factory):
    from leukray.model import DEFAULT_MEAN, DEFAULT_STD, create_model, save_model

    run = tmp_path_factory.mktemp("untrained")
    classes = ["Benign", "Early", "Pre", "Pro"]
    save_model(run / "model.pt", create_model("leuknet", 4, DEFAULT_MEAN, DEFAULT_STD),
               {"arch": "leuknet", "classes": classes, "image_size": 32, "mean": DEFAULT_MEAN, "std": DEFAULT_STD})
    return str(run)


def jpeg(seed: int, size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(draw_smear(seed % 4, np.random.default_rng(seed), size)).save(buf, "JPEG")
    return buf.getvalue()


def good_files(folder: Path, n: int = 3, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"good{i}.jpg" for i in range(start, start + n)]
    for i, p in enumerate(paths):
        p.write_bytes(jpeg(start + i))
    return paths


def run(model: str, src, out, **kw) -> tuple[dict, pd.DataFrame]:
    stats = score(ScoreConfig(model=model, input=str(src), output=str(out), batch_size=8, **kw), log=lambda *a: None)
    return stats, pd.read_parquet(out)


def zip_with_last_member_patched(path: Path, field: str, value: int = 0) -> None:
    """A zip of good `a.jpg` and `z.jpg` whose last member is broken in one header field."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.jpg", jpeg(1))
        z.writestr("z.jpg", jpeg(2) * 4)
        last = z.infolist()[-1]
    data = bytearray(buf.getvalue())
    central = data.rfind(b"PK\x01\x02")
    offsets = {"flags": 8, "method": 10, "crc": 16, "version": 6}
    if field == "data":  # garble the compressed stream of the last member
        start = last.header_offset + 30 + len(last.filename) + 0
        data[start + 10:start + 60] = os.urandom(50)
    else:
        o = central + offsets[field]
        data[o:o + 2] = int(value).to_bytes(2, "little")
    path.write_bytes(bytes(data))


def test_b1_broken_zip_members_are_error_rows_and_the_job_goes_on(model_dir, tmp_path):
    src = tmp_path / "in"
    good_files(src, 4)
    zip_with_last_member_patched(src / "encrypted.zip", "flags", 0x1)
    zip_with_last_member_patched(src / "badcrc.zip", "crc", 0x1234)
    zip_with_last_member_patched(src / "deflate.zip", "data")
    zip_with_last_member_patched(src / "method9.zip", "method", 9)
    stats, df = run(model_dir, src, tmp_path / "out")
    assert len(df) == 4 + 2 * 4
    members = df[df["member"].notna()]
    assert members.loc[members["member"] == "a.jpg", "error"].isna().all(), "the good member of each zip scored"
    bad = members[members["member"] == "z.jpg"]
    bad = bad.set_index(bad["path"].map(lambda p: Path(p).name))
    assert sorted(bad.index) == ["badcrc.zip", "deflate.zip", "encrypted.zip", "method9.zip"]
    assert bad["error"].str.startswith("unreadable file").all(), bad["error"].to_dict()
    assert "encrypted" in bad.loc["encrypted.zip", "error"]
    again, df2 = run(model_dir, src, tmp_path / "out")
    assert len(df2) == len(df)


def corrupt_tar_xz(path: Path) -> None:
    """A tar.xz of incompressible members, one byte range of the stream garbled mid-way."""
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w") as t:
        for i in range(8):
            data = os.urandom(64 * 1024)
            info = tarfile.TarInfo(f"m{i}.jpg")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    data = bytearray(lzma.compress(tbuf.getvalue(), format=lzma.FORMAT_XZ))
    mid = len(data) * 3 // 5
    data[mid:mid + 4096] = bytes(4096)
    path.write_bytes(bytes(data))


def test_b2_an_archive_that_cannot_be_listed_is_one_error_row(model_dir, tmp_path):
    src = tmp_path / "in"
    good_files(src, 3)
    corrupt_tar_xz(src / "corrupt.tar.xz")
    zip_with_last_member_patched(src / "cdir.zip", "version", 0xFF)  # central directory: unknown version
    stats, df = run(model_dir, src, tmp_path / "out")
    for name in ("corrupt.tar.xz", "cdir.zip"):
        rows = df[(df["path"] == str(src / name)) & df["member"].isna()]
        assert len(rows) == 1 and rows["error"].iloc[0].startswith("unreadable archive"), name
    assert not df[df["path"] == str(src / "cdir.zip")]["member"].notna().any()
    assert df[df["path"].str.endswith(".jpg")]["error"].isna().sum() == 3
    _, df2 = run(model_dir, src, tmp_path / "out")
    assert len(df2) == len(df)


def test_b3_a_file_named_like_a_member_does_not_collide(model_dir, tmp_path):
    src = tmp_path / "c"
    src.mkdir()
    with tarfile.open(src / "arc.tar", "w") as t:
        data = jpeg(1)
        info = tarfile.TarInfo("m.jpg")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    (src / "arc.tar::m.jpg").write_bytes(jpeg(2))
    _, df = run(model_dir, src, tmp_path / "out")
    assert len(df) == 2 and df["error"].isna().all() and df["sha256"].nunique() == 2
    again, df2 = run(model_dir, src, tmp_path / "out")
    assert len(df2) == 2 and again["already_scored"] == 2 and again["scored"] == 0
    assert set(zip(df2["path"], df2["member"].fillna(""))) == {(str(src / "arc.tar"), "m.jpg"),
                                                             (str(src / "arc.tar::m.jpg"), "")}


def test_b4_rows_unreadable_then_are_retried_on_resume(model_dir, tmp_path):
    src = tmp_path / "in"
    good_files(src, 2)
    (src / "late.jpg").symlink_to(tmp_path / "target.jpg")  # dangling at the first run
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w") as t:
        for i in range(3):
            data = jpeg(10 + i)
            info = tarfile.TarInfo(f"t{i}.jpg")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    whole = tar_bytes.getvalue()
    (src / "t.tar").write_bytes(whole[:700])  # truncated inside the first member
    _, df = run(model_dir, src, tmp_path / "out")
    assert df.loc[df["path"] == str(src / "late.jpg"), "error"].str.startswith("unreadable file").all()
    assert df.loc[df["path"] == str(src / "t.tar"), "error"].notna().all()
    (tmp_path / "target.jpg").write_bytes(jpeg(5))
    (src / "t.tar").write_bytes(whole)
    again, df2 = run(model_dir, src, tmp_path / "out")
    assert df2.loc[df2["path"] == str(src / "late.jpg"), "error"].isna().all()
    tar_rows = df2[df2["path"] == str(src / "t.tar")]
    assert sorted(tar_rows["member"]) == ["t0.jpg", "t1.jpg", "t2.jpg"] and tar_rows["error"].isna().all()
    assert len(df2) == 2 + 1 + 3 and again["already_scored"] == 2
    _, df3 = run(model_dir, src, tmp_path / "out")
    assert len(df3) == len(df2)


_SPECIAL_READ = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
import numpy as np
from leukray.data import preprocess_batch
out = preprocess_batch({"path": np.array(sys.argv[1:], dtype=object)}, 16)
print("|".join(str(e) for e in out["error"]))
"""


def test_b5_fifos_devices_and_links_to_them_are_refused_before_opening(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    (tmp_path / "null.jpg").symlink_to("/dev/null")
    ok = good_files(tmp_path / "g", 1)[0]
    paths = [str(tmp_path / n) for n in ("pipe.jpg", "zero.jpg", "null.jpg")] + [str(ok)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _SPECIAL_READ, *paths], capture_output=True, text=True,
                          timeout=60, env=env)  # the landed code blocks on the FIFO: a timeout fails the test
    assert proc.returncode == 0, proc.stderr[-2000:]
    errors = proc.stdout.strip().split("|")
    assert errors == ["not a regular file: FIFO", "not a regular file: character device",
                      "not a regular file: character device", "None"]


def tree_rss(proc) -> int:
    import psutil

    total = 0
    try:
        p = psutil.Process(proc.pid)
        for q in [p, *p.children(recursive=True)]:
            try:
                total += q.memory_info().rss
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


def run_cli_watched(args: list[str], timeout: float, rss_cap: int) -> tuple[int, int, str]:
    """Run `leukray score ARGS` in its own session; sample the process tree's RSS every
    0.1 s. Returns (rc, peak RSS, output); kills the tree past `timeout` or `rss_cap`."""
    import signal

    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "leukray.cli", "score", "--num-cpus", "2", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    peak, t0, why = 0, time.time(), ""
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc))
        if time.time() - t0 > timeout or peak > rss_cap:
            why = f"killed: {time.time() - t0:.0f}s, peak {peak >> 20} MiB"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.1)
    reader.join(10)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftover Ray processes of this run only
    except ProcessLookupError:
        pass
    return proc.returncode, peak, why + "".join(chunks)[-3000:]


@pytest.mark.slow
def test_b5_cli_with_a_fifo_and_a_link_to_dev_zero_finishes(model_dir, tmp_path):
    src = tmp_path / "f"
    good_files(src, 3)
    os.mkfifo(src / "pipe.jpg")
    (src / "zero.jpg").symlink_to("/dev/zero")
    rc, peak, out = run_cli_watched(["--model", model_dir, "--input", str(src), "--output", str(tmp_path / "o")],
                                    timeout=240, rss_cap=6 << 30)
    assert rc == 0, out
    df = pd.read_parquet(tmp_path / "o")
    errors = dict(zip(df["path"].map(lambda p: Path(p).name), df["error"]))
    assert len(df) == 5 and errors["pipe.jpg"] == "not a regular file: FIFO"
    assert errors["zero.jpg"] == "not a regular file: character device"


def zip_bomb(path: Path, member_bytes: int) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("cells/ok.jpg", jpeg(3))
        with z.open("cells/bomb.jpg", "w", force_zip64=True) as f:
            block = bytes(1 << 20)
            for _ in range(member_bytes >> 20):
                f.write(block)


def test_b6_a_member_over_the_limit_is_refused_from_its_declared_size(tmp_path):
    from leukray.data import ReadRefused, read_member

    zip_bomb(tmp_path / "b.zip", 64 << 20)
    assert (tmp_path / "b.zip").stat().st_size < 1 << 20
    t0 = time.perf_counter()
    with pytest.raises(ReadRefused, match="too large: 67108864 bytes"):
        read_member(str(tmp_path / "b.zip"), "cells/bomb.jpg", limit=1 << 20)
    assert time.perf_counter() - t0 < 0.5, "refused before inflating"
    assert read_member(str(tmp_path / "b.zip"), "cells/ok.jpg", limit=1 << 20) == jpeg(3)


def test_reads_without_a_declared_size_stop_at_the_limit():
    from leukray.data import ReadRefused, read_limited

    class Endless(io.RawIOBase):  # like a stream that never ends and declares nothing
        def readable(self):
            return True

        def readinto(self, b):
            b[:] = bytes(len(b))
            return len(b)

    with pytest.raises(ReadRefused, match="too large"):
        read_limited(io.BufferedReader(Endless()), 1 << 20)
    assert read_limited(io.BytesIO(b"abc"), 3) == b"abc"


@pytest.mark.slow
def test_b6_zip_bomb_is_scored_within_bounded_memory(model_dir, tmp_path):
    """Peak RSS of the whole process tree, bomb run vs an ordinary run of the same size."""
    plain, bomb = tmp_path / "plain", tmp_path / "bomb"
    good_files(plain, 6)
    good_files(bomb, 5)
    with zipfile.ZipFile(plain / "ok.zip", "w") as z:
        z.writestr("cells/ok.jpg", jpeg(3))
        z.writestr("cells/bomb.jpg", jpeg(4))
    zip_bomb(bomb / "ok.zip", 1 << 30)
    assert (bomb / "ok.zip").stat().st_size < 2 << 20, "a ~1 MB zip inflating to 1 GB"
    results = {}
    for name, src in (("plain", plain), ("bomb", bomb)):
        rc, peak, out = run_cli_watched(["--model", model_dir, "--input", str(src), "--output",
                                         str(tmp_path / f"out-{name}")], timeout=300, rss_cap=12 << 30)
        assert rc == 0, out
        results[name] = peak
    print(f"peak RSS of the process tree: ordinary {results['plain'] >> 20} MiB, bomb {results['bomb'] >> 20} MiB")
    assert results["bomb"] - results["plain"] < 1 << 30, results
    df = pd.read_parquet(tmp_path / "out-bomb")
    row = df[df["member"] == "cells/bomb.jpg"]
    assert len(df) == 7 and row["error"].iloc[0].startswith("too large: 1073741824 bytes")


def test_b7_empty_and_null_list_cells_are_error_rows(model_dir, tmp_path):
    good = good_files(tmp_path / "g", 2)
    (tmp_path / "sub").mkdir()
    (tmp_path / "list.csv").write_text(f"path,label\n{good[0]},a\n,b\n{tmp_path / 'sub'},c\n")
    pd.DataFrame({"path": [str(good[1]), None]}).to_parquet(tmp_path / "list.parquet")
    _, df = run(model_dir, tmp_path / "list.csv", tmp_path / "o1")
    errors = dict(zip(zip(df["path"], df["member"].fillna("")), df["error"].fillna("ok")))
    assert errors == {(str(good[0]), ""): "ok", (str(tmp_path / "list.csv"), "row 2"): "empty path in list",
                      (str(tmp_path / "sub"), ""): "not a regular file: directory"}
    _, df = run(model_dir, tmp_path / "list.parquet", tmp_path / "o2")
    assert len(df) == 2 and df.loc[df["member"] == "row 2", "error"].tolist() == ["empty path in list"]
    _, df = run(model_dir, tmp_path / "list.parquet", tmp_path / "o2")
    assert len(df) == 2


def test_b8_a_uri_the_filesystem_layer_rejects_is_an_error_row(model_dir, tmp_path):
    good = good_files(tmp_path / "g", 2)
    pd.DataFrame({"path": [str(good[0]), "http://example.invalid/cell.jpg", str(good[1])]}).to_csv(
        tmp_path / "list.csv", index=False)
    _, df = run(model_dir, tmp_path / "list.csv", tmp_path / "out")
    assert len(df) == 3 and df["error"].isna().sum() == 2
    assert df.loc[df["path"].str.startswith("http://"), "error"].iloc[0].startswith("unreadable file")


def test_b9_overwrite_never_deletes_a_file_leukray_did_not_write(model_dir, tmp_path):
    src = tmp_path / "in"
    good_files(src, 2)
    out = tmp_path / "o"
    out.mkdir()
    foreign = out / "part-00000-x.parquet"
    pd.DataFrame({"x": [1]}).to_parquet(foreign)
    for overwrite in (True, False):
        with pytest.raises(ValueError, match="Parquet file\\(s\\) leukray did not write"):
            score(ScoreConfig(model=model_dir, input=str(src), output=str(out), overwrite=overwrite))
        assert foreign.exists()
    assert os.listdir(out) == ["part-00000-x.parquet"], "nothing written before the refusal"


def test_b9_parts_are_marked_and_clear_deletes_only_marked_parts(model_dir, tmp_path):
    from leukray.output import PART_MARK, PartWriter

    src = tmp_path / "in"
    good_files(src, 2)
    out = tmp_path / "o"
    run(model_dir, src, out)
    parts = list(out.glob("part-*.parquet"))
    assert parts and all(PART_MARK in pq.read_schema(p).metadata for p in parts)
    foreign = out / "part-ffff.parquet"
    pd.DataFrame({"path": ["x"], "sha256": ["y"]}).to_parquet(foreign)
    PartWriter(str(out)).clear()
    assert os.listdir(out) == ["part-ffff.parquet"]


def test_b10_duplicate_member_names_are_both_scored_with_their_own_bytes(model_dir, tmp_path):
    import hashlib

    src = tmp_path / "in"
    src.mkdir()
    first, second = jpeg(1), jpeg(2)
    with pytest.warns(UserWarning, match="Duplicate name"):
        with zipfile.ZipFile(src / "d.zip", "w") as z:
            z.writestr("dup.jpg", first)
            z.writestr("dup.jpg", second)
    _, df = run(model_dir, src, tmp_path / "out")
    assert len(df) == 2 and df["error"].isna().all()
    assert set(df["sha256"]) == {hashlib.sha256(first).hexdigest(), hashlib.sha256(second).hexdigest()}
    by_index = dict(zip(df["member_index"], df["sha256"]))
    assert by_index == {0: hashlib.sha256(first).hexdigest(), 1: hashlib.sha256(second).hexdigest()}
    again, df2 = run(model_dir, src, tmp_path / "out")
    assert len(df2) == 2 and again["already_scored"] == 2


def test_b11_a_list_naming_one_file_twice_scores_it_once(model_dir, tmp_path, monkeypatch):
    good = good_files(tmp_path / "x", 2)
    monkeypatch.chdir(tmp_path)
    pd.DataFrame({"path": [str(good[0]), str(good[0]), "x/../x/good0.jpg", "./x/good1.jpg"]}).to_csv(
        tmp_path / "list.csv", index=False)
    stats, df = run(model_dir, tmp_path / "list.csv", tmp_path / "out")
    assert sorted(df["path"]) == sorted(map(str, good)) and stats["folded"] == 2
    from leukray.infer import format_summary

    assert "folded 2 duplicate paths" in format_summary(stats)


def test_rows_of_vanished_files_are_reported_and_dropped_with_a_flag(model_dir, tmp_path):
    src = tmp_path / "in"
    paths = good_files(src, 3)
    out = tmp_path / "out"
    run(model_dir, src, out)
    paths[0].unlink()
    stats, df = run(model_dir, src, out)
    assert stats["missing"] == 1 and len(df) == 3  # reported, kept by default
    stats, df = run(model_dir, src, out, drop_missing=True)
    assert stats["missing"] == 1 and sorted(df["path"]) == sorted(map(str, paths[1:]))


def test_output_that_is_a_file_is_one_clear_error(tmp_path):
    from leukray.output import check_output_folder

    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_output_folder(str(tmp_path / "f"), overwrite=False)


def test_output_inside_input_with_explain_is_never_scored(model_dir, tmp_path):
    src = tmp_path / "in"
    good_files(src, 3)
    out = src / "pred"
    for _ in range(2):
        stats, df = run(model_dir, src, out, explain=True, explain_threshold=0.0)
    assert list((src / "pred_explanations").glob("*.png")), "heatmaps written inside the input"
    assert len(df) == 3 and not df["path"].str.contains("pred").any()
    assert stats["skipped_non_images"] == 0


@pytest.mark.parametrize("damage", ["truncated", "pickled"])
def test_a_truncated_or_pickled_model_is_one_clear_line(model_dir, tmp_path, capsys, damage):
    import torch

    from leukray.cli import main
    from leukray.model import create_model

    bad = tmp_path / "run" / "model.pt"
    bad.parent.mkdir()
    if damage == "truncated":
        data = (Path(model_dir) / "model.pt").read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        torch.save(create_model("leuknet", 4), bad)  # a whole pickled module, not weights
    src = tmp_path / "in"
    good_files(src, 1)
    rc = main(["score", "--model", str(bad.parent), "--input", str(src), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert ("truncated or corrupt" if damage == "truncated" else "pickled Python objects") in err
    assert "weights_only" not in err
