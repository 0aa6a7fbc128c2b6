"""A candidate model in shadow: it forecasts a sample of the sensors beside the serving model, unpublished, and
both are scored when the truth arrives.

The sample is a share of the sensors chosen by a hash of their id, so every
daemon of a group, and every restart, shadows the same sensors. Once the
candidate has ``needed`` scored forecasts, :meth:`Shadow.verdict` says whether
it beat both the serving model and persistence on those very readings
(promote) or not (drop).
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

from .scoring import PendingForecasts, RollingErrors
from .seams import Forecaster

__all__ = ["Shadow", "in_sample"]


def in_sample(sensors: Sequence[str], share: float) -> np.ndarray:
    """Whether each sensor is among the ``share`` of all sensors picked by CRC-32 of its id."""
    limit = share * 2**32
    return np.fromiter((zlib.crc32(s.encode("utf-8", "surrogateescape")) < limit for s in sensors), dtype=bool,
                       count=len(sensors))


class Shadow:
    """The candidate, its pending forecasts and its scores against the serving model's and persistence's."""

    def __init__(self, candidate: Forecaster, share: float, needed: int, metric: str, rolling_window: int):
        self.candidate, self.share, self.needed, self.metric = candidate, share, needed, metric
        self.n_targets = n_targets = len(candidate.targets)
        self.pending = PendingForecasts(n_targets)
        self.errors = RollingErrors(rolling_window, n_targets)  # the candidate's, for its gauges
        self.scored = 0
        # sums over the compared readings of the metric's terms: candidate, serving model, persistence
        self._sums = np.zeros(3)

    def score(self, candidate: np.ndarray, serving: np.ndarray, persistence: np.ndarray) -> int:
        """Errors ``[n, targets]`` of the three on the same readings; returns how many counted: none once the
        verdict is in (the daemon takes it between batches, and the next batch may have begun by then)."""
        if self.scored >= self.needed:
            return 0
        self.errors.add(candidate)
        terms = np.square if self.metric == "rmse" else np.abs
        self._sums += [float(terms(e).sum()) for e in (candidate, serving, persistence)]
        self.scored += len(candidate)
        return len(candidate)

    def figures(self) -> tuple[float, float, float]:
        """The metric of the candidate, the serving model and persistence over the compared readings."""
        mean = self._sums / max(1, self.scored * self.n_targets)
        values = np.sqrt(mean) if self.metric == "rmse" else mean
        return float(values[0]), float(values[1]), float(values[2])

    def verdict(self) -> str | None:
        """``"promoted"`` once ``needed`` forecasts are scored and the candidate beat both, ``"dropped"`` if it did
        not; None before."""
        if self.scored < self.needed:
            return None
        candidate, serving, persistence = self.figures()
        return "promoted" if candidate < serving and candidate < persistence else "dropped"
