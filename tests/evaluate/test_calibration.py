"""Temperature scaling and the operating point (dcube.evaluate.calibration), both fitted on validation."""

import numpy as np
import pytest

from dcube.evaluate.calibration import (apply_temperature, calibrate, calibration_warning, expected_calibration_error,
                                        fit_temperature, nll, operating_point, pick_threshold, plot_reliability)


def _overconfident(n, seed):
    """Scores whose true posterior is sigmoid(s), reported as sigmoid(4 s): far too confident."""
    rng = np.random.default_rng(seed)
    s = rng.normal(0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-s))).astype(int)
    p1 = 1 / (1 + np.exp(-4 * s))
    return np.stack([1 - p1, p1], 1), y


def test_temperature_scaling_lowers_validation_nll_and_keeps_decisions():
    vp, vy = _overconfident(400, 0)
    t = fit_temperature(vp, vy)
    assert 3.0 < t < 5.5  # the true factor is 4
    after = apply_temperature(vp, t)
    assert nll(after, vy) < nll(vp, vy) - 0.1
    assert (after.argmax(1) == vp.argmax(1)).all()
    tp, ty = _overconfident(400, 1)
    assert expected_calibration_error(apply_temperature(tp, t), ty) < expected_calibration_error(tp, ty)


def test_threshold_meets_the_target_sensitivity_on_validation():
    vp, vy = _overconfident(300, 2)
    for target in (0.8, 0.95, 0.99):
        thr = pick_threshold(vp[:, 1], vy, target)
        op = operating_point(vp[:, 1], vy, thr)
        assert op["sensitivity"] >= target
        assert operating_point(vp[:, 1], vy, np.nextafter(thr, 1))["sensitivity"] < target  # the largest such t
        lo, hi = op["specificity_ci95"]
        assert lo <= op["specificity"] <= hi


def test_calibrate_reports_before_after_and_refuses_multiclass_operating_points(tmp_path):
    vp, vy = _overconfident(200, 3)
    tp, ty = _overconfident(200, 4)
    cal = calibrate(vp, vy, tp, ty, ["neg", "pos"], target_sensitivity=0.9)
    assert cal["val"]["nll_after"] < cal["val"]["nll_before"]
    assert cal["operating_point"]["val"]["sensitivity"] >= 0.9 and "test" in cal["operating_point"]
    with pytest.raises(ValueError, match="binary"):
        calibrate(np.full((4, 3), 1 / 3), [0, 1, 2, 0], np.full((4, 3), 1 / 3), [0, 1, 2, 0], list("abc"), 0.9)
    path = plot_reliability(tp, apply_temperature(tp, cal["temperature"]), ty, tmp_path / "rel.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def _underconfident(n, seed):
    """Scores whose true posterior is sigmoid(4 s), reported as sigmoid(s): far too timid."""
    rng = np.random.default_rng(seed)
    s = rng.normal(0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-4 * s))).astype(int)
    p1 = 1 / (1 + np.exp(-s))
    return np.stack([1 - p1, p1], 1), y


def test_warns_when_the_validation_temperature_worsens_test_calibration():
    vp, vy = _overconfident(400, 0)
    same = calibrate(vp, vy, *_overconfident(400, 1), ["a", "b"])
    assert calibration_warning(same) is None  # test split like validation: scaling helps there too
    # validation overconfident, test underconfident: the fitted T > 1 softens the test split further
    shifted = calibrate(vp, vy, *_underconfident(400, 1), ["a", "b"])
    t = shifted["test"]
    assert t["ece_after"] > t["ece_before"]
    line = calibration_warning(shifted)
    assert line is not None and f"{t['ece_before']:.4f} -> {t['ece_after']:.4f}" in line and "reliability" in line
