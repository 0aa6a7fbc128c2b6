"""One poll batch through parse → window → predict → publish → score. No threads.

:meth:`Pipeline.process` returns the offsets that are safe to commit: only
after every prediction (and dead letter) of the batch has been acknowledged.
Bad messages are data here, not exceptions: each is counted, logged at a bounded
rate and forwarded to the dead-letter topic, and the batch goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Sequence

import numpy as np

from .config import Config
from .metrics import Metrics
from .records import HEADER, MISSING, Invalid, MessageParser, OutRecord, Reading, encode_prediction, format_time
from .scoring import PendingForecasts, RollingErrors
from .window import SensorWindows

__all__ = ["Pipeline", "Stopped"]

log = logging.getLogger(__name__)


class Stopped(Exception):
    """Stop was requested before the batch's predictions were acknowledged; commit nothing."""


class _RateLimitedLog:
    """At most ``limit`` warnings per ``period`` seconds, then one line saying how many were held back."""

    def __init__(self, limit: int = 10, period: float = 10.0):
        self.limit, self.period = limit, period
        self._start, self._count, self._held = time.monotonic(), 0, 0

    def warning(self, message: str, *args) -> None:
        now = time.monotonic()
        if now - self._start >= self.period:
            if self._held:
                log.warning("%d more invalid messages in the last %.0f s were not logged", self._held, self.period)
            self._start, self._count, self._held = now, 0, 0
        if self._count < self.limit:
            self._count += 1
            log.warning(message, *args)
        else:
            self._held += 1


