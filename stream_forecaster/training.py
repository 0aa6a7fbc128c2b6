"""Offline work on a whole series: train a forecaster, and backtest one.

Both ``train`` and ``evaluate`` commands, and later the retrainer, go through
here, so splitting, normalisation and scoring follow one set of rules.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass

import numpy as np

from .config import Config
from .errors import UserError
from .model import Forecaster, Scaler, build_model, fit, library_versions
from .records import Series, iso_time
from .scoring import Scores, score
from .window import sliding_windows, split_index

__all__ = ["Backtest", "TrainingError", "backtest", "train"]

_BACKTEST_CHUNK = 65536  # windows gathered at once; bounds backtest memory on big files


class TrainingError(UserError, ValueError):
    """The data cannot train or evaluate this model (too short, missing columns)."""


@dataclass(frozen=True)
class Backtest:
    """One-step-ahead predictions over consecutive windows, beside persistence."""

    targets: tuple[str, ...]
    timestamps: np.ndarray  # [n] time of each predicted reading
    truth: np.ndarray  # [n, targets]
    predicted: np.ndarray  # [n, targets]
    persistence: np.ndarray  # [n, targets]: the last reading of each window
    model_version: str | None

    @property
    def model(self) -> Scores:
        return score(self.truth, self.predicted, self.targets)

    @property
    def baseline(self) -> Scores:
        return score(self.truth, self.persistence, self.targets)

    def summary(self) -> dict:
        model, base = self.model, self.baseline
        return {
            "n": model.n,
            "rmse": model.rmse,
            "mae": model.mae,
            "persistence_rmse": base.rmse,
            "persistence_mae": base.mae,
            "per_target": {
                t: {
                    **model.per_target[t],
                    "persistence_rmse": base.per_target[t]["rmse"],
                    "persistence_mae": base.per_target[t]["mae"],
                }
                for t in self.targets
            },
            "model_version": self.model_version,
        }


def _column_index(series: Series, names) -> list[int]:
    missing = [n for n in names if n not in series.columns]
    if missing:
        raise TrainingError(f"{series.source}: the data lacks column(s) {', '.join(missing)}")
    return [series.columns.index(n) for n in names]


def backtest(forecaster: Forecaster, series: Series, start: int = 0) -> Backtest:
    """Forecast every window of ``series`` from window ``start`` on."""
    length = forecaster.sequence_length
    feature_index = _column_index(series, forecaster.features)
    target_index = _column_index(series, forecaster.targets)
    windows = sliding_windows(series.values, length)[start:]
    predicted = np.empty((len(windows), len(forecaster.targets)), dtype=np.float32)
    for lo in range(0, len(windows), _BACKTEST_CHUNK):
        chunk = windows[lo:lo + _BACKTEST_CHUNK, :-1][:, :, feature_index]
        predicted[lo:lo + len(chunk)] = forecaster.forecast(chunk)
    first = start + length - 1  # row index of the first predicted reading
    return Backtest(
        targets=forecaster.targets,
        timestamps=series.timestamps[first:],
        truth=series.values[first:][:, target_index],
        predicted=predicted,
        persistence=series.values[first - 1:-1][:, target_index],
        model_version=forecaster.version,
    )


@dataclass(frozen=True)
class Trained:
    forecaster: Forecaster
    test: Backtest
    seconds: float


def train(config: Config, series: Series, verbose: int | str = "auto") -> Trained:
    """Train a new forecaster on the oldest ``train_split`` of the windows; test on the rest."""
    data, spec = config.data, config.model
    feature_index = _column_index(series, data.features)
    target_index = _column_index(series, data.targets)
    n_windows = max(0, len(series) - spec.sequence_length + 1)
    split = split_index(n_windows, data.train_split)
    n_validation = int(split * spec.validation_split)
    if split - n_validation < 1 or split >= n_windows:
        raise TrainingError(
            f"{series.source}: {len(series)} readings give {n_windows} windows of "
            f"{spec.sequence_length}; too few to train and test (load more data or raise data.ratio)"
        )
    started = time.monotonic()
    train_rows = series.values[: split + spec.sequence_length - 1]
    scaler = Scaler.fit(train_rows, data.normalization)
    windows = sliding_windows(scaler.transform(series.values), spec.sequence_length)
    model = build_model(spec)
    history = fit(
        model,
        windows,
        np.arange(split - n_validation),
        np.arange(split - n_validation, split),
        feature_index,
        target_index,
        spec,
        verbose,
    )
    ts = series.timestamps
    metadata = {
        "features": list(data.features),
        "targets": list(data.targets),
        "sequence_length": spec.sequence_length,
        "layers": list(spec.layers),
        "normalization": {
            "method": data.normalization,
            "features": scaler.subset(feature_index).to_dict(),
            "targets": scaler.subset(target_index).to_dict(),
        },
        "data": {
            **series.summary(),
            "train_windows": split - n_validation,
            "validation_windows": n_validation,
            "test_windows": n_windows - split,
            "train_range": [iso_time(ts[0]), iso_time(ts[split + spec.sequence_length - 2])],
            "test_range": [iso_time(ts[split + spec.sequence_length - 1]), iso_time(ts[-1])],
        },
        "training": {
            "loss": spec.loss,
            "optimizer": spec.optimizer,
            "learning_rate": spec.learning_rate,
            "batch_size": spec.batch_size,
            "epochs": spec.epochs,
            "dropout": spec.dropout,
            "seed": spec.seed,
            "history": history,
        },
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "libraries": library_versions(),
    }
    forecaster = Forecaster(model, metadata)
    test = backtest(forecaster, series, start=split)
    metadata["training"]["seconds"] = round(time.monotonic() - started, 3)
    metadata["test"] = {k: v for k, v in test.summary().items() if k != "model_version"}
    return Trained(forecaster, test, time.monotonic() - started)

