"""Each sensor's health: its rolling errors beside persistence's, and what they say about the fleet.

Prometheus cannot hold a label per sensor at fleet scale, so the figures of
every sensor go to a compacted topic instead (:func:`encode_health`, one record
per sensor, key = sensor), and Prometheus gets their distribution across the
fleet (:func:`fleet_skill`). The figures are exponentially weighted means over
about ``span`` scored forecasts of the sensor, the newest weighing most:
``pandas.Series.ewm(span=span).mean()`` of the same errors gives the same
numbers (a sensor with few scored forecasts gets their plain mean, near enough).
"""

from __future__ import annotations

import json
from typing import NamedTuple, Sequence

import numpy as np

from .window import arrivals

__all__ = ["MIN_SCORED", "FleetSkill", "SensorHealth", "encode_health", "fleet_skill"]

MIN_SCORED = 10  # scored forecasts before a sensor's skill counts in the fleet's distribution

# per slot and target: weighted sums of |e|, e², |persistence e|, persistence e², truth inside the interval
_ABS, _SQ, _P_ABS, _P_SQ, _INSIDE = range(5)


class FleetSkill(NamedTuple):
    """Across the sensors with at least :data:`MIN_SCORED` scored forecasts: how many, the share whose error is
    above persistence's, and quantiles of their skill."""

    sensors: int
    worse_than_persistence: float
    quantiles: dict[float, float]


