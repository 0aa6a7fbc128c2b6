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

    def add(self, errors: np.ndarray) -> None:
        """Add errors ``[n, targets]``, oldest first."""
        errors = np.asarray(errors, dtype=np.float64)[-self.span:]  # float32 squares of large errors overflow
        rows = (self._next + np.arange(len(errors))) % self.span
        self._abs[rows] = np.abs(errors)
        self._sq[rows] = np.square(errors)
        self._next = (self._next + len(errors)) % self.span
        self.count = min(self.count + len(errors), self.span)

    def mae(self, target: int) -> float:
        return float(self._abs[: self.count, target].mean()) if self.count else float("nan")

    def rmse(self, target: int) -> float:
        return float(np.sqrt(self._sq[: self.count, target].mean())) if self.count else float("nan")


class PendingForecasts:
    """Each sensor's forecast of its next reading, and persistence's, until that reading arrives.

    Progressive validation: forecast now, score when the truth arrives. Slots
    are the sensor slots of :class:`~stream_forecaster.window.SensorWindows`;
    every method takes an array of them, so a whole batch is one call. A
    forecast of NaN means none is pending.
    """

    def __init__(self, n_targets: int, capacity: int = 1024):
        self._model = np.full((capacity, n_targets), np.nan, dtype=np.float32)
        self._baseline = np.full((capacity, n_targets), np.nan, dtype=np.float32)

    def put(self, slots: np.ndarray, forecasts: np.ndarray, baselines: np.ndarray) -> None:
        slots = np.asarray(slots, dtype=np.int64)
        if len(slots) and slots.max() >= len(self._model):
            old, width = self._model.shape
            grown = max(2 * old, int(slots.max()) + 1)
            self._model = np.resize(self._model, (grown, width))
            self._baseline = np.resize(self._baseline, (grown, width))
            self._model[old:] = np.nan  # np.resize repeats the old rows; empty the new slots
        self._model[slots] = forecasts
        self._baseline[slots] = baselines

    def clear(self, slots) -> None:
        slots = np.asarray(slots, dtype=np.int64)
        self._model[slots[slots < len(self._model)]] = np.nan

    def take(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(forecasts, baselines)`` pending for the slots (NaN rows where none); the slots are emptied."""
        slots = np.asarray(slots, dtype=np.int64)
        forecasts = np.full((len(slots), self._model.shape[1]), np.nan, dtype=np.float32)
        baselines = forecasts.copy()
        known = slots < len(self._model)
        forecasts[known], baselines[known] = self._model[slots[known]], self._baseline[slots[known]]
        self._model[slots[known]] = np.nan
        return forecasts, baselines
