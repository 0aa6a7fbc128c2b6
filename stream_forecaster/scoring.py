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
    """Each sensor's forecast of its next reading, its interval and scale, and persistence's, until that reading
    arrives.

    Progressive validation: forecast now, score when the truth arrives. Slots
    are the sensor slots of :class:`~stream_forecaster.window.SensorWindows`;
    every method takes an array of them, so a whole batch is one call. A
    forecast of NaN means none is pending; an interval of NaN, that none was published.
    """

    _FIELDS = 5  # forecast, baseline, lower, upper, scale

    def __init__(self, n_targets: int, capacity: int = 1024):
        self._rows = np.full((capacity, self._FIELDS, n_targets), np.nan, dtype=np.float32)
        self._made_at = np.full(capacity, np.nan)  # the time of the reading each forecast was made from
        self._made_from = np.full(capacity, -1, dtype=np.int64)  # and its input offset

    def put(self, slots: np.ndarray, forecasts: np.ndarray, baselines: np.ndarray,
            lower: np.ndarray | None = None, upper: np.ndarray | None = None, scale: np.ndarray | None = None,
            made_at: np.ndarray | None = None, made_from: np.ndarray | None = None) -> None:
        """Leave forecasts pending; ``made_at`` and ``made_from``, the time (NaN: none) and offset of the reading
        each was made from, name it again when its truth comes (:meth:`origin`)."""
        slots = np.asarray(slots, dtype=np.int64)
        if len(slots) and slots.max() >= len(self._rows):
            old = len(self._rows)
            new = max(2 * old, int(slots.max()) + 1)
            grown = np.full((new,) + self._rows.shape[1:], np.nan, dtype=np.float32)
            grown[:old] = self._rows
            self._rows = grown
            self._made_at = np.concatenate([self._made_at, np.full(new - old, np.nan)])
            self._made_from = np.concatenate([self._made_from, np.full(new - old, -1, dtype=np.int64)])
        self._made_at[slots] = np.nan if made_at is None else made_at
        self._made_from[slots] = -1 if made_from is None else made_from
        self._rows[slots, 0] = forecasts
        self._rows[slots, 1] = baselines
        self._rows[slots, 2] = np.nan if lower is None else lower
        self._rows[slots, 3] = np.nan if upper is None else upper
        self._rows[slots, 4] = np.nan if scale is None else scale

    def clear(self, slots) -> None:
        slots = np.asarray(slots, dtype=np.int64)
        self._rows[slots[slots < len(self._rows)], 0] = np.nan

    def forget_intervals(self) -> None:
        """Leave the pending forecasts unbanded: another model's intervals must not steer the next one's."""
        self._rows[:, 2:4] = np.nan

    def origin(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(made_at, made_from)`` of the forecasts last put for ``slots`` (NaN and -1 where unknown)."""
        slots = np.asarray(slots, dtype=np.int64)
        known = slots < len(self._made_at)
        at, offset = np.full(len(slots), np.nan), np.full(len(slots), -1, dtype=np.int64)
        at[known], offset[known] = self._made_at[slots[known]], self._made_from[slots[known]]
        return at, offset

    def take(self, slots: np.ndarray) -> tuple[np.ndarray, ...]:
        """``(forecasts, baselines, lower, upper, scale)`` pending for the slots (NaN rows where none); the slots are
        emptied."""
        slots = np.asarray(slots, dtype=np.int64)
        rows = np.full((len(slots),) + self._rows.shape[1:], np.nan, dtype=np.float32)
        known = slots < len(self._rows)
        rows[known] = self._rows[slots[known]]
        self._rows[slots[known], 0] = np.nan
        return rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3], rows[:, 4]
