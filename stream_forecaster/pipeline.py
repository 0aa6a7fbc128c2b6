"""One poll batch through parse → window → predict → publish → score. No threads.

:meth:`Pipeline.process` returns the offsets that are safe to commit: only
after every prediction (and dead letter) of the batch has been acknowledged.
Bad messages are data here, not exceptions: each is counted, logged at a bounded
rate and forwarded to the dead-letter topic, and the batch goes on.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .config import Config
from .health import SensorHealth, encode_health, fleet_skill
from .inference import InferenceRunner
from .messages import (
    MAX_KEY_BYTES,
    Invalid,
    Kind,
    MessageParser,
    OutRecord,
    encode_anomalies,
    encode_gaps,
    encode_predictions,
    format_time,
    format_times,
    prediction_id,
)
from .metrics import Metrics
from .scoring import PendingForecasts, RollingErrors
from .seams import Clock, Forecaster, Offsets, Record, Sink
from .shadow import Shadow, in_sample
from .window import SensorWindows

__all__ = ["Batch", "Pipeline", "Stopped"]

log = logging.getLogger(__name__)


CHUNK = 1024  # records parsed, and windows forecast, per step of a batch
HEADER_BUDGET = 16 * 1024  # bytes of an invalid message's own headers carried to its dead letter


@dataclass
class _Parsed:
    """A batch's accepted readings, a column each: the record it came in, its sensor's slot and name, its values
    (an array per chunk), time (NaN: none) and whether that carried a zone; per window, its reading's index; dead
    letters; the readings that came more than one interval after their sensor's last (no forecast was for them),
    and the time of that last one."""

    index: list = field(default_factory=list)
    slots: list = field(default_factory=list)
    sensors: list = field(default_factory=list)
    values: list = field(default_factory=list)
    timestamps: list = field(default_factory=list)
    aware: list = field(default_factory=list)
    window_of: list = field(default_factory=list)
    dead_letters: list = field(default_factory=list)
    gaps: list = field(default_factory=list)
    gap_from: list = field(default_factory=list)
    _columns: tuple | None = None

    def __len__(self) -> int:
        return len(self.index)

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``index``, ``timestamps`` and ``aware`` as arrays, once every chunk is in."""
        if self._columns is None:
            self._columns = (np.array(self.index, dtype=np.int64), np.array(self.timestamps, dtype=np.float64),
                             np.array(self.aware, dtype=bool))
        return self._columns

    def value_rows(self) -> np.ndarray:
        """Every accepted reading's values ``[readings, columns]`` (float64, as read)."""
        if len(self.values) != 1:
            self.values[:] = [np.concatenate(self.values)]
        return self.values[0]


@dataclass
class Batch:
    """A poll batch between :meth:`Pipeline.begin` and :meth:`Pipeline.finish`: its records, what was parsed of
    them, and the futures of its forecasts (and its shadow forecasts)."""

    records: Sequence[Record]
    parsed: _Parsed
    forecasts: list = field(default_factory=list)
    shadowed: list = field(default_factory=list)

    @functools.cached_property
    def offsets(self) -> Offsets:
        """``{(topic, partition): next offset}`` past the batch's records."""
        offsets: Offsets = {}
        for r in self.records:
            offsets[(r.topic, r.partition)] = max(offsets.get((r.topic, r.partition), 0), r.offset + 1)
        return offsets


class Stopped(Exception):
    """Stop was requested before the batch's predictions were acknowledged; commit nothing."""


class _RateLimitedLog:
    """At most ``limit`` warnings per ``period`` seconds, then one line saying how many were held back."""

    def __init__(self, what: str, clock: Clock, limit: int = 10, period: float = 10.0):
        self.what, self.clock, self.limit, self.period = what, clock, limit, period
        self._start, self._count, self._held = clock(), 0, 0

    def warning(self, message: str, *args) -> None:
        now = self.clock()
        if now - self._start >= self.period:
            if self._held:
                log.warning("%d more %s in the last %.0f s were not logged", self._held, self.what, self.period)
            self._start, self._count, self._held = now, 0, 0
        if self._count < self.limit:
            self._count += 1
            log.warning(message, *args)
        else:
            self._held += 1


