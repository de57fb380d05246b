"""Model-free quality checks, the learnt colour model and the OOD threshold (leukray.quality)."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from leukray import quality as q
from leukray.data import preprocess
from leukray.synthetic import draw_smear


def _load(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def smears(synth_data):
    """(fit, held-out) synthetic smears: files 001-015 of each class, and 016-030."""
    files = sorted(synth_data.glob("*/*.jpg"))
    fit = [_load(p) for p in files if int(p.stem[-3:]) <= 15]
    held = [_load(p) for p in files if int(p.stem[-3:]) > 15]
    return fit, held


@pytest.fixture(scope="module")
def colour_model(smears):
    return q.fit_colour_model(smears[0])


def test_held_out_smears_stay_unflagged(smears, colour_model):
    flagged = [q.quality_flags(im, colour_model=colour_model) for im in smears[1]]
    assert sum(not f for f in flagged) / len(flagged) >= 0.95


def test_smear_resized_like_the_pipeline_is_unflagged(smears, colour_model):
    buf = io.BytesIO()
    Image.fromarray(smears[1][0]).save(buf, format="PNG")
    small, info = preprocess(buf.getvalue(), 128)
    assert q.quality_flags(small, info["width"], info["height"], colour_model) == []


def test_tiny_images_are_too_small():
    rng = np.random.default_rng(0)
    smear = draw_smear(0, rng, 224)
    assert q.TOO_SMALL in q.quality_flags(smear[:1, :1])
    assert q.TOO_SMALL in q.quality_flags(smear[100:108, 100:108])
    assert q.TOO_SMALL not in q.quality_flags(smear)


def test_original_size_decides_size_and_aspect():
    smear = draw_smear(1, np.random.default_rng(1), 128)  # as if resized from the file
    assert q.quality_flags(smear, 128, 128) == []
    assert q.quality_flags(smear, 1000, 120) == [q.EXTREME_ASPECT]
    assert q.quality_flags(smear, 40, 40) == [q.TOO_SMALL]


def test_strip_cut_from_a_smear_has_extreme_aspect():
    smear = draw_smear(2, np.random.default_rng(2), 224)
    assert q.quality_flags(smear[:, 80:144]) == [q.EXTREME_ASPECT]  # 64 x 224: 3.5 : 1
    assert q.quality_flags(smear[:, 40:184]) == []  # 144 x 224: fine


def test_blank_scans_with_sensor_noise_are_uniform():
    rng = np.random.default_rng(3)
    for level in (250, 3):
        img = np.clip(level + rng.normal(0, 2, (300, 400, 3)), 0, 255).astype(np.uint8)
        assert q.UNIFORM in q.quality_flags(img)


def test_grayscale_copy_of_a_smear_is_grayscale():
    smear = draw_smear(3, np.random.default_rng(4), 224)
    gray = np.asarray(Image.fromarray(smear).convert("L").convert("RGB"))
    assert q.quality_flags(gray) == [q.GRAYSCALE]
    assert q.GRAYSCALE not in q.quality_flags(smear)
    assert q.quality_flags(gray[..., 0]) == [q.GRAYSCALE]  # a 2-D array is gray too


def test_noise_and_photos_need_the_colour_model(colour_model):
    noise = np.random.default_rng(5).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    assert q.quality_flags(noise) == []  # the model-free checks alone cannot tell
    assert q.quality_flags(noise, colour_model=colour_model) == [q.COLOUR_OUTLIER]
    sky = np.zeros((224, 224, 3), np.uint8)
    sky[:120] = (100, 160, 240)
    sky[120:] = (60, 140, 50)
    assert q.quality_flags(sky, colour_model=colour_model) == [q.COLOUR_OUTLIER]


def test_colour_model_is_plain_types_and_survives_torch_weights_only(tmp_path, colour_model, smears):
    torch = pytest.importorskip("torch")
    assert json.loads(json.dumps(colour_model)) == colour_model
    torch.save({"colour_model": colour_model}, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=True)["colour_model"]
    im = smears[1][0]
    assert q.colour_distance(im, loaded) == q.colour_distance(im, colour_model)
    assert colour_model["n_images"] == len(smears[0])
    assert len(colour_model["precision"]) == len(q.FEATURES)


def test_threshold_is_the_largest_cross_fitted_distance_when_images_are_few(smears, colour_model):
    feats = np.stack([q.image_features(im) for im in smears[0]])
    held_out = q.cross_fitted_distances(feats, np.arange(len(feats)))
    assert colour_model["threshold"] == held_out.max()  # 60 images: too few for 99.8 % at 95 %
    assert colour_model["keep"] == q.COLOUR_KEEP and colour_model["n_groups"] == len(feats)
    assert colour_model["confidence_achieved"] == pytest.approx(1 - q.COLOUR_KEEP ** len(feats))


def test_with_enough_images_the_bound_is_an_order_statistic_below_the_largest():
    feats = np.random.default_rng(0).normal(size=(4000, len(q.FEATURES)))
    model = q.colour_model_from_features(feats)
    held_out = np.sort(q.cross_fitted_distances(feats, np.arange(4000)))
    rank = int(np.searchsorted(held_out, model["threshold"], "right"))
    assert model["threshold"] < held_out[-1] and rank < 4000
    assert model["confidence_achieved"] >= q.COLOUR_CONFIDENCE  # the smallest rank that reaches it
    assert q.threshold_confidence(4000, rank - 1, q.COLOUR_KEEP) < q.COLOUR_CONFIDENCE


def test_cross_fitted_distance_comes_from_a_model_without_the_rows_group(smears):
    from sklearn.covariance import LedoitWolf

    feats = np.stack([q.image_features(im) for im in smears[0]])
    groups = np.arange(len(feats)) % 5
    got = q.cross_fitted_distances(feats, groups, folds=5)  # 5 groups, 5 folds: one group out each
    for g in range(5):
        lw = LedoitWolf().fit(feats[groups != g])
        np.testing.assert_allclose(got[groups == g], np.sqrt(lw.mahalanobis(feats[groups == g])), rtol=1e-9)


def _slides(stain_shift: float) -> tuple[list[np.ndarray], np.ndarray]:
    """6 slides of 10 smears; the last one's green channel scaled by `stain_shift`."""
    images = [draw_smear(i % 4, np.random.default_rng(i), 224) for i in range(60)]
    groups = np.repeat(np.arange(6), 10)
    scale = np.array([1.0, stain_shift, 1.0])
    return [np.clip(im * scale, 0, 255).astype(np.uint8) if g == 5 else im
            for im, g in zip(images, groups)], groups


