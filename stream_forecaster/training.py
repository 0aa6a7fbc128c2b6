"""Offline work on a whole series: train a forecaster, and backtest one.

Both ``train`` and ``evaluate`` commands, and later the retrainer, go through
here, so splitting, normalisation and scoring follow one set of rules.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass

import numpy as np

from .config import Config
from .errors import UserError
from .model import Forecaster, Scaler, build_model, clone_model, fit, library_versions
from .records import Series, iso_time
from .scoring import Scores, score
from .window import sliding_windows, split_windows, window_starts

__all__ = ["Backtest", "TrainingError", "backtest", "train"]

log = logging.getLogger(__name__)

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
    seasonal: np.ndarray | None = None  # [n, targets]: the reading one day earlier, NaN where there is none
    lower: np.ndarray | None = None  # [n, targets]: prediction interval, when the model has one
    upper: np.ndarray | None = None
    quantiles: tuple[float, ...] = ()

    @property
    def model(self) -> Scores:
        return score(self.truth, self.predicted, self.targets)

    @property
    def baseline(self) -> Scores:
        return score(self.truth, self.persistence, self.targets)

    def summary(self) -> dict:
        model, base = self.model, self.baseline
        result = {
            "n": model.n,
            "rmse": model.rmse,
            "mae": model.mae,
            "persistence_rmse": base.rmse,
            "persistence_mae": base.mae,
            # skill: 1 - model error / persistence error; above 0 beats "predict the last value"
            "skill_rmse": 1 - model.rmse / base.rmse if base.rmse else float("nan"),
            "skill_mae": 1 - model.mae / base.mae if base.mae else float("nan"),
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
        if self.seasonal is not None:
            known = np.isfinite(self.seasonal).all(axis=1)
            seasonal = score(self.truth[known], self.seasonal[known], self.targets)
            result.update(seasonal_n=seasonal.n, seasonal_rmse=seasonal.rmse, seasonal_mae=seasonal.mae)
        if self.lower is not None:
            inside = (self.lower <= self.truth) & (self.truth <= self.upper)
            result.update(interval=list(self.quantiles), coverage=float(inside.mean()) if inside.size else float("nan"))
        return result


def _column_index(series: Series, names) -> list[int]:
    missing = [n for n in names if n not in series.columns]
    if missing:
        raise TrainingError(f"{series.source}: the data lacks column(s) {', '.join(missing)}")
    return [series.columns.index(n) for n in names]


def backtest(forecaster: Forecaster, series: Series, starts: np.ndarray | None = None) -> Backtest:
    """Forecast the windows beginning at rows ``starts`` (default: every window of every segment)."""
    length = forecaster.sequence_length
    feature_index = _column_index(series, forecaster.features)
    target_index = _column_index(series, forecaster.targets)
    if starts is None:
        starts = np.concatenate(window_starts(series.segments, len(series), length))
    windows = sliding_windows(series.values, length)
    predicted = np.empty((len(starts), len(forecaster.targets)), dtype=np.float32)
    for lo in range(0, len(starts), _BACKTEST_CHUNK):
        chunk = windows[starts[lo:lo + _BACKTEST_CHUNK], :-1][:, :, feature_index]
        predicted[lo:lo + len(chunk)] = forecaster.forecast(chunk)
    last = starts + length - 1  # row of each predicted reading
    bounds = forecaster.bounds(predicted)
    return Backtest(
        targets=forecaster.targets,
        timestamps=series.timestamps[last],
        truth=series.values[last][:, target_index],
        predicted=predicted,
        persistence=series.values[last - 1][:, target_index],
        model_version=forecaster.version,
        seasonal=_day_before(series, last, target_index),
        lower=None if bounds is None else bounds[0],
        upper=None if bounds is None else bounds[1],
        quantiles=forecaster.interval_quantiles,
    )


def _day_before(series: Series, rows: np.ndarray, target_index) -> np.ndarray:
    """Seasonal naive: each row's targets as read exactly one day earlier (same sensor), else NaN."""
    out = np.full((len(rows), len(target_index)), np.nan, dtype=np.float32)
    if not len(series):
        return out
    # (sensor, time) as one sorted key: each sensor's readings are in time order, sensors one after another
    segment_of = np.searchsorted(series.segments, np.arange(len(series)), side="right") - 1
    keys = segment_of.astype(np.int64) << 33 | series.timestamps.astype(np.int64)
    wanted = keys[rows] - 86_400
    at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    found = keys[at] == wanted
    out[found] = series.values[at[found]][:, target_index]
    return out


@dataclass(frozen=True)
class Trained:
    forecaster: Forecaster
    test: Backtest
    test_starts: np.ndarray  # first rows of the test windows: the slice the forecaster never trained on
    seconds: float

    def diverged(self) -> str | None:
        """Why this model must not be published (its training loss is not finite), or None."""
        losses = self.forecaster.metadata["training"]["history"].get("loss", [])
        if not losses or not all(np.isfinite(losses)):
            return f"the training loss is not finite ({losses[-1:] or 'none'})"
        return None