class Pipeline:
    """Per-sensor windows and forecasts over a stream of Kafka records.

    ``runner`` computes the forecasts (the daemon's :class:`InferenceRunner`;
    by default one of its own, on one thread); ``clock`` paces the rate-limited
    warnings.
    """

    def __init__(self, config: Config, forecaster: Forecaster, sink: Sink, metrics: Metrics,
                 stop: threading.Event | None = None, runner: InferenceRunner | None = None,
                 clock: Clock = time.monotonic):
        self.forecaster = forecaster
        self.sink, self.metrics = sink, metrics
        self.stop = stop or threading.Event()
        self.runner = runner or InferenceRunner(1)
        self.output_topic = config.kafka.output_topic
        self.dead_letter_topic = config.kafka.dead_letter_topic
        self.anomaly_topic, self.health_topic = config.kafka.anomaly_topic, config.kafka.health_topic
        self.min_gap = config.window.min_gap
        self.period = config.data.period
        features, targets = forecaster.features, forecaster.targets
        self.columns = tuple(dict.fromkeys(features + targets))
        self.feature_index = [self.columns.index(c) for c in features]
        self.target_index = [self.columns.index(c) for c in targets]
        self._all_features = self.feature_index == list(range(len(self.columns)))
        self.max_message_bytes = config.kafka.max_message_bytes
        self.parser = MessageParser(self.columns, self.max_message_bytes)
        self.windows = SensorWindows(forecaster.sequence_length - 1, len(self.columns))
        self.pending = PendingForecasts(len(targets))
        self.model_errors = RollingErrors(config.metrics.rolling_window, len(targets))
        self.baseline_errors = RollingErrors(config.metrics.rolling_window, len(targets))
        # 1 where a truth fell inside its interval; its rolling "MAE" is the interval's coverage
        self.inside = RollingErrors(config.metrics.rolling_window, len(targets))
        self.health = SensorHealth(len(targets), config.metrics.health_span)
        self.shadow: Shadow | None = None
        self._shadow_settings = (config.retrain.shadow_sample, config.retrain.shadow_for, config.retrain.metric,
                                 config.metrics.rolling_window)
        metrics.bind_rolling(targets, self.model_errors, self.baseline_errors, self.inside)
        self._invalid_log = _RateLimitedLog("invalid messages", clock)
        self._stale_log = _RateLimitedLog("stale readings", clock)
        self._batch = np.empty((0, forecaster.sequence_length - 1, len(features)), dtype=np.float32)
        self._spare = self._batch
        self._unfinished = 0  # batches begun whose forecasts are not all in: the model may still read their windows

    def refill(self, partition: int, records: Iterable[Record], evictions: Sequence[tuple[int, int]] = ()) -> int:
        """Refill ``partition``'s windows from readings whose forecasts were already published: nothing is
        published or scored.

        The readings go through the live path's own ingest (the same parsing,
        repeat checks and windows), and ``evictions`` (``(at, before)``: once
        the partition had been read up to offset ``at``, its sensors whose last
        reading came before offset ``before`` were evicted) are applied where
        the running daemon applied them. The forecast each refilled sensor had
        pending, made from its last window, is recomputed, so its next reading is
        scored as if the daemon had never stopped. Returns the number of
        readings replayed.
        """
        evictions = sorted(evictions)
        replayed = 0
        chunk: list[Record] = []

        def ingest():
            nonlocal replayed
            parsed = _Parsed()
            self._ingest(chunk, 0, len(chunk), parsed, replay=True)
            replayed += len(parsed)
            chunk.clear()

        for record in records:
            while evictions and record.offset >= evictions[0][0]:
                if chunk:
                    ingest()
                self.evict_before(partition, evictions.pop(0)[1], count=False)
            chunk.append(record)
            if len(chunk) == CHUNK:
                ingest()
        if chunk:
            ingest()
        for _, before in evictions:  # those at the refill's very end
            self.evict_before(partition, before, count=False)
        slots = self.windows.in_partition(partition)
        slots = slots[self.windows.full(slots)]
        for lo in range(0, len(slots), 16 * CHUNK):
            part = slots[lo:lo + 16 * CHUNK]
            full = np.stack([self.windows.window(s) for s in part])
            windows = full if self._all_features else full[:, :, self.feature_index]
            predictions, scale = self.forecaster.forecast_scaled(windows)
            lower, upper = self.forecaster.bounds(predictions, scale) or (None, None)
            # persistence's forecast is the newest reading
            self.pending.put(part, predictions, full[:, -1, self.target_index], lower, upper, scale,
                             self.windows.times[part], self.windows.last[part])
        self.metrics.rebuilt.inc(replayed)
        self.metrics.active_sensors.set(len(self.windows))
        return replayed

    def snapshot(self, partition: int) -> bytes:
        """``partition``'s windows, for :meth:`restore`."""
        return self.windows.snapshot(partition)

    def restore(self, partition: int, snapshot: bytes) -> int:
        """Bring back ``partition``'s windows from a snapshot (``ValueError`` if it does not fit); a :meth:`refill`
        from the snapshot's offset completes them and recomputes the pending forecasts."""
        restored = self.windows.restore(partition, snapshot)
        self.metrics.active_sensors.set(len(self.windows))
        return restored

    def drop_partitions(self, partitions) -> int:
        """Forget the sensors of partitions this daemon no longer owns."""
        slots = self.windows.drop_partitions(partitions)
        self._forget(slots)
        self.metrics.active_sensors.set(len(self.windows))
        return len(slots)

    def evict_before(self, partition: int, offset: int, count: bool = True) -> int:
        """Drop the windows (and pending forecasts) of ``partition``'s sensors last read before ``offset``."""
        slots = self.windows.evict_before(partition, offset)
        self._forget(slots)
        if count:  # a refill repeats evictions the running daemon counted
            self.metrics.evicted.inc(len(slots))
        self.metrics.active_sensors.set(len(self.windows))
        return len(slots)

    def health_report(self, now: float) -> list[OutRecord]:
        """Update the fleet's skill gauges; return each scored sensor's health record for ``kafka.health_topic``
        (none when it is not set), stamped with wall-clock time ``now``."""
        slots = self.windows.in_use()
        figures = self.health.figures(slots)
        fleet = fleet_skill(figures)
        m = self.metrics
        m.health_sensors.set(fleet.sensors)
        m.worse_than_persistence.set(fleet.worse_than_persistence)
        for q, value in fleet.quantiles.items():
            m.sensor_skill.labels(str(q)).set(value)
        if not self.health_topic:
            return []
        scored = figures["scored"] > 0
        slots = slots[scored]
        figures = {k: v[scored] for k, v in figures.items()}
        sensors = self.windows.sensors(slots)
        last = [None if t != t else format_time(t, aware)
                for t, aware in zip(self.windows.times[slots].tolist(), self.health.aware[slots].tolist())]
        values = encode_health(sensors, figures, last, self.forecaster.targets, self.forecaster.version,
                               format_time(now, True))
        m.health_records.inc(len(values))
        return [OutRecord(self.health_topic, sensor.encode("utf-8", "surrogateescape"), value)
                for sensor, value in zip(sensors, values)]

    def set_candidate(self, candidate: Forecaster | None) -> None:
        """Forecast ``candidate`` in shadow from the next batch on (None: no more); it starts with no score."""
        self.shadow = None if candidate is None else Shadow(candidate, *self._shadow_settings)
        for i, target in enumerate(self.forecaster.targets):
            errors = self.shadow.errors if self.shadow is not None else None
            self.metrics.rolling_mae.labels(target, "candidate").set_function(
                (lambda: float("nan")) if errors is None else functools.partial(errors.mae, i))
            self.metrics.rolling_rmse.labels(target, "candidate").set_function(
                (lambda: float("nan")) if errors is None else functools.partial(errors.rmse, i))

    def _forget(self, slots: list[int]) -> None:
        """Clear what freed slots held beside their windows: a new sensor may take the slot."""
        self.pending.clear(slots)
        self.health.clear(slots)
        if self.shadow is not None:
            self.shadow.pending.clear(slots)

    def swap_model(self, forecaster: Forecaster) -> None:
        """Serve ``forecaster`` from the next batch on; windows and pending forecasts carry over.

        The caller has checked that features, targets and window length match.
        The pending forecasts are still scored, but their intervals, the old
        model's, no longer count: they must not steer the new model's.
        """
        self.forecaster = forecaster
        self.pending.forget_intervals()

    def process(self, records: Sequence[Record]) -> Offsets:
        """Handle one poll batch; return ``{(topic, partition): next offset}`` to commit."""
        return self.finish(self.begin(records))

    def begin(self, records: Sequence[Record]) -> Batch:
        """Parse ``records``, add their readings to the windows and start forecasting the full ones.

        The batch is parsed in chunks; each chunk's windows go to the model as
        soon as they are cut, so the model computes while the next chunk is
        parsed. One more batch may begin before this one is finished: its
        windows are cut into the other of two buffers, allocated only then.
        """
        if self._unfinished:
            self._batch, self._spare = self._spare, self._batch
        self._unfinished += 1
        batch = Batch(records, _Parsed())
        parsed = batch.parsed
        for lo in range(0, len(records), CHUNK):
            first = len(parsed.window_of)
            self._ingest(records, lo, min(len(records), lo + CHUNK), parsed)
            if len(parsed.window_of) > first:
                windows = self._batch[first:len(parsed.window_of)]
                batch.forecasts.append((first, self.runner.forecast_async(self.forecaster, windows)))
                if self.shadow is not None:
                    batch.shadowed.append(self._shadow_forecasts(parsed, first, windows))
        return batch

    def finish(self, batch: Batch) -> Offsets:
        """Publish the batch's forecasts and dead letters, score its readings; return
        ``{(topic, partition): next offset}``, safe to commit: every record it published is acknowledged.

        Batches finish in the order they began; the model and the shadow
        candidate stay those they began with (the daemon changes them between batches).
        """
        records, parsed = batch.records, batch.parsed
        predictions = self._publish(records, parsed, batch.forecasts)
        self._unfinished -= 1
        candidate = self._shadow_predictions(len(parsed.window_of), batch.shadowed)
        events = self._score(records, parsed, predictions, candidate)
        events += self._gap_events(records, parsed)
        if events and self.anomaly_topic and not self.sink.publish(events, self.stop):
            raise Stopped()
        self.metrics.batch_size.observe(len(records))
        self.metrics.active_sensors.set(len(self.windows))
        return batch.offsets

    def _ingest(self, records, lo: int, hi: int, parsed: "_Parsed", replay: bool = False) -> None:
        """Parse ``records[lo:hi]`` into ``parsed`` and add the accepted readings to their sensors' windows.

        The one ingest path, live and refilling alike, so both make the same
        decisions from the same readings. Live, each full window is copied into
        ``self._batch`` in order and invalid messages become dead letters; a
        replay (``replay=True``) only rebuilds the windows: its readings were
        counted, logged and dead-lettered when they were first read.
        """
        window_of = parsed.window_of
        if not replay and len(self._batch) < len(window_of) + hi - lo:
            # earlier chunks' windows stay valid: the model holds views of the old buffer
            self._batch = np.empty((max(len(records), len(window_of) + hi - lo),) + self._batch.shape[1:],
                                   dtype=np.float32)
        chunk = records[lo:hi]
        got = self.parser.parse_batch([r.key for r in chunk], [r.value for r in chunk])
        if not replay:
            for i, invalid in got.invalid.items():
                self._invalid(chunk[i], invalid, parsed.dead_letters)
        rows = np.flatnonzero(got.kinds == Kind.READING)
        taken = [chunk[i] for i in rows.tolist()]
        slots = self.windows.slots_of([got.sensors[i] for i in rows.tolist()], [r.partition for r in taken])
        offsets = np.array([r.offset for r in taken], dtype=np.int64)
        when = got.timestamps[rows]
        newer, last = self._newer(slots, when)
        stale = len(rows) - int(newer.sum())
        if stale:
            for j in np.flatnonzero(~newer).tolist():
                if not replay:
                    record, aware = chunk[rows[j]], bool(got.aware[rows[j]])
                    self._stale_log.warning("reading at %s[%d]@%d from sensor %r is not newer than its last one "
                                            "(%s): skipped as a repeat or late", record.topic, record.partition,
                                            record.offset, got.sensors[rows[j]], format_time(last[j], aware))
            rows, slots, offsets, when, last = rows[newer], slots[newer], offsets[newer], when[newer], last[newer]
        out: np.ndarray | None = None
        if not replay:
            out = self._batch[len(window_of):] if self._all_features else np.empty(
                (len(rows),) + (self.windows.size, self.windows.width), dtype=np.float32)
        full = self.windows.append_many(slots, got.values[rows], offsets, when, out)
        base = len(parsed)
        with np.errstate(invalid="ignore"):
            gaps = np.flatnonzero(when - last >= 1.5 * self.period)  # a reading further on skipped one ('?', or lost)
        parsed.gaps += (base + gaps).tolist()
        parsed.gap_from += last[gaps].tolist()
        if not replay:
            made = np.flatnonzero(full)
            if not self._all_features and out is not None:
                self._batch[len(window_of):len(window_of) + len(made)] = out[:len(made)][:, :, self.feature_index]
            window_of += (base + made).tolist()
        parsed.index += (lo + rows).tolist()
        parsed.slots += slots.tolist()
        parsed.sensors += [got.sensors[i] for i in rows.tolist()]
        parsed.values.append(got.values[rows])
        parsed.timestamps += when.tolist()
        parsed.aware += got.aware[rows].tolist()
        if not replay:
            m = self.metrics  # counted once per chunk: a counter update takes a lock
            m.missing.inc(int(np.count_nonzero(got.kinds == Kind.MISSING)))
            m.ignored.inc(int(np.count_nonzero(got.kinds == Kind.HEADER)))
            m.stale.inc(stale)
            m.accepted.inc(len(rows))

    def _newer(self, slots: np.ndarray, when: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which readings (of ``slots``, in arrival order, at times ``when``) are newer than their sensor's last
        accepted one, and that one's time (NaN: none yet).

        A reading without a time is always newer: its order is its arrival.
        Normally every reading is newer, which a few array operations show;
        otherwise the readings are taken in turn.
        """
        last = self.windows.times[slots]
        order = np.argsort(slots, kind="stable")
        repeat = slots[order[1:]] == slots[order[:-1]]
        last[order[1:][repeat]] = when[order[:-1][repeat]]  # the same sensor's reading before, in this chunk
        timed = when == when
        if not timed.any() or (timed.all() and not (when <= last).any()):
            return np.ones(len(slots), dtype=bool), last
        newer = np.ones(len(slots), dtype=bool)
        times, newest = self.windows.times, dict[int, float]()
        for j, (slot, at) in enumerate(zip(slots.tolist(), when.tolist())):
            before = newest.get(slot, float(times[slot]))
            last[j] = before
            if at <= before:
                newer[j] = False
            elif at == at:
                newest[slot] = at
        return newer, last

    def _shadow_forecasts(self, parsed: _Parsed, first: int, windows: np.ndarray) -> tuple[np.ndarray, object]:
        """Start the candidate's forecasts of the sampled sensors' windows ``first`` on: (their indices, future)."""
        assert self.shadow is not None
        sensors = [parsed.sensors[a] for a in parsed.window_of[first:]]
        picked = np.flatnonzero(in_sample(sensors, self.shadow.share))
        future = self.runner.forecast_async(self.shadow.candidate, windows[picked]) if len(picked) else None
        return first + picked, future

    def _shadow_predictions(self, n_windows: int, shadowed: list) -> np.ndarray | None:
        """The candidate's forecast of each window of the batch (NaN for those not in its sample)."""
        if self.shadow is None:
            return None
        made = np.full((n_windows, len(self.forecaster.targets)), np.nan, dtype=np.float32)
        for picked, future in shadowed:
            if future is not None:
                made[picked] = future.result()[0]
        return made

    def _publish(self, records: Sequence[Record], parsed: _Parsed, forecasts: list) -> np.ndarray:
        """Send the dead letters, then each chunk's forecasts as soon as its future completes; return once every
        one is acknowledged, with the forecasts, their bounds and scales (``[4, windows, targets]``, NaN where
        none), for scoring."""
        predictions = np.full((4, len(parsed.window_of), len(self.forecaster.targets)), np.nan, dtype=np.float32)
        self.sink.queue(parsed.dead_letters)
        for start, future in forecasts:
            chunk, scale, seconds = future.result()
            self.metrics.inference_seconds.observe(seconds)
            end = start + len(chunk)
            predictions[0, start:end], predictions[3, start:end] = chunk, scale
            bounds = self.forecaster.bounds(chunk, scale)
            if bounds is not None:
                predictions[1:3, start:end] = bounds
            # queued now, so they are on their way while the next chunk is computed
            self.sink.queue(self._forecast_messages(records, parsed, predictions, start, end))
        if not self.sink.publish((), self.stop):
            raise Stopped()
        sent_ms = np.array([records[parsed.index[a]].timestamp for a in parsed.window_of], dtype=np.float64)
        sent_ms = sent_ms[sent_ms > 0]  # Kafka's -1: no timestamp
        self.metrics.latency_seconds.observe_many(np.maximum(0.0, time.time() * 1000 - sent_ms) / 1000)
        self.metrics.predictions.inc(len(parsed.window_of))
        self.metrics.dead_letters.inc(len(parsed.dead_letters))
        return predictions

    def _forecast_messages(self, records: Sequence[Record], parsed: _Parsed, predictions: np.ndarray,
                           start: int, end: int) -> list[OutRecord]:
        """The forecast messages of windows ``start:end``."""
        version = self.forecaster.version
        at = np.array(parsed.window_of[start:end], dtype=np.int64)
        index, stamps, aware = parsed.columns()
        chosen = [records[i] for i in index[at].tolist()]
        sensors = [parsed.sensors[a] for a in at.tolist()]
        times = format_times(stamps[at] + self.period, aware[at])
        partitions, offsets, keys = [r.partition for r in chosen], [r.offset for r in chosen], [r.key for r in chosen]
        idents = list(map(prediction_id, sensors, times, partitions, offsets))
        bounds = None
        if self.forecaster.prediction_interval is not None:
            bounds = (predictions[1, start:end], predictions[2, start:end])
        values = encode_predictions(idents, sensors, times, predictions[0, start:end],
                                    self.forecaster.targets, version, partitions, offsets, bounds)
        version_header = ("model_version", (version or "").encode())
        headers = [[("prediction_id", ident.encode()), version_header] for ident in idents]  # kafka-python: lists
        return list(map(OutRecord._make, zip(itertools.repeat(self.output_topic), keys, values, headers,
                                              itertools.repeat(None))))

    def _invalid(self, record, invalid: Invalid, dead_letters: list) -> None:
        self.metrics.invalid.inc()
        self._invalid_log.warning("invalid message at %s[%d]@%d from sensor %r: %s",
                                  record.topic, record.partition, record.offset, invalid.sensor, invalid.reason)
        if self.dead_letter_topic:
            # Sent as it came, it could exceed what the broker takes and stall the loop for ever: the value is
            # cut to max_message_bytes, the key to MAX_KEY_BYTES, the input's headers to HEADER_BUDGET (the
            # whole message stays at `source`). A header without a value (null in Kafka) goes on empty:
            # kafka-python cannot send it.
            headers: list[tuple[str, bytes]] = []
            size = 0
            for k, v in record.headers or []:
                # each header also costs its lengths on the wire: a million empty ones are megabytes
                size += len(k.encode("utf-8", "surrogateescape")) + len(v or b"") + 10
                if size > HEADER_BUDGET:
                    headers.append(("headers_dropped", str(len(record.headers) - len(headers)).encode()))
                    break
                headers.append((k, v or b""))
            headers += [("error", invalid.reason.encode()),
                        ("source", f"{record.topic}/{record.partition}/{record.offset}".encode())]
            key, value = record.key, record.value or b""
            if len(value) > self.max_message_bytes:
                headers.append(("truncated", str(len(value)).encode()))
                value = value[:self.max_message_bytes]
            if key is not None and len(key) > MAX_KEY_BYTES:
                headers.append(("key_truncated", str(len(key)).encode()))
                key = key[:MAX_KEY_BYTES]
            dead_letters.append(OutRecord(self.dead_letter_topic, key, value, headers))

    def _score(self, records: Sequence[Record], parsed: _Parsed, predictions: np.ndarray,
               candidate: np.ndarray | None = None) -> list[OutRecord]:
        """Score every accepted reading against the forecast pending for its sensor; leave the new ones pending;
        return the anomaly events.

        A sensor can send several readings in one batch: each is scored against
        the forecast made from the one before it, the first against what was
        pending from earlier batches. A reading after a gap came more than one
        interval after that one: the forecast was for a minute without a
        reading, so it is not scored. One pass of array operations per batch.
        """
        window_of = parsed.window_of
        n = len(parsed)
        if n == 0:
            return []
        slots = np.array(parsed.slots, dtype=np.int64)
        readings = parsed.value_rows()[:, self.target_index]
        truth = readings.astype(np.float32)
        index, times, aware = parsed.columns()
        offsets = np.array([records[i].offset for i in index.tolist()], dtype=np.int64)
        made = np.full((4,) + truth.shape, np.nan, dtype=np.float32)  # what each reading's window yielded, if any
        made[:, window_of] = predictions
        order = np.argsort(slots, kind="stable")
        repeat = slots[order[1:]] == slots[order[:-1]]
        before = np.full(n, -1)
        before[order[1:][repeat]] = order[:-1][repeat]  # the same sensor's previous reading in this batch
        forecast, baseline = np.empty((4,) + truth.shape, dtype=np.float32), np.empty_like(truth)
        inside, first = before >= 0, before < 0
        forecast[:, inside], baseline[inside] = made[:, before[inside]], truth[before[inside]]
        made_at, made_from = np.empty(n), np.empty(n, dtype=np.int64)  # the reading each forecast came from
        made_at[inside], made_from[inside] = times[before[inside]], offsets[before[inside]]
        made_at[first], made_from[first] = self.pending.origin(slots[first])
        taken = self.pending.take(slots[first])
        forecast[0, first], baseline[first] = taken[:2]
        forecast[1:, first] = taken[2:]
        forecast[:, parsed.gaps] = np.nan
        last = np.ones(n, dtype=bool)
        last[order[:-1][repeat]] = False
        self.pending.put(slots[last], made[0, last], truth[last], made[1, last], made[2, last], made[3, last],
                         times[last], offsets[last])

        scored = np.isfinite(forecast[0]).all(axis=1)
        if candidate is not None and self.shadow is not None:
            self._score_shadow(self.shadow, candidate, slots, truth, forecast[0], baseline, scored,
                               (window_of, before, inside, first, last, parsed.gaps))
        if not scored.any():
            return []
        rows = np.flatnonzero(scored)
        # in float64: readings near float32's limit (3e38, then -3e38) differ by more than float32 holds
        seen = truth[rows]
        error = forecast[0, rows].astype(np.float64) - seen
        baseline_error = baseline[rows].astype(np.float64) - seen
        lower, upper, scale = forecast[1, rows], forecast[2, rows], forecast[3, rows]
        banded = np.isfinite(lower).all(axis=1)  # published with an interval
        covered = np.where(banded[:, None], (lower <= seen) & (seen <= upper), np.nan)
        self.model_errors.add(error)
        self.baseline_errors.add(baseline_error)
        self.health.add(slots[rows], error, baseline_error, covered)
        self.health.aware[slots[rows]] = aware[rows]
        if banded.any():
            self.inside.add(covered[banded])
            if self.forecaster.prediction_interval is not None:  # the live coverage steers the next intervals
                self.forecaster.prediction_interval.update(seen[banded] < lower[banded], seen[banded] > upper[banded],
                                                           scale[banded])
        events: list[OutRecord] = []
        band = self.forecaster.anomaly_band
        if band is not None:
            outside, band_lower, band_upper, score = band.judge(forecast[0, rows], scale, seen, lower, upper)
            band.update(seen, band_lower, band_upper, scale)
            if outside.any():
                self.metrics.anomalies.inc(int(outside.sum()))
                if self.anomaly_topic:
                    at = np.flatnonzero(outside)
                    events = self._anomaly_events(records, parsed, rows[at], readings[rows[at]], made_at[rows[at]],
                                                  made_from[rows[at]], forecast[0, rows[at]], band_lower[at],
                                                  band_upper[at], score[at])
        m = self.metrics
        m.scored.inc(len(error))
        for t, histogram in enumerate(m.abs_error):
            histogram.observe_many(np.abs(error[:, t]))
        if m.labelled_sensors:
            sensors = [parsed.sensors[a] for a in rows.tolist()]
            for sensor, row in zip(sensors, np.abs(error).tolist()):
                if sensor in m.labelled_sensors:
                    for target, e in zip(self.forecaster.targets, row):
                        m.sensor_abs_error.labels(sensor, target).set(e)
        return events

    def _score_shadow(self, shadow: Shadow, made: np.ndarray, slots: np.ndarray, truth: np.ndarray,
                      forecast: np.ndarray, baseline: np.ndarray, scored: np.ndarray, order: tuple) -> None:
        """Score the candidate's forecasts as :meth:`_score` scores the serving model's, on the readings both
        forecast; leave its new ones pending."""
        window_of, before, inside, first, last, gaps = order
        window_made = np.full(truth.shape, np.nan, dtype=np.float32)  # per reading, the candidate's from its window
        window_made[window_of] = made
        forecast_c = np.empty_like(truth)
        forecast_c[inside] = window_made[before[inside]]
        forecast_c[first] = shadow.pending.take(slots[first])[0]
        forecast_c[gaps] = np.nan
        shadow.pending.put(slots[last], window_made[last], truth[last])
        both = scored & np.isfinite(forecast_c).all(axis=1)
        if both.any():
            seen = truth[both].astype(np.float64)
            self.metrics.shadow_scored.inc(shadow.score(forecast_c[both] - seen, forecast[both] - seen,
                                                        baseline[both] - seen))

    def _anomaly_events(self, records: Sequence[Record], parsed: _Parsed, anomalous: np.ndarray, readings: np.ndarray,
                        made_at: np.ndarray, made_from: np.ndarray, forecasts: np.ndarray, lower: np.ndarray,
                        upper: np.ndarray, scores: np.ndarray) -> list[OutRecord]:
        """The events of the ``anomalous`` accepted readings (their target values ``readings``), each named by its
        forecast's id."""
        idents, sensors, times, partitions, offsets, keys = [], [], [], [], [], []
        for a, at, source in zip(anomalous.tolist(), made_at.tolist(), made_from.tolist()):
            record, sensor, aware, stamp = records[parsed.index[a]], parsed.sensors[a], parsed.aware[a], \
                parsed.timestamps[a]
            forecast_time = None if at != at else format_time(at + self.period, aware)
            idents.append(prediction_id(sensor, forecast_time, record.partition, source))
            sensors.append(sensor)
            times.append(None if stamp != stamp else format_time(stamp, aware))
            partitions.append(record.partition)
            offsets.append(record.offset)
            keys.append(record.key)
        values = encode_anomalies(idents, sensors, times, readings.tolist(), forecasts.tolist(), lower.tolist(),
                                  upper.tolist(), scores.tolist(),
                                  self.forecaster.targets, self.forecaster.version, partitions, offsets)
        return [OutRecord(self.anomaly_topic or "", key, value, [("event", b"anomaly"), ("id", ident.encode())])
                for key, value, ident in zip(keys, values, idents)]

    def _gap_events(self, records: Sequence[Record], parsed: _Parsed) -> list[OutRecord]:
        """Gap events: readings that came after at least ``window.min_gap`` missing ones of their sensor."""
        if not self.min_gap or not parsed.gaps:
            return []
        sensors, starts, ends, missing, partitions, offsets, keys = [], [], [], [], [], [], []
        for a, since in zip(parsed.gaps, parsed.gap_from):
            stamp, aware = parsed.timestamps[a], parsed.aware[a]
            skipped = round((stamp - since) / self.period) - 1
            if skipped < self.min_gap:
                continue
            record = records[parsed.index[a]]
            sensors.append(parsed.sensors[a])
            starts.append(format_time(since, aware))
            ends.append(format_time(stamp, aware))
            missing.append(skipped)
            partitions.append(record.partition)
            offsets.append(record.offset)
            keys.append(record.key)
        self.metrics.gaps.inc(len(sensors))
        if not self.anomaly_topic:
            return []
        return [OutRecord(self.anomaly_topic, key, value, [("event", b"gap")])
                for key, value in zip(keys, encode_gaps(sensors, starts, ends, missing, partitions, offsets))]