class SensorHealth:
    """Rolling errors of each sensor slot (the slots of :class:`~stream_forecaster.window.SensorWindows`).

    Every method takes arrays of slots, so a batch is a few array operations.
    Skill is ``1 - RMSE / persistence's RMSE``: above 0 the model beats
    predicting the last reading. Coverage is the share of readings inside
    the published interval, counted over the forecasts that had one.
    """

    def __init__(self, n_targets: int, span: int, capacity: int = 1024):
        self.decay = 1.0 - 2.0 / (span + 1.0)  # pandas' ewm(span=...) weights
        self.n_targets = n_targets
        self._sums = np.zeros((capacity, 5, n_targets))
        self._weight = np.zeros(capacity)  # weighted count of scored forecasts
        self._banded = np.zeros((capacity, n_targets))  # weighted count of those with an interval
        self.scored = np.zeros(capacity, dtype=np.int64)
        self.aware = np.zeros(capacity, dtype=bool)  # the sensor's times carry a zone

    def add(self, slots: np.ndarray, error: np.ndarray, baseline: np.ndarray, inside: np.ndarray) -> None:
        """Score one batch: ``error`` and persistence's ``baseline`` error ``[n, targets]``; ``inside`` 1 or 0 where
        the reading fell inside the published interval, NaN where none was published. Rows in reading order."""
        slots = np.asarray(slots, dtype=np.int64)
        if not len(slots):
            return
        if slots.max() >= len(self._weight):
            self._grow(int(slots.max()) + 1)
        rows = np.stack([np.abs(error), np.square(error), np.abs(baseline), np.square(baseline),
                         np.nan_to_num(inside)], axis=1)
        banded = np.isfinite(inside).astype(np.float64)
        # a sensor's k readings of one batch, one after another: its figures decay k times, and its j-th
        # reading's row (of k) enters with weight decay^(k-1-j)
        _, _, unique, group, rank, counts = arrivals(slots)
        weight = self.decay ** (counts[group] - 1 - rank)
        decayed = self.decay ** counts
        sums = np.zeros((len(unique),) + rows.shape[1:])
        np.add.at(sums, group, weight[:, None, None] * rows)
        in_band = np.zeros((len(unique), self.n_targets))
        np.add.at(in_band, group, weight[:, None] * banded)
        self._sums[unique] = decayed[:, None, None] * self._sums[unique] + sums
        self._weight[unique] = decayed * self._weight[unique] + np.bincount(group, weights=weight)
        self._banded[unique] = decayed[:, None] * self._banded[unique] + in_band
        self.scored[unique] += counts

    def clear(self, slots) -> None:
        """Forget ``slots`` (their sensors were evicted or moved to another daemon)."""
        slots = np.asarray(slots, dtype=np.int64)
        slots = slots[slots < len(self._weight)]
        self._sums[slots] = 0.0
        self._weight[slots] = 0.0
        self._banded[slots] = 0.0
        self.scored[slots] = 0
        self.aware[slots] = False

    def figures(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        """``mae``, ``rmse``, ``persistence_mae``, ``persistence_rmse``, ``skill`` and ``coverage`` ``[n, targets]``
        (NaN where unknown) and ``scored`` ``[n]`` of ``slots``."""
        slots = np.asarray(slots, dtype=np.int64)
        known = slots < len(self._weight)
        sums = np.zeros((len(slots), 5, self.n_targets))
        weight, banded = np.zeros(len(slots)), np.zeros((len(slots), self.n_targets))
        sums[known], weight[known], banded[known] = (self._sums[slots[known]], self._weight[slots[known]],
                                                     self._banded[slots[known]])
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = sums / weight[:, None, None]
            rmse, persistence_rmse = np.sqrt(mean[:, _SQ]), np.sqrt(mean[:, _P_SQ])
            skill = np.where(persistence_rmse > 0, 1.0 - rmse / persistence_rmse, np.nan)
            coverage = np.where(banded > 0, sums[:, _INSIDE] / banded, np.nan)
        scored = np.zeros(len(slots), dtype=np.int64)
        scored[known] = self.scored[slots[known]]
        return {"mae": mean[:, _ABS], "rmse": rmse, "persistence_mae": mean[:, _P_ABS],
                "persistence_rmse": persistence_rmse, "skill": skill, "coverage": coverage, "scored": scored}

    def _grow(self, needed: int) -> None:
        new = max(2 * len(self._weight), needed)
        for name in ("_sums", "_weight", "_banded", "scored", "aware"):
            old = getattr(self, name)
            grown = np.zeros((new,) + old.shape[1:], dtype=old.dtype)
            grown[:len(old)] = old
            setattr(self, name, grown)


def fleet_skill(figures: dict[str, np.ndarray], quantiles: Sequence[float] = (0.1, 0.5)) -> FleetSkill:
    """The distribution of the sensors' skill (each sensor's worst target) from :meth:`SensorHealth.figures`."""
    skill = _worst(figures["skill"])
    counted = (figures["scored"] >= MIN_SCORED) & np.isfinite(skill)
    skill = skill[counted]
    if not len(skill):
        return FleetSkill(0, float("nan"), {q: float("nan") for q in quantiles})
    return FleetSkill(len(skill), float((skill < 0).mean()),
                      {q: float(np.quantile(skill, q)) for q in quantiles})


def _worst(skill: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.where(np.isnan(skill).all(axis=1), np.nan, np.nanmin(np.where(np.isnan(skill), np.inf, skill),
                                                                        axis=1))


def encode_health(sensors: Sequence[str], figures: dict[str, np.ndarray], last_reading: Sequence[str | None],
                  targets: Sequence[str], model_version: str | None, at: str) -> list[bytes]:
    """The JSON values of health records: per sensor its figures (a number per figure for one target, else an
    object per target; null where unknown), scored count, last reading time, model version and when written."""
    names = ("mae", "rmse", "persistence_mae", "persistence_rmse", "skill", "coverage")
    values = []
    for i, sensor in enumerate(sensors):
        record: dict = {"sensor": sensor}
        for name in names:
            row = [float(v) if np.isfinite(v) else None for v in figures[name][i]]
            record[name] = row[0] if len(targets) == 1 else dict(zip(targets, row))
        record.update(scored=int(figures["scored"][i]), last_reading=last_reading[i], model_version=model_version,
                      at=at)
        values.append(json.dumps(record, separators=(",", ":")).encode())
    return values