def train(config: Config, series: Series, initial: Forecaster | None = None,
          verbose: int | str = "auto", stop=None) -> Trained:
    """Train a forecaster on the oldest ``train_split`` of each sensor's windows; test on the rest.

    With ``initial`` the training starts from its weights and keeps its
    normalisation (fine-tuning); otherwise from fresh weights.
    """
    data, spec = config.data, config.model
    feature_index = _column_index(series, data.features)
    target_index = _column_index(series, data.targets)
    train_starts, validation_starts, test_starts = split_windows(
        series.segments, len(series), spec.sequence_length, data.train_split, spec.validation_split)
    if len(train_starts) < 1 or len(test_starts) < 1:
        raise TrainingError(
            f"{series.source}: {len(series)} readings give {len(train_starts)} training and {len(test_starts)} "
            f"test windows of {spec.sequence_length}; too few to train and test (load more data or raise data.ratio)"
        )
    started = time.monotonic()
    train_rows = _rows_of(np.concatenate([train_starts, validation_starts]), spec.sequence_length, len(series))
    if initial is None:
        scaler = Scaler.fit(series.values[train_rows], data.normalization)
        model = build_model(spec)
    else:
        scaler = _scaler_of(initial, series.columns)
        model = clone_model(initial.model, spec)
    windows = sliding_windows(scaler.transform(series.values), spec.sequence_length)
    history = fit(model, windows, train_starts, validation_starts, feature_index, target_index, spec, verbose, stop)
    ts, last = series.timestamps, spec.sequence_length - 1
    metadata = {
        "features": list(data.features),
        "targets": list(data.targets),
        "sequence_length": spec.sequence_length,
        "layers": list(spec.layers),
        "predict": spec.predict,
        "normalization": {
            "method": data.normalization if initial is None else initial.metadata["normalization"].get("method"),
            "features": scaler.subset(feature_index).to_dict(),
            "targets": scaler.subset(target_index).to_dict(),
        },
        "data": {
            **series.summary(),
            "sensors": len(series.segments),
            "train_windows": len(train_starts),
            "validation_windows": len(validation_starts),
            "test_windows": len(test_starts),
            "train_range": [iso_time(ts[train_rows].min()), iso_time(ts[train_rows].max())],
            "test_range": [iso_time(ts[test_starts + last].min()), iso_time(ts[test_starts + last].max())],
        },
        "training": {
            "warm_start_from": initial.version if initial is not None else None,
            "loss": spec.loss,
            "optimizer": spec.optimizer,
            "learning_rate": spec.learning_rate,
            "batch_size": spec.batch_size,
            "epochs": spec.epochs,
            "dropout": spec.dropout,
            "seed": spec.seed,
            "patience": spec.patience,
            "min_step": spec.min_step,
            "preset": spec.preset,
            "history": history,
        },
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "libraries": library_versions(),
    }
    if set(data.targets) <= set(data.features) and spec.min_step != 0:
        if spec.min_step is not None:
            metadata["min_step"] = [spec.min_step] * len(data.targets)
        elif len(validation_starts):
            metadata["min_step"] = _calibrate_min_step(
                backtest(Forecaster(model, metadata, jit_compile=spec.jit_compile), series, validation_starts))
        else:
            log.warning("model.min_step is chosen on the validation slice, and there is none (model.validation_split "
                        "is 0 or the data too short): no forecast step is held (give model.min_step)")
    if spec.intervals and not len(validation_starts):
        log.warning("model.intervals are measured on the validation slice, and there is none "
                    "(model.validation_split is 0 or the data too short): the model publishes no interval")
    if spec.intervals and len(validation_starts):
        errors = backtest(Forecaster(model, metadata, jit_compile=spec.jit_compile), series, validation_starts)
        residuals = errors.truth - errors.predicted
        metadata["intervals"] = {
            "quantiles": list(spec.intervals),
            "lower": np.quantile(residuals, spec.intervals[0], axis=0).tolist(),
            "upper": np.quantile(residuals, spec.intervals[1], axis=0).tolist(),
            "from_windows": len(validation_starts),
        }
    forecaster = Forecaster(model, metadata, jit_compile=spec.jit_compile)
    test = backtest(forecaster, series, test_starts)
    metadata["training"]["seconds"] = round(time.monotonic() - started, 3)
    metadata["test"] = {k: v for k, v in test.summary().items() if k != "model_version"}
    return Trained(forecaster, test, test_starts, time.monotonic() - started)


def _calibrate_min_step(validation: Backtest) -> list[float]:
    """Per target, the smallest forecast step worth taking, chosen on the validation slice.

    Steps below it become "no change" (the last reading): small forecast steps
    are mostly noise, which costs MAE where persistence is hard to beat. The
    threshold minimises MAE / persistence's MAE + RMSE / persistence's RMSE,
    both goals at once.
    """
    chosen = []
    for t in range(len(validation.targets)):
        truth, forecast, last = (a[:, t].astype(np.float64) for a in
                                 (validation.truth, validation.predicted, validation.persistence))
        step = np.abs(forecast - last)
        base_mae, base_rmse = np.abs(truth - last).mean(), np.sqrt(np.square(truth - last).mean())
        best = None
        for threshold in np.unique(np.quantile(step, np.linspace(0, 0.99, 34))):
            held = np.where(step < threshold, last, forecast)
            cost = np.abs(truth - held).mean() / base_mae + np.sqrt(np.square(truth - held).mean()) / base_rmse
            if best is None or cost < best[0]:
                best = (cost, float(threshold))
        chosen.append(best[1])
    return chosen


def _rows_of(starts: np.ndarray, length: int, n_rows: int) -> np.ndarray:
    """Boolean mask of the rows inside any of the windows beginning at ``starts``."""
    edges = np.zeros(n_rows + 1, dtype=np.int64)
    np.add.at(edges, starts, 1)
    np.add.at(edges, starts + length, -1)
    return np.cumsum(edges[:-1]) > 0


def _scaler_of(forecaster: Forecaster, columns) -> Scaler:
    """The forecaster's normalisation laid out over ``columns`` (features and targets)."""
    mean, scale = np.zeros(len(columns), np.float32), np.ones(len(columns), np.float32)
    for names, scaler in ((forecaster.targets, forecaster.target_scaler), (forecaster.features, forecaster.feature_scaler)):
        for name, m, s in zip(names, scaler.mean, scaler.scale):
            i = columns.index(name)
            mean[i], scale[i] = m, s
    return Scaler(mean, scale)
