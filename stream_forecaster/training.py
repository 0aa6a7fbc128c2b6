"""Offline work on a whole series: train a forecaster, and backtest one.

Both ``train`` and ``evaluate`` commands, and later the retrainer, go through
here, so splitting, normalisation and scoring follow one set of rules.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import Config
from .errors import UserError
from .files import Series, iso_time
from .intervals import AdaptiveInterval, robust_sigma
from .model import Forecaster, Scaler, build_model, clone_model, fit, library_versions
from .scoring import Scores, score
from .store import ModelMetadata
from .window import sliding_windows, split_windows, window_starts

__all__ = ["Backtest", "TrainingError", "backtest", "choose_windows", "train"]

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
    scale: np.ndarray | None = None  # [n, targets]: each forecast's unit (see Forecaster.forecast_scaled)
    sensor: np.ndarray | None = None  # [n]: index of each forecast's sensor in sensor_names
    sensor_names: tuple[str, ...] = ()

    @property
    def model(self) -> Scores:
        return score(self.truth, self.predicted, self.targets)

    @property
    def baseline(self) -> Scores:
        return score(self.truth, self.persistence, self.targets)

    def summary(self) -> dict:
        model, base = self.model, self.baseline
        result: dict[str, Any] = {
            "n": model.n,
            "rmse": model.rmse,
            "mae": model.mae,
            "persistence_rmse": base.rmse,
            "persistence_mae": base.mae,
            "skill_rmse": _skill(model.rmse, base.rmse),
            "skill_mae": _skill(model.mae, base.mae),
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
            for t, name in enumerate(self.targets):
                result["per_target"][name]["coverage"] = float(inside[:, t].mean()) if len(inside) else float("nan")
        if len(self.sensor_names) > 1 and self.sensor is not None:
            result["per_sensor"] = self.per_sensor()
        return result

    def per_sensor(self) -> dict[str, dict]:
        """Each sensor's n, RMSE, MAE and skills against persistence (over all targets)."""
        sensor = self.sensor
        if sensor is None:
            return {}
        count = np.bincount(sensor, minlength=len(self.sensor_names))
        cells = count * len(self.targets)
        truth = self.truth.astype(np.float64)

        def sums(predicted):
            error = predicted.astype(np.float64) - truth
            return (np.bincount(sensor, np.square(error).sum(axis=1), len(count)),
                    np.bincount(sensor, np.abs(error).sum(axis=1), len(count)))

        (model_sq, model_abs), (base_sq, base_abs) = sums(self.predicted), sums(self.persistence)
        out = {}
        for index in np.flatnonzero(count):
            rmse, mae = np.sqrt(model_sq[index] / cells[index]), model_abs[index] / cells[index]
            out[self.sensor_names[index]] = {
                "n": int(count[index]), "rmse": float(rmse), "mae": float(mae),
                "skill_rmse": _skill(rmse, np.sqrt(base_sq[index] / cells[index])),
                "skill_mae": _skill(mae, base_abs[index] / cells[index]),
            }
        return out


def _skill(error: float, persistence: float) -> float:
    """1 - error / persistence's error: above 0 beats "predict the last value" (NaN when persistence is exact)."""
    return float(1 - error / persistence) if persistence else float("nan")


def _column_index(series: Series, names) -> list[int]:
    missing = [n for n in names if n not in series.columns]
    if missing:
        raise TrainingError(f"{series.source}: the data lacks column(s) {', '.join(missing)}")
    return [series.columns.index(n) for n in names]


def backtest(forecaster: Forecaster, series: Series, starts: np.ndarray | None = None) -> Backtest:
    """Forecast the windows beginning at rows ``starts`` (default: every window of every segment).

    The interval, when the model has one, learns as it would in the daemon:
    forecasts are scored in time order and each moves the offsets of the next.
    """
    length = forecaster.sequence_length
    feature_index = _column_index(series, forecaster.features)
    target_index = _column_index(series, forecaster.targets)
    if starts is None:
        starts = np.concatenate(window_starts(series.segments, len(series), length))
    windows = sliding_windows(series.values, length)
    predicted = np.empty((len(starts), len(forecaster.targets)), dtype=np.float32)
    scale = np.empty((len(starts), len(forecaster.targets)), dtype=np.float64)
    for lo in range(0, len(starts), _BACKTEST_CHUNK):
        chunk = windows[starts[lo:lo + _BACKTEST_CHUNK], :-1][:, :, feature_index]
        predicted[lo:lo + len(chunk)], scale[lo:lo + len(chunk)] = forecaster.forecast_scaled(chunk)
    last = starts + length - 1  # row of each predicted reading
    truth = series.values[last][:, target_index]
    bounds = None
    if forecaster.prediction_interval is not None:
        order = np.argsort(series.timestamps[last], kind="stable")
        bounds = forecaster.prediction_interval.replay(predicted, scale, truth, order)
    return Backtest(
        targets=forecaster.targets,
        timestamps=series.timestamps[last],
        truth=truth,
        predicted=predicted,
        persistence=series.values[last - 1][:, target_index],
        model_version=forecaster.version,
        seasonal=_day_before(series, last, target_index),
        lower=None if bounds is None else bounds[0],
        upper=None if bounds is None else bounds[1],
        quantiles=forecaster.interval_quantiles,
        scale=scale,
        sensor=np.searchsorted(series.segments, last, side="right") - 1,
        sensor_names=tuple(series.sensors) or tuple(str(i) for i in range(len(series.segments))),
    )


