"""Bulk scoring never loses an image: every kind of bad input, archives, kill and resume."""

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from leukray.config import ScoreConfig
from leukray.infer import score
from leukray.synthetic import draw_smear


def _img(seed=0, size=48) -> Image.Image:
    return Image.fromarray(draw_smear(seed % 4, np.random.default_rng(seed), size))


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def make_bad_corpus(root: Path) -> dict[str, str | None]:
    """Write one file of every kind; returns {relative path: expected error prefix or None}."""
    good = _bytes(_img(), "JPEG")
    files = {
        "ok.jpg": (good, None),
        "truncated.jpg": (good[: len(good) // 2], "corrupt or truncated"),
        "corrupt.jpg": (good[:300] + os.urandom(2000), "corrupt or truncated"),
        "zero.jpg": (b"", "empty file"),
        "text.jpg": (b"just some text, not a jpeg\n" * 10, "not an image"),
        "img.png": (_bytes(_img(1), "PNG"), None),
        "img.tiff": (_bytes(_img(2), "TIFF"), None),
        "img.bmp": (_bytes(_img(3), "BMP"), None),
        "img.gif": (_bytes(_img(4), "GIF"), None),
        "gray.png": (_bytes(_img(5).convert("L"), "PNG"), None),
        "rgba.png": (_bytes(_img(6).convert("RGBA"), "PNG"), None),
        "palette.png": (_bytes(_img(7).convert("P"), "PNG"), None),
        "cmyk.jpg": (_bytes(_img(8).convert("CMYK"), "JPEG"), None),
        "sixteen.png": (_bytes(Image.fromarray((np.arange(2304).reshape(48, 48) * 28).astype(np.uint16)), "PNG"), None),
        "bomb.png": (_bytes(Image.new("1", (12000, 12000)), "PNG"), "decompression bomb"),
        "one_pixel.png": (_bytes(Image.new("RGB", (1, 1), (120, 60, 160)), "PNG"), None),
        "name with spaces ü 日本.jpg": (good, None),
        "deep/nested/folder/cell.jpeg": (good, None),
    }
    expected = {}
    for rel, (data, err) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[rel] = err
    (root / "notes.txt").write_text("not scored, listed as skipped")
    (root / "deep" / "loop").symlink_to(root / "deep")  # a symlink loop
    (root / "dangling.jpg").symlink_to(root / "does-not-exist.jpg")  # unreadable
    expected["dangling.jpg"] = "unreadable file"
    if os.geteuid() != 0:  # root reads anything; a chmod 000 file is unreadable for others only
        (root / "locked.jpg").write_bytes(good)
        (root / "locked.jpg").chmod(0)
        expected["locked.jpg"] = "unreadable file"
    return expected


def test_every_bad_input_gets_exactly_one_row(trained_run, tmp_path):
    src = tmp_path / "corpus"
    expected = make_bad_corpus(src)
    out = tmp_path / "pred"
    stats = score(ScoreConfig(model=trained_run["run_dir"], input=str(src), output=str(out)))
    df = pd.read_parquet(out)
    rel = df["path"].map(lambda p: os.path.relpath(p, src))
    assert sorted(rel) == sorted(expected), "one row per image file, nothing else"
    assert stats["skipped_non_images"] == 1
    for r, err in zip(rel, df["error"]):
        want = expected[r]
        assert pd.isna(err) if want is None else (isinstance(err, str) and err.startswith(want)), (r, err)
    good = df[df["error"].isna()]
    # odd images (gray, tiny, ...) are decoded but not assessable: no label, probabilities kept
    assert (good["predicted_label"].notna() == good["assessable"]).all() and good["confidence"].between(0, 1).all()
    bad = df[df["error"].notna()]
    assert bad["predicted_label"].isna().all() and bad["prob_Benign"].isna().all()
    modes = dict(zip(rel, df["mode"]))
    assert modes["gray.png"] == "L" and modes["cmyk.jpg"] == "CMYK" and modes["palette.png"] == "P"
    assert modes["sixteen.png"].startswith("I")


def test_the_summary_splits_the_time_before_the_first_results(trained_run, tmp_path):
    """Users of a small archive see mostly fixed start-up; the summary says which, and the
    rate after the first results, which a larger archive would see. A re-run with nothing
    left to score starts no Ray and says nothing of it."""
    from leukray.infer import format_summary

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(40):
        Image.fromarray(draw_smear(i % 4, rng, 64)).save(src / f"{i:02d}.jpg")
    cfg = ScoreConfig(model=trained_run["run_dir"], input=str(src), output=str(tmp_path / "out"), batch_size=8)
    stats = score(cfg)
    startup = stats["startup"]
    assert list(startup) == ["listing_s", "checks_s", "ray_s", "dataset_s", "first_results_s", "images_per_s_after"]
    assert all(v >= 0 for v in startup.values()) and startup["images_per_s_after"] > 0
    assert sum(v for k, v in startup.items() if k.endswith("_s")) <= stats["seconds"] + startup["listing_s"]
    line = next(ln for ln in format_summary(stats).splitlines() if "before the first results" in ln)
    assert f"first batch {startup['first_results_s']:.1f}s" in line and line.endswith("img/s")
    again = score(cfg)
    assert again["scored"] == 0 and again["startup"] == {}
    assert "before the first results" not in format_summary(again)


def test_tar_targz_and_zip_are_read_in_place(trained_run, tmp_path):
    members = {f"cells/{i:02d}.jpg": _bytes(_img(i), "JPEG") for i in range(6)}
    members["cells/readme.txt"] = b"skip me"
    members["../../escape.jpg"] = _bytes(_img(9), "JPEG")  # a hostile name is only a key
    src = tmp_path / "archives"
    src.mkdir()
    for name, mode in [("a.tar", "w"), ("b.tar.gz", "w:gz")]:
        with tarfile.open(src / name, mode) as t:
            for m, data in members.items():
                info = tarfile.TarInfo(m)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            link = tarfile.TarInfo("cells/link.jpg")
            link.type, link.linkname = tarfile.SYMTYPE, "00.jpg"
            t.addfile(link)
    with zipfile.ZipFile(src / "c.zip", "w") as z:
        for m, data in members.items():
            z.writestr(m, data)
    out = tmp_path / "pred"
    before = set(os.listdir(tmp_path))
    score(ScoreConfig(model=trained_run["run_dir"], input=str(src), output=str(out)))
    assert set(os.listdir(tmp_path)) == before | {"pred"}, "nothing extracted next to the inputs"
    assert sorted(os.listdir(src)) == ["a.tar", "b.tar.gz", "c.zip"]
    assert not (tmp_path.parent / "escape.jpg").exists()
    df = pd.read_parquet(out)
    for archive in ("a.tar", "b.tar.gz", "c.zip"):
        rows = df[df["path"] == str(src / archive)]
        images = sorted(m for m in members if m.endswith(".jpg"))
        scored = sorted(rows.loc[rows["error"].isna(), "member"])
        assert scored == images, archive
        # the same bytes as the loose files: the same hash
        by_member = dict(zip(rows["member"], rows["sha256"]))
        import hashlib
        assert by_member["cells/03.jpg"] == hashlib.sha256(members["cells/03.jpg"]).hexdigest()
    links = df[df["member"] == "cells/link.jpg"]
    assert len(links) == 2 and links["error"].str.startswith("not a regular file").all()


def test_parquet_reads_with_pandas_and_duckdb(trained_run, synth_data, tmp_path):
    duckdb = pytest.importorskip("duckdb")
    out = tmp_path / "pred"
    score(ScoreConfig(model=trained_run["run_dir"], input=str(synth_data), output=str(out)))
    con = duckdb.connect()
    top = con.execute(f"""
        SELECT regexp_extract(path, '([^/]+)/[^/]+$', 1) AS folder, path, malignant_probability
        FROM read_parquet('{out}/*.parquet') WHERE error IS NULL
        QUALIFY row_number() OVER (PARTITION BY folder ORDER BY malignant_probability DESC) <= 3
    """).df()
    assert len(top) == 12 and set(top["folder"]) == {"Benign", "Early", "Pre", "Pro"}
    assert con.execute(f"SELECT count(*) FROM read_parquet('{out}/*.parquet')").fetchone()[0] == 120


@pytest.mark.slow  # a leukray subprocess with its own Ray, killed mid-run
def test_killed_run_resumes_to_exactly_one_row_per_file(trained_run, tmp_path):
    src = tmp_path / "many"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(600):
        Image.fromarray(draw_smear(i % 4, rng, 64)).save(src / f"{i:04d}.jpg")
    out = tmp_path / "pred"
    cmd = [sys.executable, "-m", "leukray.cli", "score", "--model", trained_run["run_dir"], "--input", str(src),
           "--output", str(out), "--rows-per-part", "64", "--batch-size", "16"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("part-*.parquet"))) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its embedded Ray, mid-run
    proc.wait()
    parts_before = len(list(out.glob("part-*.parquet")))
    rows_before = len(pd.read_parquet(out)) if parts_before else 0
    assert 0 < rows_before < 600, "killed midway"
    # A kill during a part's write leaves a half-written temp file behind. Plant one (whether or
    # not this kill left its own): the resume and every reader must never take it for a part.
    part = next(out.glob("part-*.parquet")).read_bytes()
    (out / ".tmp-0123456789abcdef-1.parquet").write_bytes(part[: len(part) // 2])
    stats = score(ScoreConfig(model=trained_run["run_dir"], input=str(src), output=str(out), rows_per_part=64))
    df = pd.read_parquet(out)
    assert len(df) == 600 and df["path"].is_unique
    assert stats["already_scored"] == rows_before and stats["scored"] == 600 - rows_before


def test_explain_writes_heatmaps_referenced_from_rows(trained_run, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        _img(i, 64).save(src / f"{i}.jpg")
    (src / "bad.jpg").write_bytes(b"")
    out = tmp_path / "pred"
    score(ScoreConfig(model=trained_run["run_dir"], input=str(src), output=str(out), explain=True,
                      explain_threshold=0.0))
    df = pd.read_parquet(out)
    good = df[df["error"].isna()]
    assert len(good) == 6 and good["explanation"].notna().all()
    for png in good["explanation"]:
        with Image.open(png) as im:
            assert im.width == 2 * 64  # the input and its overlay, side by side
    assert df.loc[df["error"].notna(), "explanation"].isna().all()
    high = score(ScoreConfig(model=trained_run["run_dir"], input=str(src), output=str(tmp_path / "p2"),
                             explain=True, explain_threshold=1.01))
    assert high["scored"] == 7 and pd.read_parquet(tmp_path / "p2")["explanation"].isna().all()


@pytest.mark.parametrize("decode", ["auto", "tasks"])
def test_only_a_plan_with_decode_tasks_waits_less_for_them(trained_run, tmp_path, monkeypatch, decode):
    """A decode stage of Ray tasks runs with Ray Data's short task wait
    (`runtime.prompt_task_stages`); the default CPU plan, an actor pool, does not need it and
    would only spin the driver's loop faster. Both plans score every file."""
    from contextlib import contextmanager

    from leukray import runtime

    entered = []

    @contextmanager
    def recorded():
        entered.append(True)
        yield

    monkeypatch.setattr(runtime, "prompt_task_stages", recorded)
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(2)
    for i in range(24):
        Image.fromarray(draw_smear(i % 4, rng, 64)).save(src / f"{i:02d}.jpg")
    stats = score(ScoreConfig(model=trained_run["run_dir"], input=str(src), output=str(tmp_path / "out"),
                              batch_size=8, decode=decode))
    assert stats["scored"] == 24 and not stats["errors"]
    assert entered == ([True] if decode == "tasks" else [])
