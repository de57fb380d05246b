"""Temperature scaling and calibration metrics (leukray.calibration)."""

import json

import numpy as np
import pytest

from leukray import calibration as cal


def _calibrated_logits(n=20000, classes=4, seed=0):
    """Logits whose softmax is the true label distribution (labels drawn from it)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, (n, classes))
    p = cal.probabilities(logits)
    labels = (rng.random((n, 1)) > p.cumsum(axis=1)).sum(axis=1)
    return logits, labels


def test_overconfident_logits_get_t_above_one_and_ece_drops():
    logits, labels = _calibrated_logits(seed=1)
    sharp = logits * 3.0  # the network is 3x too sure
    t = cal.fit_temperature(sharp, labels)
    assert 2.7 < t < 3.3
    before = cal.expected_calibration_error(cal.probabilities(sharp), labels)
    after = cal.expected_calibration_error(cal.probabilities(sharp, t), labels)
    assert before > 0.1
    assert after < 0.02
    assert cal.nll(sharp, labels, t) < cal.nll(sharp, labels)


def test_calibrated_logits_keep_t_near_one():
    logits, labels = _calibrated_logits(seed=2)
    assert cal.fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.05)


def test_underconfident_logits_get_t_below_one():
    logits, labels = _calibrated_logits(seed=3)
    assert cal.fit_temperature(logits / 2.0, labels) == pytest.approx(0.5, abs=0.05)


def test_fit_is_deterministic():
    logits, labels = _calibrated_logits(n=2000, seed=4)
    assert cal.fit_temperature(logits * 2, labels) == cal.fit_temperature(logits * 2, labels)


def test_temperature_never_changes_the_predicted_class():
    logits, _ = _calibrated_logits(n=500, seed=5)
    for t in (0.3, 1.0, 4.0):
        assert (cal.apply_temperature(logits, t).argmax(1) == logits.argmax(1)).all()


def test_apply_temperature_works_on_torch_and_rejects_nonpositive():
    torch = pytest.importorskip("torch")
    out = cal.apply_temperature(torch.tensor([[2.0, 4.0]]), 2.0)
    assert out.tolist() == [[1.0, 2.0]]
    with pytest.raises(ValueError):
        cal.apply_temperature(np.ones((1, 2)), 0.0)


def test_ece_of_hand_computed_example():
    # Confidences 0.75 (right), 0.75 (wrong), 0.5 (right), 1.0 (right):
    # bin (11/15, 12/15]: 2 rows, accuracy 0.5, confidence 0.75 -> 2/4 * 0.25 = 0.125
    # bin (7/15, 8/15]:   1 row,  accuracy 1.0, confidence 0.5  -> 1/4 * 0.5  = 0.125
    # bin (14/15, 1]:     1 row,  accuracy 1.0, confidence 1.0  -> 0
    probs = np.array([[0.75, 0.25, 0.0], [0.75, 0.25, 0.0], [0.5, 0.25, 0.25], [0.0, 0.0, 1.0]])
    labels = np.array([0, 1, 0, 2])
    assert cal.expected_calibration_error(probs, labels) == 0.25
    rel = cal.reliability_bins(probs, labels)
    assert rel["count"][11] == 2 and rel["count"][7] == 1 and rel["count"][14] == 1
    assert sum(rel["count"]) == 4
    assert rel["accuracy"][11] == 0.5 and rel["confidence"][11] == 0.75
    assert rel["accuracy"][0] is None


def test_brier_and_log_loss_by_hand():
    probs = np.array([[0.5, 0.5], [1.0, 0.0]])
    labels = np.array([0, 1])
    # row 0: 0.25 + 0.25; row 1: 1 + 1 -> mean 1.25
    assert cal.brier_score(probs, labels) == 1.25
    assert cal.log_loss(probs[:1], labels[:1]) == pytest.approx(np.log(2))
    assert np.isfinite(cal.log_loss(probs, labels))  # p = 0 is clipped, not inf


def test_summary_is_plain_json_with_before_and_after():
    logits, labels = _calibrated_logits(n=3000, seed=6)
    sharp = logits * 2.5
    t = cal.fit_temperature(sharp, labels)
    s = json.loads(json.dumps(cal.calibration_summary(sharp, labels, t)))
    assert s["temperature"] == pytest.approx(t)
    assert s["after"]["ece"] < s["before"]["ece"]
    assert s["after"]["log_loss"] < s["before"]["log_loss"]
    assert s["after"]["accuracy"] == s["before"]["accuracy"]
    assert len(s["reliability"]["after"]["count"]) == cal.ECE_BINS == s["bins"]


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        cal.fit_temperature(np.ones(4), [0, 1, 0, 1])
    with pytest.raises(ValueError):
        cal.nll(np.ones((3, 2)), [0, 1])