def test_slide_groups_widen_the_threshold_to_cover_a_slide_unlike_the_others():
    images, groups = _slides(0.85)
    by_slide, by_image = q.fit_colour_model(images, groups), q.fit_colour_model(images)
    assert by_slide["n_groups"] == 6 and by_slide["folds"] == 6 and by_image["folds"] == q.COLOUR_FOLDS
    # held out image by image, the odd slide's other images vouch for it; held out by slide
    # nothing does, which is how a new slide meets the model
    assert by_slide["threshold"] > 1.3 * by_image["threshold"]
    assert all(q.colour_distance(im, by_slide) <= by_slide["threshold"] for im in images)
    assert q.fit_colour_model(*_slides(0.8))["threshold"] > by_slide["threshold"]


def test_colour_model_of_another_version_or_too_few_images_is_refused(smears, colour_model):
    with pytest.raises(ValueError, match="another leukray version"):
        q.colour_distance(smears[1][0], {**colour_model, "version": 0})
    with pytest.raises(q.TooFewImages, match="need more than"):
        q.fit_colour_model(smears[0][:3])
    with pytest.raises(q.TooFewImages, match="in at least 2 groups, got 1"):
        q.fit_colour_model(smears[0], np.zeros(len(smears[0])))
    feats = np.stack([q.image_features(im) for im in smears[0]])
    with pytest.raises(q.TooFewImages, match="one fold leaves 5 of 60"):  # one group holds 55 of 60
        q.colour_model_from_features(feats, np.r_[np.zeros(55), np.arange(1, 6)])
    with pytest.raises(ValueError, match="group ids"):
        q.fit_colour_model(smears[0], [0, 1])


