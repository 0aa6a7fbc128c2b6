"""The interval's offsets: calibrated on held-out errors, then steered by the live coverage."""

import numpy as np
import pytest

from stream_forecaster.intervals import AdaptiveInterval, AnomalyBand, robust_sigma


def coverage(lower, upper, truth):
    return float(((lower <= truth) & (truth <= upper)).mean())


def test_calibration_takes_the_quantiles_of_the_errors_in_units_of_the_scale():
    residuals = np.random.default_rng(0).normal(size=(20000, 2)) * [1.0, 3.0]
    interval = AdaptiveInterval.calibrate((0.1, 0.9), residuals)
    np.testing.assert_allclose(interval.lower, [-1.2816, -3.8448], rtol=0.05)
    np.testing.assert_allclose(interval.upper, [1.2816, 3.8448], rtol=0.05)
    low, high = interval.bounds(np.array([[10.0, 10.0]]), np.array([[2.0, 0.5]]))
    np.testing.assert_allclose(low, 10.0 + np.array([[2.0, 0.5]]) * interval.lower, rtol=1e-6)
    np.testing.assert_allclose(high, 10.0 + np.array([[2.0, 0.5]]) * interval.upper, rtol=1e-6)


@pytest.mark.parametrize("step, expect_adapted", [(0.01, True), (0.0, False)])
def test_coverage_comes_back_to_nominal_when_the_volatility_doubles_halfway(step, expect_adapted):
    rng = np.random.default_rng(1)
    n = 20000
    noise = rng.normal(size=(n, 1)) * np.where(np.arange(n) < n // 2, 1.0, 2.0)[:, None]
    predictions, scale = np.zeros((n, 1)), np.ones((n, 1))  # a scale that does not see the change
    interval = AdaptiveInterval.calibrate((0.1, 0.9), noise[:2000], step)
    lower, upper = interval.replay(predictions, scale, noise)
    before = coverage(lower[2000:n // 2], upper[2000:n // 2], noise[2000:n // 2])
    after = coverage(lower[-n // 4:], upper[-n // 4:], noise[-n // 4:])  # the last quarter, well after the change
    assert before == pytest.approx(0.8, abs=0.03)
    if expect_adapted:
        assert after == pytest.approx(0.8, abs=0.03)
    else:
        assert after < 0.6  # a band fixed at calibration holds about half the truths of twice the spread
    np.testing.assert_array_equal(interval.lower, AdaptiveInterval.calibrate((0.1, 0.9), noise[:2000]).lower)


def test_each_miss_moves_its_own_side_and_a_band_of_no_width_moves_nothing():
    interval = AdaptiveInterval((0.1, 0.9), [-1.0], [1.0], step=0.1)
    interval.update(np.array([[True], [False]]), np.array([[False], [False]]), np.ones((2, 1)))
    assert interval.lower[0] == pytest.approx(-1.0 - 0.1 * (1 - 2 * 0.1))
    assert interval.upper[0] == pytest.approx(1.0 - 0.1 * 2 * 0.1)
    before = interval.lower.copy(), interval.upper.copy()
    interval.update(np.array([[True]]), np.array([[False]]), np.zeros((1, 1)))
    np.testing.assert_array_equal(before[0], interval.lower)
    np.testing.assert_array_equal(before[1], interval.upper)


def test_a_large_batch_moves_the_offsets_no_further_than_a_small_one_would():
    big, small = (AdaptiveInterval((0.1, 0.9), [-1.0], [1.0], step=0.005) for _ in range(2))
    big.update(np.ones((4000, 1), bool), np.ones((4000, 1), bool), np.ones((4000, 1)))  # every truth missed
    small.update(np.ones((64, 1), bool), np.ones((64, 1), bool), np.ones((64, 1)))
    np.testing.assert_allclose(big.lower, small.lower)
    np.testing.assert_allclose(big.upper, small.upper)


def test_offsets_that_would_cross_meet_instead():
    interval = AdaptiveInterval((0.1, 0.9), [-0.01], [0.01], step=0.1)
    # every truth exactly on the forecast: neither side misses, so both offsets move inward
    interval.update(np.zeros((64, 1), bool), np.zeros((64, 1), bool), np.ones((64, 1)))
    assert interval.lower[0] == interval.upper[0] == pytest.approx(0.0)


def test_the_robust_sigma_is_the_normal_spread_and_ignores_the_tails():
    rng = np.random.default_rng(2)
    residuals = rng.normal(size=(20000, 2)) * [1.0, 3.0]
    residuals[:200] = 1e6  # one per cent of wild outliers
    np.testing.assert_allclose(robust_sigma(residuals), [1.0, 3.0], rtol=0.05)
    assert robust_sigma(np.zeros((5, 1)))[0] == 1.0  # never 0: scores divide by it


def test_the_anomaly_band_never_lies_inside_the_interval_and_judges_no_window_without_spread():
    band = AnomalyBand(AdaptiveInterval((0.005, 0.995), [-2.0], [2.0]), [0.5])
    forecast, scale = np.array([[10.0], [10.0], [10.0]]), np.array([[1.0], [1.0], [0.0]])
    truth = np.array([[12.5], [11.0], [30.0]])
    lower, upper = np.array([[7.0], [np.nan], [np.nan]]), np.array([[13.0], [np.nan], [np.nan]])
    outside, band_lower, band_upper, score = band.judge(forecast, scale, truth, lower, upper)
    assert outside.tolist() == [False, False, False]  # inside the wider interval; inside the band; no spread
    assert band_lower[:, 0].tolist() == [7.0, 8.0, 10.0] and band_upper[:, 0].tolist() == [13.0, 12.0, 10.0]
    assert score[:2, 0].tolist() == [5.0, 2.0]  # residual / (scale * sigma)
    outside, *_ = band.judge(forecast, scale, np.array([[13.5], [7.5], [30.0]]), lower, upper)
    assert outside.tolist() == [True, True, False]
