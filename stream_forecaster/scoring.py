"""Forecast errors in the data's own units, for the model and for baselines.

Persistence (predict the last reading) is the baseline every score is shown
beside: minute-level power is close to a random walk, and a model that does not
beat it is not worth serving.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["PendingForecasts", "RollingErrors", "Scores", "score"]


@dataclass(frozen=True)
class Scores:
    """RMSE and MAE over all targets and per target."""

    n: int
    rmse: float
    mae: float
    per_target: dict[str, dict[str, float]]


def score(truth: np.ndarray, predicted: np.ndarray, targets: Sequence[str]) -> Scores:
    """Scores of ``predicted`` against ``truth``, both ``[n, len(targets)]``."""
    truth = np.asarray(truth, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    if truth.shape != predicted.shape or truth.ndim != 2 or truth.shape[1] != len(targets):
        raise ValueError(f"truth {truth.shape} and predictions {predicted.shape} must both be [n, {len(targets)}]")
    if len(truth) == 0:
        nan = float("nan")
        return Scores(0, nan, nan, {t: {"rmse": nan, "mae": nan} for t in targets})
    error = predicted - truth
    squared, absolute = np.square(error), np.abs(error)
    per_target = {
        name: {"rmse": float(np.sqrt(squared[:, i].mean())), "mae": float(absolute[:, i].mean())}
        for i, name in enumerate(targets)
    }
    return Scores(len(truth), float(np.sqrt(squared.mean())), float(absolute.mean()), per_target)


class RollingErrors:
    """Absolute and squared errors of the last ``span`` scored forecasts, per target."""

    def __init__(self, span: int, n_targets: int):
        self.span = span
        self._abs = np.zeros((span, n_targets))
        self._sq = np.zeros((span, n_targets))
        self._next = 0
        self.count = 0

    def add(self, error: np.ndarray) -> None:
        error = np.asarray(error, dtype=np.float64)  # float32 squares of large errors would overflow
        self._abs[self._next] = np.abs(error)
        self._sq[self._next] = np.square(error)
        self._next = (self._next + 1) % self.span
        self.count = min(self.count + 1, self.span)

    def mae(self, target: int) -> float:
        return float(self._abs[: self.count, target].mean()) if self.count else float("nan")

    def rmse(self, target: int) -> float:
        return float(np.sqrt(self._sq[: self.count, target].mean())) if self.count else float("nan")


class PendingForecasts:
    """Each sensor's forecast of its next reading, and persistence's, until that reading arrives.

    Progressive validation: forecast now, score when the truth arrives. Slots
    are the sensor slots of :class:`~stream_forecaster.window.SensorWindows`.
    """

    def __init__(self, n_targets: int, capacity: int = 1024):
        self._model = np.full((capacity, n_targets), np.nan, dtype=np.float32)
        self._baseline = np.full((capacity, n_targets), np.nan, dtype=np.float32)

    def put(self, slot: int, forecast, baseline) -> None:
        if slot >= len(self._model):
            old, width = len(self._model), self._model.shape[1]
            grown = max(2 * old, slot + 1)
            self._model = np.resize(self._model, (grown, width))
            self._baseline = np.resize(self._baseline, (grown, width))
            self._model[old:] = np.nan  # np.resize repeats the old rows; empty the new slots
        self._model[slot] = forecast
        self._baseline[slot] = baseline

    def clear(self, slot: int) -> None:
        if slot < len(self._model):
            self._model[slot] = np.nan

    def take(self, slot: int):
        """``(forecast, baseline)`` pending for the slot, or None; the slot is emptied."""
        if slot >= len(self._model) or np.isnan(self._model[slot, 0]):
            return None
        pending = self._model[slot].copy(), self._baseline[slot].copy()
        self._model[slot] = np.nan
        return pending
