"""The offline non-smear set (leukray.nonsmears) and how the quality checks treat it."""

import numpy as np
import pytest
from PIL import Image

from leukray import nonsmears as ns
from leukray import quality as q
from leukray.data import preprocess
from leukray.synthetic import draw_smear


@pytest.fixture(scope="module")
def nonsmear_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nonsmears")
    ns.write_nonsmears(folder, seed=0, per_kind=5)
    return folder


def test_set_has_40_images_of_every_kind_with_a_manifest(nonsmear_dir):
    rows = ns.read_manifest(nonsmear_dir)
    assert len(rows) >= 40
    kinds = {r["kind"] for r in rows}
    assert kinds == set(ns.KINDS) and len(kinds) >= 8
    for kind in kinds - {"photo", "photo_gray"}:
        assert sum(r["kind"] == kind for r in rows) == 5
    assert sum(r["kind"] == "photo" for r in rows) == len(ns.PHOTOS)
    on_disk = {p.name for p in nonsmear_dir.iterdir()} - {ns.MANIFEST}
    assert on_disk == {r["file"] for r in rows}


def test_every_file_decodes_in_the_pipeline_with_its_manifest_size(nonsmear_dir):
    for row in ns.read_manifest(nonsmear_dir):
        with open(row["path"], "rb") as f:
            arr, info = preprocess(f.read(), 64)
        assert arr.shape == (64, 64, 3)
        assert (info["width"], info["height"]) == (int(row["width"]), int(row["height"])), row["file"]


def test_same_seed_same_images_other_seed_differs():
    a = [img for _, _, img in ns.generate(seed=1, per_kind=2, kinds=["noise"])]
    b = [img for _, _, img in ns.generate(seed=1, per_kind=2, kinds=["noise"])]
    c = [img for _, _, img in ns.generate(seed=2, per_kind=2, kinds=["noise"])]
    assert len(a) == 2
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_given_smears_are_the_source_of_grayscale_copies():
    smear = draw_smear(0, np.random.default_rng(0), 96)
    grays = [img for _, _, img in ns.generate(per_kind=2, smears=[smear], kinds=["grayscale"])]
    expected = np.asarray(Image.fromarray(smear).convert("L").convert("RGB"))
    assert np.array_equal(grays[0], expected)
    tiny = [img for _, _, img in ns.generate(per_kind=5, smears=[smear], kinds=["tiny"])]
    assert [t.shape[:2] for t in tiny] == [(s, s) for s in (1, 2, 8, 16, 32)]


def test_nonsmears_are_flagged_and_synthetic_smears_are_not(nonsmear_dir, synth_data):
    """The acceptance criterion of the checks alone, on synthetic smears instead of real ones.

    Held-out smears: >= 95 % here, as the colour model is fitted on only 60 images of four
    very distinct synthetic styles; the 98 % target is measured on 300 real images.
    """
    files = sorted(synth_data.glob("*/*.jpg"))
    fit = [np.asarray(Image.open(p).convert("RGB")) for p in files if int(p.stem[-3:]) <= 15]
    held = [np.asarray(Image.open(p).convert("RGB")) for p in files if int(p.stem[-3:]) > 15]
    model = q.fit_colour_model(fit)
    rows = ns.read_manifest(nonsmear_dir)
    flagged = [bool(q.quality_flags(np.asarray(Image.open(r["path"]).convert("RGB")), colour_model=model))
               for r in rows]
    table = {t["kind"]: t for t in ns.rejection_table([r["kind"] for r in rows], flagged)}
    assert table["all"]["share"] >= 0.95, table
    assert sum(not q.quality_flags(im, colour_model=model) for im in held) / len(held) >= 0.95


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown non-smear kinds"):
        next(ns.generate(kinds=["selfie"]))


def test_rejection_table_by_hand():
    table = ns.rejection_table(["a", "b", "a", "b"], [True, False, True, True])
    assert table == [
        {"kind": "a", "images": 2, "flagged": 2, "share": 1.0},
        {"kind": "b", "images": 2, "flagged": 1, "share": 0.5},
        {"kind": "all", "images": 4, "flagged": 3, "share": 0.75},
    ]


def test_cli_help_is_help_and_write_writes(tmp_path, monkeypatch, capsys):
    """`--help` printed help, not a folder named `--help` full of images (it did)."""
    from leukray.nonsmears import main

    monkeypatch.chdir(tmp_path)
    for argv in (["--help"], ["write", "--help"], ["check", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    assert list(tmp_path.iterdir()) == []
    assert "usage: python -m leukray.nonsmears" in capsys.readouterr().out
    main(["write", "set", "--per-kind", "1"])
    assert (tmp_path / "set" / "manifest.csv").is_file() and len(list((tmp_path / "set").iterdir())) > 5
