"""Forecast errors in the data's own units, for the model and for baselines.

Persistence (predict the last reading) is the baseline every score is shown
beside: minute-level power is close to a random walk, and a model that does not
beat it is not worth serving.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["Scores", "score"]


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