def test_flags_come_in_the_documented_order():
    img = np.full((10, 400, 3), 128, np.uint8)
    assert q.quality_flags(img) == [q.TOO_SMALL, q.EXTREME_ASPECT, q.UNIFORM, q.GRAYSCALE]


def test_energy_score_by_hand():
    e = q.energy_score([[0.0, 0.0], [10.0, 0.0]])
    assert e[0] == pytest.approx(-np.log(2))
    assert e[1] == pytest.approx(-(10 + np.log1p(np.exp(-10))))
    assert e[1] < e[0]  # a confident, large-logit row is more in-distribution
    with pytest.raises(ValueError):
        q.energy_score([1.0, 2.0])


@pytest.mark.parametrize("n", [1, 7, 50, 100, 1000, 1234])
def test_choose_threshold_keeps_at_least_the_share(n):
    scores = np.random.default_rng(n).normal(size=n)
    t = q.choose_threshold(scores, keep=0.98)
    kept = float((scores <= t).mean())
    assert kept >= 0.98
    if n >= 1000:
        assert kept < 0.99  # not simply the maximum


def test_choose_threshold_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one score"):
        q.choose_threshold([], 0.98)
    with pytest.raises(ValueError, match="0 < keep <= 1"):
        q.choose_threshold([1.0], 0.0)
    with pytest.raises(ValueError, match="0 < confidence < 1"):
        q.choose_threshold([1.0], 0.98, confidence=1.0)


def test_threshold_with_confidence_keeps_the_share_of_new_smears_that_often():
    """Drawn from U(0, 1), a threshold t keeps exactly t of all new scores. Over 2,000 draws
    of 440 validation scores, the bound keeps >= 98 % of new scores in >= 95 % of draws (the
    plain quantile: about half of them), and it is the smallest order statistic that does."""
    rng = np.random.default_rng(0)
    draws = rng.random((2000, 440))
    bound = np.array([q.choose_threshold(d, 0.98, confidence=0.95) for d in draws])
    plain = np.array([q.choose_threshold(d, 0.98) for d in draws])
    # the binomial is discrete: the smallest k reaching 0.95 gives 0.977 (one lower: 0.94)
    k = next(k for k in range(1, 441) if q.threshold_confidence(440, k, 0.98) >= 0.95)
    assert q.threshold_confidence(440, k - 1, 0.98) < 0.95 <= q.threshold_confidence(440, k, 0.98)
    assert (bound == np.sort(draws, 1)[:, k - 1]).all() and k < 440  # not simply the maximum at n = 440
    assert (bound >= 0.98).mean() > 0.965  # 2,000 draws: sd 0.003
    assert 0.3 < (plain >= 0.98).mean() < 0.7


def test_too_few_scores_for_the_confidence_give_the_maximum_and_say_how_sure():
    scores = np.arange(100.0)
    assert q.choose_threshold(scores, 0.99, confidence=0.95) == 99.0
    assert q.threshold_confidence(100, 100, 0.99) == pytest.approx(1 - 0.99 ** 100)  # about 0.63


@pytest.mark.parametrize("shape,high", [((224, 224), 256), ((7, 3), 256), ((1, 1), 256), ((100, 50), 3), ((2, 2), 256)])
def test_histogram_statistics_equal_numpys(shape, high):
    """The checks read median, percentile, mean and spread off a 256-level histogram (fast);
    they must be NumPy's values, or the colour models already in model files would shift."""
    values = np.random.default_rng(sum(shape)).integers(0, high, shape).astype(np.int16)
    h = q._Hist(np.bincount(values.ravel(), minlength=256))
    assert h.median() == np.median(values)
    assert h.percentile(99) == pytest.approx(np.percentile(values, 99), abs=1e-12)
    assert h.mean() == pytest.approx(values.mean(), rel=1e-12)
    assert h.std() == pytest.approx(values.std(), rel=1e-9, abs=1e-12)
    assert h.share_above(24) == (values > 24).mean()