class Pipeline:
    """Per-sensor windows and forecasts over a stream of Kafka records."""

    def __init__(self, config: Config, forecaster, sink, metrics: Metrics, stop: threading.Event | None = None):
        self.forecaster = forecaster
        self.sink, self.metrics = sink, metrics
        self.stop = stop or threading.Event()
        self.output_topic = config.kafka.output_topic
        self.dead_letter_topic = config.kafka.dead_letter_topic
        self.interval = config.data.interval
        self.idle_ttl = config.window.idle_ttl
        features, targets = forecaster.features, forecaster.targets
        self.columns = tuple(dict.fromkeys(features + targets))
        self.feature_index = [self.columns.index(c) for c in features]
        self.target_index = [self.columns.index(c) for c in targets]
        self._all_features = self.feature_index == list(range(len(self.columns)))
        self.parser = MessageParser(self.columns, config.kafka.max_message_bytes)
        self.windows = SensorWindows(forecaster.sequence_length - 1, len(self.columns))
        self.pending = PendingForecasts(len(targets))
        self.model_errors = RollingErrors(config.metrics.rolling_window, len(targets))
        self.baseline_errors = RollingErrors(config.metrics.rolling_window, len(targets))
        metrics.bind_rolling(targets, self.model_errors, self.baseline_errors)
        self._invalid_log = _RateLimitedLog()
        self._batch = np.empty((0, forecaster.sequence_length - 1, len(features)), dtype=np.float32)

    def rebuild(self, records) -> int:
        """Refill windows from readings whose forecasts were already published: nothing is published.

        The forecast each refilled sensor had pending (made from its last
        window) is recomputed, so the next reading is scored as if the daemon
        had never stopped. Returns the number of readings replayed.
        """
        now, replayed, last_full = time.monotonic(), 0, {}
        for record in records:
            reading = self.parser.parse(record.key, record.value)
            if not isinstance(reading, Reading):
                continue
            replayed += 1
            slot = self.windows.slot(reading.sensor, record.partition)
            if self.windows.append(slot, reading.values, now):
                last_full[slot] = np.asarray(reading.values, dtype=np.float32)[self.target_index]
            else:
                last_full.pop(slot, None)
                self.pending.clear(slot)
        if last_full:
            slots = list(last_full)
            windows = np.stack([self.windows.window(s) for s in slots])
            if not self._all_features:
                windows = windows[:, :, self.feature_index]
            for slot, forecast in zip(slots, self.forecaster.forecast(windows)):
                self.pending.put(slot, forecast, last_full[slot])
        self.metrics.rebuilt.inc(replayed)
        self.metrics.active_sensors.set(len(self.windows))
        return replayed

    def drop_partitions(self, partitions) -> int:
        """Forget the sensors of partitions this daemon no longer owns."""
        slots = self.windows.drop_partitions(partitions)
        for slot in slots:
            self.pending.clear(slot)
        self.metrics.active_sensors.set(len(self.windows))
        return len(slots)

    def evict_idle(self, now: float | None = None) -> int:
        """Drop the windows (and pending forecasts) of sensors idle longer than ``window.idle_ttl``."""
        slots = self.windows.evict_idle(time.monotonic() if now is None else now, self.idle_ttl)
        for slot in slots:
            self.pending.clear(slot)
        self.metrics.evicted.inc(len(slots))
        self.metrics.active_sensors.set(len(self.windows))
        return len(slots)

    def swap_model(self, forecaster) -> None:
        """Serve ``forecaster`` from the next batch on; windows and pending forecasts carry over.

        The caller has checked that features, targets and window length match.
        """
        self.forecaster = forecaster

    def process(self, records: Sequence) -> dict[tuple[str, int], int]:
        """Handle one poll batch; return ``{(topic, partition): next offset}`` to commit."""
        accepted, window_of, dead_letters = self._parse_and_window(records)
        predictions = self._predict(len(window_of))
        self._publish(records, accepted, window_of, predictions, dead_letters)
        self._score(accepted, window_of, predictions)
        self.metrics.batch_size.observe(len(records))
        self.metrics.active_sensors.set(len(self.windows))
        offsets: dict[tuple[str, int], int] = {}
        for r in records:
            offsets[(r.topic, r.partition)] = max(offsets.get((r.topic, r.partition), 0), r.offset + 1)
        return offsets

    def _parse_and_window(self, records):
        """Accepted readings as (record index, slot, reading); per window, its accepted index; dead letters."""
        accepted, window_of, dead_letters = [], [], []
        now = time.monotonic()
        if len(self._batch) < len(records):
            self._batch = np.empty((len(records),) + self._batch.shape[1:], dtype=np.float32)
        m = self.metrics
        for i, record in enumerate(records):
            reading = self.parser.parse(record.key, record.value)
            if reading is MISSING:
                m.missing.inc()
                continue
            if reading is HEADER:
                m.ignored.inc()
                continue
            if isinstance(reading, Invalid):
                self._invalid(record, reading, dead_letters)
                continue
            m.accepted.inc()
            slot = self.windows.slot(reading.sensor, record.partition)
            full = self.windows.append(slot, reading.values, now)
            if full:
                window = self.windows.window(slot)
                self._batch[len(window_of)] = window if self._all_features else window[:, self.feature_index]
                window_of.append(len(accepted))
            accepted.append((i, slot, reading))
        return accepted, window_of, dead_letters

    def _predict(self, n: int) -> np.ndarray:
        if n == 0:
            return np.empty((0, len(self.forecaster.targets)), dtype=np.float32)
        started = time.perf_counter()
        predictions = self.forecaster.forecast(self._batch[:n])
        self.metrics.inference_seconds.observe(time.perf_counter() - started)
        return predictions

    def _publish(self, records, accepted, window_of, predictions, dead_letters) -> None:
        out = []
        version = self.forecaster.version
        targets = self.forecaster.targets
        for k, a in enumerate(window_of):
            i, _, reading = accepted[a]
            record = records[i]
            when = None
            if reading.timestamp is not None:
                when = format_time(reading.timestamp + self.interval, reading.aware)
            # the same reading always gets the same id, so at-least-once repeats are recognisable downstream
            ident = f"{reading.sensor}@{when}" if when else f"{reading.sensor}@{record.partition}/{record.offset}"
            value = encode_prediction(ident, reading.sensor, when, predictions[k], targets, version,
                                      record.partition, record.offset)
            out.append(OutRecord(self.output_topic, record.key, value,
                                 [("prediction_id", ident.encode()), ("model_version", (version or "").encode())]))
        if not self.sink.publish(dead_letters + out, self.stop):
            raise Stopped()
        now_ms = time.time() * 1000
        for a in window_of:
            self.metrics.latency_seconds.observe(max(0.0, now_ms - records[accepted[a][0]].timestamp) / 1000)
        self.metrics.predictions.inc(len(out))
        self.metrics.dead_letters.inc(len(dead_letters))

    def _invalid(self, record, invalid: Invalid, dead_letters: list) -> None:
        self.metrics.invalid.inc()
        self._invalid_log.warning("invalid message at %s[%d]@%d from sensor %r: %s",
                                  record.topic, record.partition, record.offset, invalid.sensor, invalid.reason)
        if self.dead_letter_topic:
            headers = list(record.headers or []) + [
                ("error", invalid.reason.encode()),
                ("source", f"{record.topic}/{record.partition}/{record.offset}".encode()),
            ]
            dead_letters.append(OutRecord(self.dead_letter_topic, record.key, record.value or b"", headers))

    def _score(self, accepted, window_of, predictions) -> None:
        m = self.metrics
        has_window = dict(zip(window_of, range(len(window_of))))
        targets = self.target_index
        for a, (_, slot, reading) in enumerate(accepted):
            truth = np.asarray(reading.values, dtype=np.float32)[targets]
            pending = self.pending.take(slot)
            if pending is not None and np.isfinite(pending[0]).all():
                forecast, baseline = pending
                error = forecast - truth
                self.model_errors.add(error)
                self.baseline_errors.add(baseline - truth)
                m.scored.inc()
                for t, e in enumerate(np.abs(error)):
                    m.abs_error[t].observe(float(e))
                    if reading.sensor in m.labelled_sensors:
                        m.sensor_abs_error.labels(reading.sensor, self.forecaster.targets[t]).set(float(e))
            k = has_window.get(a)
            if k is not None:
                self.pending.put(slot, predictions[k], truth)