def _day_before(series: Series, rows: np.ndarray, target_index) -> np.ndarray:
    """Seasonal naive: each row's targets as read exactly one day earlier (same sensor), else NaN."""
    out = np.full((len(rows), len(target_index)), np.nan, dtype=np.float32)
    if not len(series):
        return out
    # (sensor, time) as one sorted key: each sensor's readings are in time order, sensors one after another;
    # built in place, one int64 a row
    keys = np.repeat(np.arange(len(series.segments), dtype=np.int64), np.diff([*series.segments, len(series)]))
    keys <<= 33
    keys |= series.timestamps.astype(np.int64, copy=False)
    wanted = keys[rows] - 86_400
    at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    found = keys[at] == wanted
    out[found] = series.values[at[found]][:, target_index]
    return out


@dataclass(frozen=True)
class ChosenWindows:
    """First rows of the training, validation and test windows of one run, and how many each part had."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    available: dict[str, int]  # windows of each part before any sampling

    @property
    def sampled(self) -> bool:
        return (len(self.train), len(self.validation), len(self.test)) != tuple(self.available.values())


def choose_windows(segments, n_rows: int, length: int, train_fraction: float, validation_fraction: float,
                   max_windows: int, seed: int) -> ChosenWindows:
    """The windows one training run uses: :func:`~stream_forecaster.window.split_windows`, sampled to a budget.

    With ``max_windows`` 0, or when the training and validation windows number
    at most ``max_windows`` and the test windows at most their share,
    ``ceil(max_windows * (1 - train_fraction) / train_fraction)`` (the split's
    own proportion), every window is taken, as ``split_windows`` gives them.
    Past it, a part is sampled per sensor (:func:`_shares`): every sensor an
    equal share, capped by what it has, what small sensors leave shared among
    the rest, so every sensor is represented as long as the budget is at least
    the number of sensors. Each sensor's training share is split between its
    training and validation ranges as ``validation_fraction`` splits its own
    windows. Within a range the windows are a stratified sample in time
    (:func:`_stratified`). Deterministic for a ``seed``; the test sample draws
    from its own stream, so it does not move when the training budget does.

    Every part stays sensor after sensor, each sensor's windows in time order,
    as the backtest wants them: persistence and the seasonal baseline read the
    series itself, so they are unchanged for a sampled window; the interval's
    replay still runs in time order, but learns from fewer forecasts an hour
    than the daemon would see (the gate scores point errors only). Past the
    budget only the sample's start rows are made, never the full split's, and
    windows are gathered from these rows alone.
    """
    bounds = np.asarray([*segments, n_rows], dtype=np.int64)
    first = bounds[:-1]
    count = np.maximum(bounds[1:] - first - length + 1, 0)  # windows of each sensor, as window_starts has them
    split = (count * train_fraction).astype(np.int64)  # int(n * fraction), as split_windows cuts them
    validation = (split * validation_fraction).astype(np.int64)
    available = {"train": int((split - validation).sum()), "validation": int(validation.sum()),
                 "test": int((count - split).sum())}
    test_budget = math.ceil(max_windows * (1 - train_fraction) / train_fraction)
    if not max_windows or split.sum() <= max_windows and available["test"] <= test_budget:
        return ChosenWindows(*split_windows(segments, n_rows, length, train_fraction, validation_fraction), available)
    learn, held_out = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    take = _shares(split, max_windows, learn)
    take_validation = (take * validation_fraction).astype(np.int64)  # each sensor's split again, at the sample's size
    train_starts = _stratified(first, split - validation, take - take_validation, learn)
    validation_starts = _stratified(first + split - validation, validation, take_validation, learn)
    test_starts = _stratified(first + split, count - split, _shares(count - split, test_budget, held_out), held_out)
    return ChosenWindows(train_starts, validation_starts, test_starts, available)


def _shares(capacity: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """How many of its ``capacity`` windows each sensor gives to a sample of at most ``budget``.

    Equal shares, capped by what each sensor has; what the small sensors
    leave is shared among the others (water filling). The windows that do not
    divide evenly go one each to sensors picked at random, so no name or
    position is favoured.
    """
    if capacity.sum() <= budget:
        return capacity.copy()
    order = np.argsort(capacity, kind="stable")
    ascending = capacity[order]
    before = np.cumsum(ascending) - ascending  # windows of the smaller sensors, all taken
    others = len(ascending) - np.arange(len(ascending))  # this sensor and the larger ones
    whole = ascending * others <= budget - before  # it has no more than an equal share of what is left
    k = int(np.argmin(whole))  # the first sensor that has more (there is one: the capacities exceed the budget)
    share, extra = divmod(int(budget - before[k]), int(others[k]))
    ascending = ascending.copy()
    ascending[k:] = share
    ascending[k + rng.choice(int(others[k]), extra, replace=False)] += 1  # share + 1 <= what each of them has
    taken = np.empty_like(capacity)
    taken[order] = ascending
    return taken


def _stratified(first: np.ndarray, size: np.ndarray, take: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``take[i]`` distinct rows of each range ``[first[i], first[i] + size[i])``, in order, ranges one after another.

    Each range is cut into ``take[i]`` strata of (nearly) equal length and one
    row is drawn from each: a sample spread evenly over the sensor's time, so
    every part of the history (each hour of the day, each day of the week)
    keeps its share, without the aliasing of a fixed stride, whose step could
    land every window at the same time of day. Uniform over time rather than
    weighted to recent windows: the history is already the recent span, and
    the held-out slice is the most recent. Taking all of a range gives it
    whole.
    """
    sensor = np.repeat(np.arange(len(take)), take)
    j = np.arange(len(sensor)) - np.repeat(np.cumsum(take) - take, take)  # the stratum, within its sensor
    n, k = size[sensor], take[sensor]
    low, high = j * n // k, (j + 1) * n // k  # k <= n: each stratum holds at least one row
    return first[sensor] + low + (rng.random(len(sensor)) * (high - low)).astype(np.int64)