def _numpy_reference(image: np.ndarray, colour_model: dict | None) -> tuple[np.ndarray, list[str]]:
    """The checks as plain NumPy states them, pixel by pixel: what the histogram-based
    statistics of `leukray.quality` must reproduce exactly, or stored colour models would shift."""
    arr = image[..., None] if image.ndim == 2 else image
    step = max(1, -(-max(arr.shape[:2]) // q.WORK_SIDE))
    sub = arr[::step, ::step]
    planes = [sub[..., min(c, sub.shape[2] - 1)].astype(np.int16) for c in range(3)]
    chroma = np.max(planes, axis=0) - np.min(planes, axis=0)
    feats = np.array([*(p.mean() for p in planes), *(p.std() for p in planes), chroma.mean(),
                      np.percentile(chroma, 99)])
    h, w = arr.shape[:2]
    flags = []
    if min(w, h) < q.MIN_SIDE:
        flags.append(q.TOO_SMALL)
    if max(w, h) > q.MAX_ASPECT * min(w, h):
        flags.append(q.EXTREME_ASPECT)
    differs = np.any([np.abs(p - np.median(p)) > q.LEVEL_TOLERANCE for p in planes], axis=0)
    if differs.mean() < q.MIN_CONTENT_SHARE:
        flags.append(q.UNIFORM)
    if (chroma > q.LEVEL_TOLERANCE).mean() < q.MIN_CONTENT_SHARE:
        flags.append(q.GRAYSCALE)
    if colour_model is not None:
        diff = feats - np.asarray(colour_model["mean"])
        if np.sqrt(max(diff @ np.asarray(colour_model["precision"]) @ diff, 0.0)) > colour_model["threshold"]:
            flags.append(q.COLOUR_OUTLIER)
    return feats, flags


def _reference_images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    smear = draw_smear(1, rng, 224)
    almost_blank = np.full((224, 224, 3), 240, np.uint8)
    almost_blank[100:101, 100:105] = (120, 40, 160)  # 5 stained pixels: below MIN_CONTENT_SHARE
    # 224 x 224 has 50,176 pixels; MIN_CONTENT_SHARE of them is 25.1. Pixels off in one channel
    # each: 3 x 10 differ (not uniform); the same 13 pixels off in every channel: 13 (uniform).
    # Neither is decided by one channel's count nor by the sum over channels (`quality._uniform`).
    one_channel_each, all_channels = np.full((224, 224, 3), 120, np.uint8), np.full((224, 224, 3), 120, np.uint8)
    for c in range(3):
        one_channel_each[c, :10, c] = 200
    all_channels[50, :13] = 10
    return {"smear": smear, "noise": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            "30 pixels off, each in one channel": one_channel_each, "13 pixels off in all channels": all_channels,
            "large photo (subsampled)": rng.integers(0, 256, (700, 1000, 3), dtype=np.uint8),
            "gray 2-D": rng.integers(90, 110, (200, 180), dtype=np.uint8), "RGBA": rng.integers(0, 256, (80, 90, 4),
                                                                                            dtype=np.uint8),
            "1 px": np.full((1, 1, 3), 7, np.uint8), "strip": np.repeat(smear[:20], 1, 0),
            "almost blank": almost_blank, "median on a half level": np.repeat(
                np.array([[[0, 0, 0]], [[49, 49, 49]]], np.uint8), 50, 0).repeat(100, 1)}


@pytest.mark.parametrize("name", list(_reference_images()))
def test_checks_equal_the_numpy_statement_of_them(name):
    image = _reference_images()[name]
    colour_model = q.fit_colour_model([draw_smear(i % 4, np.random.default_rng(i), 224) for i in range(20)])
    colour_model["threshold"] = float(np.median([q.colour_distance(im, colour_model)
                                                 for im in _reference_images().values()]))  # some in, some out
    feats, flags = _numpy_reference(image, colour_model)
    assert q.image_features(image) == pytest.approx(feats, rel=1e-12, abs=1e-12)
    assert q.quality_flags(image, colour_model=colour_model) == flags
    if image.ndim == 3 and image.shape[2] == 3:  # a PIL image is accepted as well
        assert q.quality_flags(Image.fromarray(image), colour_model=colour_model) == flags
