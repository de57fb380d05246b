"""The one preprocessing function and folder listing."""

import io

import numpy as np
import pytest
from PIL import Image

from leukray.data import ImageError, decode, list_labeled_images, preprocess, preprocess_batch


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


RGB = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))


@pytest.mark.parametrize("mode,fmt", [
    ("RGB", "JPEG"), ("L", "PNG"), ("RGBA", "PNG"), ("P", "GIF"), ("CMYK", "JPEG"), ("RGB", "BMP"),
    ("RGB", "TIFF"), ("I;16", "PNG"), ("1", "PNG"),
])
def test_preprocess_modes_give_rgb_uint8(mode, fmt):
    img = RGB.convert(mode) if mode != "I;16" else Image.fromarray((np.arange(2000).reshape(40, 50) * 30).astype(np.uint16))
    arr, info = preprocess(_encode(img, fmt), 32)
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
    assert (info["width"], info["height"]) == (50, 40)
    if mode == "I;16":  # 16-bit must be stretched, not clipped to white
        assert arr.min() < 10 and arr.max() > 245


def test_preprocess_is_deterministic_and_resizes():
    data = _encode(RGB, "JPEG")
    a, _ = preprocess(data, 24)
    b, _ = preprocess(data, 24)
    assert np.array_equal(a, b)
    tiny, _ = preprocess(_encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), 16)
    assert tiny.shape == (16, 16, 3) and (tiny[..., 0] == 200).all()


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"hello, I am text", "not an image"),
    (_encode(RGB, "JPEG")[:200], "corrupt or truncated"),
])
def test_preprocess_errors(data, reason):
    with pytest.raises(ImageError, match=reason):
        preprocess(data, 32)


def test_decompression_bomb_is_refused_without_decoding():
    # A PNG header declaring 100000 x 100000 pixels: must fail on the header, fast.
    bomb = _encode(Image.new("1", (10000, 10000)), "PNG")
    with pytest.raises(ImageError, match="decompression bomb"):
        preprocess(bomb, 32)


def test_preprocess_batch_keeps_bad_rows(tmp_path):
    good = tmp_path / "a.jpg"
    good.write_bytes(_encode(RGB, "JPEG"))
    bad = tmp_path / "b.jpg"
    bad.write_text("not a jpeg")
    out = preprocess_batch({"path": np.array([str(good), str(bad), str(tmp_path / "missing.jpg")], dtype=object)}, 16)
    assert out["image"].shape == (3, 16, 16, 3)
    assert out["error"][0] is None and out["error"][1] == "not an image"
    assert out["error"][2].startswith("unreadable file")
    assert len(out["sha256"][0]) == 64 and out["bytes"][0] == good.stat().st_size


def test_list_labeled_images_merges_case_and_skips_non_images(tmp_path):
    for folder, name in [("Benign", "1.jpg"), ("benign", "2.jpg"), ("Pro", "3.png"), ("Pro/sub", "4.jpg")]:
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / name).write_bytes(_encode(RGB, "PNG"))
    (tmp_path / "Pro" / "notes.txt").write_text("x")
    listing = list_labeled_images(tmp_path)
    assert listing.classes == ["Benign", "Pro"]
    assert sorted(r["label"] for r in listing.records) == ["Benign", "Benign", "Pro", "Pro"]
    assert listing.skipped == ["Pro/notes.txt"]


def test_list_labeled_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        list_labeled_images(tmp_path / "nope")
    with pytest.raises(ValueError, match="no class sub-folders"):
        list_labeled_images(tmp_path)


def test_exif_orientation_is_applied_as_viewers_show_it():
    arr = np.zeros((32, 48, 3), np.uint8)
    arr[:, :24] = (220, 20, 20)  # red left, blue right
    arr[:, 24:] = (20, 20, 220)
    exif = Image.Exif()
    exif[0x0112] = 3  # Orientation: rotated 180 degrees
    out, info = preprocess(_encode(Image.fromarray(arr), "JPEG", exif=exif.tobytes()), 32)
    assert (info["width"], info["height"]) == (48, 32)  # as declared by the file
    left, right = out[:, :12].reshape(-1, 3).mean(0), out[:, -12:].reshape(-1, 3).mean(0)
    assert left[2] > 150 > left[0] and right[0] > 150 > right[2], (left, right)


def test_exif_rotation_by_90_degrees_swaps_the_sides_of_the_decoded_image():
    """Orientation 6 (camera held sideways): upright means turned 90 degrees clockwise, so
    the decoded image, which the quality checks see before resizing, is taller than wide."""
    arr = np.zeros((32, 48, 3), np.uint8)
    arr[:, :24] = (220, 20, 20)  # red left, blue right: red on top once turned clockwise
    arr[:, 24:] = (20, 20, 220)
    exif = Image.Exif()
    exif[0x0112] = 6
    im, info = decode(_encode(Image.fromarray(arr), "JPEG", exif=exif.tobytes()), 32)
    assert (info["width"], info["height"]) == (48, 32) and im.size == (32, 48) and im.mode == "RGB"
    up = np.asarray(im)
    top, bottom = up[:12].reshape(-1, 3).mean(0), up[-12:].reshape(-1, 3).mean(0)
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0], (top, bottom)