@dataclass(frozen=True)
class Trained:
    forecaster: Forecaster
    test: Backtest
    test_starts: np.ndarray  # first rows of the test windows: the slice the forecaster never trained on
    seconds: float

    def diverged(self) -> str | None:
        """Why this model must not be published (its training loss is not finite), or None."""
        losses = self.forecaster.metadata.training["history"].get("loss", [])
        if not losses or not all(np.isfinite(losses)):
            return f"the training loss is not finite ({losses[-1:] or 'none'})"
        return None


def train(config: Config, series: Series, initial: Forecaster | None = None,
          verbose: int | str = "auto", stop=None) -> Trained:
    """Train a forecaster on the oldest ``train_split`` of each sensor's windows; test on the rest.

    Past ``model.max_windows`` training and validation windows, and past its
    test share of the held-out ones, each part is a sample drawn per sensor
    (:func:`choose_windows`). With ``initial`` the training starts from its
    weights and keeps its normalisation (fine-tuning); otherwise from fresh
    weights.
    """
    data, spec = config.data, config.model
    feature_index = _column_index(series, data.features)
    target_index = _column_index(series, data.targets)
    chosen = choose_windows(series.segments, len(series), spec.sequence_length, data.train_split,
                            spec.validation_split, spec.max_windows, spec.seed)
    train_starts, validation_starts, test_starts = chosen.train, chosen.validation, chosen.test
    if len(train_starts) < 1 or len(test_starts) < 1:
        raise TrainingError(
            f"{series.source}: {len(series)} readings give {len(train_starts)} training and {len(test_starts)} "
            f"test windows of {spec.sequence_length}; too few to train and test (load more data or raise data.ratio)"
        )
    started = time.monotonic()
    train_rows = _rows_of(np.concatenate([train_starts, validation_starts]), spec.sequence_length, len(series))
    method = data.normalization
    if initial is not None and initial.normalization != method:
        raise TrainingError(f"model {initial.version} was trained with {initial.normalization} "
                            f"normalisation, the configuration asks for {method}: continue it with the same "
                            "data.normalization, or train from scratch")
    windowed = method == "window"
    weights = None
    if windowed:
        scaler, values = None, series.values
        # a window whose target is constant has no unit to learn a step in; the daemon holds its last reading
        spreads = [_target_spread(values, starts, spec.sequence_length, target_index)
                   for starts in (train_starts, validation_starts)]
        (train_starts, train_spread), (validation_starts, validation_spread) = (
            (starts[(spread > 0).all(axis=1)], spread[(spread > 0).all(axis=1)])
            for starts, spread in zip((train_starts, validation_starts), spreads))
        if spec.sample_weight == "spread":
            weights = (_spread_weights(train_spread, train_starts, series.segments),
                       _spread_weights(validation_spread, validation_starts, series.segments))
        if not len(train_starts):
            raise TrainingError(f"{series.source}: every training window's targets are constant; nothing to learn")
        normalization: dict[str, Any] = {"method": "window"}
    else:
        scaler = (Scaler.fit(series.values[train_rows], method) if initial is None
                  else _scaler_of(initial, series.columns))
        values = scaler.transform(series.values)
        normalization = {"method": method, "features": scaler.subset(feature_index).to_dict(),
                         "targets": scaler.subset(target_index).to_dict()}
    model = build_model(spec, config.layers()) if initial is None else clone_model(initial.model, spec)
    windows = sliding_windows(values, spec.sequence_length)
    history = fit(model, windows, train_starts, validation_starts, feature_index, target_index, spec, verbose, stop,
                  scaled=windowed, weights=weights)
    ts, last = series.timestamps, spec.sequence_length - 1
    metadata = ModelMetadata(
        features=tuple(data.features),
        targets=tuple(data.targets),
        sequence_length=spec.sequence_length,
        layers=tuple(config.layers()),
        predict=spec.predict,
        normalization=normalization,
        scaled_units=True,
        data={
            **series.summary(),
            "sensors": len(series.segments),
            "train_windows": len(train_starts),
            "validation_windows": len(validation_starts),
            "test_windows": len(test_starts),
            # min and max in place: ts[train_rows] would copy most of the history's times
            "train_range": [iso_time(ts.min(initial=np.iinfo(ts.dtype).max, where=train_rows)),
                            iso_time(ts.max(initial=np.iinfo(ts.dtype).min, where=train_rows))],
            "test_range": [iso_time(ts[test_starts + last].min()), iso_time(ts[test_starts + last].max())],
            **({"sampled_from": chosen.available, "max_windows": spec.max_windows} if chosen.sampled else {}),
        },
        training={
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
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        libraries=library_versions(),
    )
    validation = None
    if len(validation_starts):
        validation = backtest(Forecaster(model, metadata, jit_compile=spec.jit_compile), series, validation_starts)
    if set(data.targets) <= set(data.features) and spec.min_step != 0:
        if spec.min_step is not None:
            metadata = metadata.replace(min_step=(spec.min_step,) * len(data.targets))
        elif validation is not None:
            metadata = metadata.replace(min_step=tuple(_calibrate_min_step(validation)))
        else:
            log.warning("model.min_step is chosen on the validation slice, and there is none (model.validation_split "
                        "is 0 or the data too short): no forecast step is held (give model.min_step)")
    if validation is not None and metadata.min_step is not None:  # the interval is calibrated on what will be published
        validation = backtest(Forecaster(model, metadata, jit_compile=spec.jit_compile), series, validation_starts)
    if (spec.intervals or spec.anomaly_quantiles) and validation is None:
        log.warning("model.intervals and model.anomaly_quantiles are measured on the validation slice, and there is "
                    "none (model.validation_split is 0 or the data too short): the model publishes no interval "
                    "and no anomaly events")
    if validation is not None and validation.scale is not None:
        varying = (validation.scale > 0).all(axis=1)
        residuals = (validation.truth[varying] - validation.predicted[varying]) / validation.scale[varying]
        if len(residuals) and spec.intervals:
            metadata = metadata.replace(intervals={
                **AdaptiveInterval.calibrate(spec.intervals, residuals, spec.interval_adaptation).to_dict(),
                "from_windows": len(residuals),
            })
        if len(residuals) and spec.anomaly_quantiles:
            metadata = metadata.replace(anomaly={
                **AdaptiveInterval.calibrate(spec.anomaly_quantiles, residuals, spec.interval_adaptation).to_dict(),
                "sigma": robust_sigma(residuals).tolist(), "from_windows": len(residuals),
            })
    forecaster = Forecaster(model, metadata, jit_compile=spec.jit_compile)
    test = backtest(forecaster, series, test_starts)
    forecaster = forecaster.with_metadata(
        training={**metadata.training, "seconds": round(time.monotonic() - started, 3)},
        test={k: v for k, v in test.summary().items() if k != "model_version"})
    return Trained(forecaster, test, test_starts, time.monotonic() - started)


def _calibrate_min_step(validation: Backtest) -> list[float]:
    """Per target, the smallest forecast step worth taking, in units of the forecast's scale, chosen on the
    validation slice.

    Steps below it become "no change" (the last reading): small forecast steps
    are mostly noise, which costs MAE where persistence is hard to beat. The
    threshold minimises MAE / persistence's MAE + RMSE / persistence's RMSE,
    both goals at once.
    """
    chosen = []
    scales = validation.scale if validation.scale is not None else np.ones_like(validation.truth)
    for t in range(len(validation.targets)):
        truth, forecast, last, scale = (a[:, t].astype(np.float64) for a in
                                        (validation.truth, validation.predicted, validation.persistence, scales))
        with np.errstate(divide="ignore", invalid="ignore"):
            step = np.where(scale > 0, np.abs(forecast - last) / scale, 0.0)
        base_mae, base_rmse = np.abs(truth - last).mean(), np.sqrt(np.square(truth - last).mean())
        best = None
        for threshold in np.unique(np.quantile(step, np.linspace(0, 0.99, 34))):
            held = np.where(step < threshold, last, forecast)
            cost = np.abs(truth - held).mean() / base_mae + np.sqrt(np.square(truth - held).mean()) / base_rmse
            if best is None or cost < best[0]:
                best = (cost, float(threshold))
        chosen.append(best[1] if best is not None else 0.0)
    return chosen


def _target_spread(values: np.ndarray, starts: np.ndarray, length: int, target_index) -> np.ndarray:
    """``[n, targets]``: each target's standard deviation over the input readings of the windows at ``starts``
    (0 exactly where they are all equal)."""
    view = sliding_windows(values[:, target_index], length - 1)
    spread = np.empty((len(starts), len(target_index)))
    for lo in range(0, len(starts), _BACKTEST_CHUNK):
        spread[lo:lo + _BACKTEST_CHUNK] = view[starts[lo:lo + _BACKTEST_CHUNK]].astype(np.float64).std(axis=1)
    return spread


def _spread_weights(spread: np.ndarray, starts: np.ndarray, segments) -> np.ndarray:
    """Each window's weight: its targets' ``spread`` relative to the typical (median) one of its sensor.

    A window-normalised loss weighs a quiet window's step as much as a busy
    one's, while the errors that count, in the data's units, come from the busy
    ones. Relative to each sensor's own typical spread, the weights stay the
    same whatever the sensor's size, so the model stays scale-free.
    """
    sensor = np.searchsorted(segments, starts, side="right") - 1
    bounds = np.flatnonzero(np.diff(sensor)) + 1  # starts come sensor after sensor
    weights = np.empty(len(starts))
    for rows in np.split(np.arange(len(starts)), bounds):
        if len(rows):
            typical = np.median(spread[rows], axis=0)
            weights[rows] = (spread[rows] / np.where(typical > 0, typical, 1.0)).mean(axis=1)
    return weights


def _rows_of(starts: np.ndarray, length: int, n_rows: int) -> np.ndarray:
    """Boolean mask of the rows inside any of the windows beginning at ``starts``."""
    mask = np.zeros(n_rows, dtype=bool)
    if not len(starts):
        return mask
    # overlapping windows merge into runs of rows; marking where each run begins and ends takes a byte a row,
    # where counting the windows over each row took sixteen
    starts = np.unique(starts)
    begins = np.concatenate([[True], starts[1:] >= starts[:-1] + length])
    ends = np.append(begins[1:], True)  # the last window of each run
    edges = np.zeros(n_rows + 1, dtype=np.int8)
    edges[starts[begins]] = 1
    edges[starts[ends] + length] -= 1  # where a run ends and the next begins the two cancel
    np.cumsum(edges[:-1], dtype=np.int8, out=edges[:-1])
    np.greater(edges[:-1], 0, out=mask)
    return mask


def _scaler_of(forecaster: Forecaster, columns) -> Scaler:
    """The forecaster's normalisation laid out over ``columns`` (features and targets)."""
    mean, scale = np.zeros(len(columns), np.float32), np.ones(len(columns), np.float32)
    for names, scaler in ((forecaster.targets, forecaster.target_scaler),
                          (forecaster.features, forecaster.feature_scaler)):
        if scaler is None:
            raise TrainingError(f"model {forecaster.version} is window-normalised: it has no global scaling to keep")
        for name, m, s in zip(names, scaler.mean, scaler.scale):
            i = columns.index(name)
            mean[i], scale[i] = m, s
    return Scaler(mean, scale)
