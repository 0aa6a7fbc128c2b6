"""Prediction intervals that keep their coverage: conformal offsets, tracked online.

The bounds are ``forecast + scale · offset``, the offsets in units of each
forecast's scale (the window's own spread for a window-normalised model), so
one pair of offsets serves sensors of any size. They start as quantiles of
errors on data the model did not train on (split conformal) and then follow
the live errors: each scored forecast moves the lower offset down when the
truth fell below the band and up otherwise, by ``step`` times its miss rate's
distance from nominal (quantile tracking, the form of adaptive conformal
inference that needs no quantile table). A change of regime that the scale
alone does not absorb is caught within a few hundred scored forecasts.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["BATCH", "AdaptiveInterval", "AnomalyBand", "robust_sigma"]

BATCH = 64  # scored forecasts whose misses one update counts in full


class AdaptiveInterval:
    """Lower and upper offsets per target, in units of each forecast's scale, tracked online."""

    def __init__(self, quantiles: Sequence[float], lower: ArrayLike, upper: ArrayLike, step: float = 0.0):
        self.quantiles = (float(quantiles[0]), float(quantiles[1]))
        self.lower = np.array(lower, dtype=np.float64)
        self.upper = np.array(upper, dtype=np.float64)
        self.step = float(step)

    @classmethod
    def calibrate(cls, quantiles: Sequence[float], residuals: np.ndarray, step: float = 0.0) -> "AdaptiveInterval":
        """Offsets at ``quantiles`` of ``residuals`` ``[n, targets]`` (truth - forecast, in units of the scale)."""
        lower, upper = (np.quantile(residuals, q, axis=0) for q in quantiles[:2])
        return cls(quantiles, lower, upper, step)

    def copy(self) -> "AdaptiveInterval":
        return AdaptiveInterval(self.quantiles, self.lower, self.upper, self.step)

    def bounds(self, predictions: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(lower, upper)`` around ``predictions`` ``[n, targets]`` whose scales are ``scale``."""
        predictions = np.asarray(predictions, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):  # a forecast at float32's edge: its bound is not finite
            return ((predictions + scale * self.lower).astype(np.float32),
                    (predictions + scale * self.upper).astype(np.float32))

    def update(self, below: np.ndarray, above: np.ndarray, scale: np.ndarray) -> None:
        """Learn from scored forecasts: ``below``/``above`` ``[n, targets]`` say where each truth fell outside.

        Forecasts of scale 0 (a constant window) have a band of no width that
        no offset widens: they do not move the offsets.
        """
        if not self.step or not len(below):
            return
        counted = scale > 0
        n = counted.sum(axis=0)
        # a batch moves the offsets as far as BATCH forecasts at most: a fleet's batch of thousands, all scored
        # against the same offsets, would otherwise overshoot many times over
        step = self.step * np.minimum(1.0, BATCH / np.maximum(n, 1))
        self.lower -= step * ((below & counted).sum(axis=0) - n * self.quantiles[0])
        self.upper += step * ((above & counted).sum(axis=0) - n * (1.0 - self.quantiles[1]))
        crossed = self.lower > self.upper  # the quantiles of a series that mostly repeats its last reading meet
        self.lower[crossed] = self.upper[crossed] = (self.lower[crossed] + self.upper[crossed]) / 2

    def replay(self, predictions: np.ndarray, scale: np.ndarray, truth: np.ndarray,
               order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The bounds this interval publishes over a backtest, learning as the daemon does.

        Forecasts are taken in ``order`` (time order), :data:`BATCH` at a time;
        each batch's bounds are those before it was scored. Works on a copy: the
        interval itself is unchanged.
        """
        tracker = self.copy()
        lower, upper = np.empty(predictions.shape, np.float32), np.empty(predictions.shape, np.float32)
        order = np.arange(len(predictions)) if order is None else order
        for lo in range(0, len(order), BATCH):
            rows = order[lo:lo + BATCH]
            low, high = tracker.bounds(predictions[rows], scale[rows])
            lower[rows], upper[rows] = low, high
            tracker.update(truth[rows] < low, truth[rows] > high, scale[rows])
        return lower, upper

    def to_dict(self) -> dict:
        return {"quantiles": list(self.quantiles), "lower": self.lower.tolist(), "upper": self.upper.tolist(),
                "adaptation": self.step}


def robust_sigma(residuals: np.ndarray) -> np.ndarray:
    """Per target, the spread of ``residuals`` ``[n, targets]`` as a standard deviation, from their median
    absolute deviation: the tails that make anomalies do not inflate it. Never 0 (a standardised score divides
    by it)."""
    residuals = np.asarray(residuals, dtype=np.float64)
    deviation = np.abs(residuals - np.median(residuals, axis=0))
    sigma = 1.4826 * np.median(deviation, axis=0)  # the MAD of a normal distribution is 0.6745 sigma
    fallback = np.where(deviation.mean(axis=0) > 0, 1.2533 * deviation.mean(axis=0), 1.0)  # mean abs dev, likewise
    return np.where(sigma > 0, sigma, fallback)


class AnomalyBand:
    """The band outside which a reading is an anomaly: wide quantiles of the same calibrated residuals as the
    interval, tracked online the same way, and their robust spread ``sigma`` (per target, in units of the scale)
    that standardises each reading's score."""

    def __init__(self, band: AdaptiveInterval, sigma: ArrayLike):
        self.band = band
        self.sigma = np.asarray(sigma, dtype=np.float64)

    @classmethod
    def from_dict(cls, raw, to_scale: ArrayLike = 1.0) -> "AnomalyBand":
        """From the metadata's ``anomaly`` object (``to_scale`` converts data units, as old versions wrote)."""
        factor = np.asarray(to_scale, dtype=np.float64)
        band = AdaptiveInterval(raw["quantiles"], np.asarray(raw["lower"]) * factor,
                                np.asarray(raw["upper"]) * factor, raw.get("adaptation", 0.0))
        return cls(band, np.asarray(raw.get("sigma", 1.0), dtype=np.float64) * factor)

    def judge(self, forecast: np.ndarray, scale: np.ndarray, truth: np.ndarray, lower: np.ndarray,
              upper: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(outside, band_lower, band_upper, score)`` of readings ``truth`` against their forecasts.

        All ``[n, targets]`` but ``outside`` (``[n]``: any target outside).
        The band never lies inside the published interval (``lower``,
        ``upper``; NaN where none was). A forecast of scale 0 (a constant
        window) has no band, and judges nothing. The score is the residual
        in standard deviations of the calibration residuals.
        """
        band_lower, band_upper = self.band.bounds(forecast, scale)
        with np.errstate(invalid="ignore", divide="ignore"):
            band_lower = np.fmin(band_lower, lower)
            band_upper = np.fmax(band_upper, upper)
            judged = (scale > 0) & np.isfinite(band_lower) & np.isfinite(band_upper)
            outside = (judged & ((truth < band_lower) | (truth > band_upper))).any(axis=1)
            score = (truth.astype(np.float64) - forecast) / (scale * self.sigma)
        return outside, band_lower, band_upper, score

    def update(self, truth: np.ndarray, band_lower: np.ndarray, band_upper: np.ndarray, scale: np.ndarray) -> None:
        """Track the quantiles on scored readings, as the interval does."""
        self.band.update(truth < band_lower, truth > band_upper, scale)

    def copy(self) -> "AnomalyBand":
        return AnomalyBand(self.band.copy(), self.sigma)
