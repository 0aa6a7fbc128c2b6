"""The retrainer: refreshed weights on recent readings, published only past a validation gate.

Runs as its own process (training must never stall inference), one cycle every
``retrain.every`` on a monotonic clock, or once (``--once``, for cron). With
``retrain.trigger_skill`` it also starts a cycle when the fleet's live skill
against persistence, read from the daemons' health topic, has stayed below it
for ``retrain.trigger_for`` (:class:`SkillTrigger`). A cycle reads the most
recent ``retrain.history`` of readings, from the input topic with the daemon's
own parser, or from a file; trains a candidate (from the current weights or
from scratch) on at most ``model.max_windows`` windows, sampled across sensors
and time; scores candidate, current model and persistence on the most recent
slice the candidate did not train on (sampled per sensor the same way), with
the live error's metric; and publishes the candidate only if its error is
finite and lower than the current model's by at least
``retrain.min_improvement``. A failed cycle leaves the store untouched; the
next one runs as scheduled.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from .config import Config, DataConfig
from .errors import BrokerUnavailable, Interrupted, UserError
from .files import Series, read_series
from .health import MIN_SCORED
from .messages import MISSING, MessageParser, Reading
from .metrics import MetricsServer, RetrainMetrics
from .seams import Clock, Wait
from .store import IncompatibleModel, open_store

if TYPE_CHECKING:
    from .health_topic import HealthView
    from .model import Forecaster

__all__ = ["Outcome", "Retrainer", "SkillTrigger", "read_file", "read_topic", "series_from_records"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    outcome: str  # published, rejected or failed
    reason: str
    version: str | None = None
    candidate_error: float | None = None
    current_error: float | None = None
    persistence_error: float | None = None


def series_from_records(records, columns, max_bytes: int, history_s: float, source: str) -> Series:
    """Accepted readings per sensor, by the daemon's rules, within ``history_s`` of the newest one.

    A reading's time is the time it carries, else its Kafka timestamp. Each
    sensor becomes one segment, in the order its readings arrived; sensors are
    in name order. Readings are kept in blocks of numpy arrays as they arrive,
    never as Python objects: a few tens of bytes a reading, whatever the fleet.
    """
    parser = MessageParser(columns, max_bytes)
    rows = _Arrivals(len(parser.columns), history_s)
    add = rows.add
    missing = invalid = lines = 0
    for record in records:
        lines += 1
        reading = parser.parse(record.key, record.value)
        if isinstance(reading, Reading):
            add(reading.sensor, reading.timestamp if reading.timestamp is not None else record.timestamp / 1000,
                reading.values)
        elif reading is MISSING:
            missing += 1
        else:
            invalid += 1  # Invalid or a header line
    stamps, values, segments, sensors = rows.by_sensor()
    return Series(columns=parser.columns, timestamps=stamps, values=values, source=source, lines=lines,
                  missing=missing, malformed=invalid, segments=segments, sensors=sensors)


_BLOCK = 65536  # readings gathered in Python buffers before they become a block of numpy arrays


class _Arrivals:
    """Readings of many sensors in arrival order: blocks of (sensor index, time, values) arrays.

    A block holds 12 bytes a reading plus 4 a value; the buffer being filled
    is at most one block. Readings older than ``history_s`` before the newest
    seen so far can never be kept, and are dropped as each block is made.
    """

    def __init__(self, width: int, history_s: float):
        self.width, self.history_s = width, history_s
        self.ids: dict[str, int] = {}  # sensor -> index, in order of first reading
        self.blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.newest = -math.inf
        self._sensor, self._time, self._values = array("i"), array("d"), array("f")

    def add(self, sensor: str, timestamp: float, values) -> None:
        ident = self.ids.get(sensor)
        if ident is None:
            ident = self.ids[sensor] = len(self.ids)
        self._sensor.append(ident)
        self._time.append(timestamp)
        self._values.extend(values)
        if len(self._sensor) == _BLOCK:
            self._flush()

    def _flush(self) -> None:
        if not self._sensor:
            return
        block = (np.array(self._sensor, np.int32), np.array(self._time, np.float64),
                 np.array(self._values, np.float32).reshape(-1, self.width))
        self._sensor, self._time, self._values = array("i"), array("d"), array("f")
        self.newest = max(self.newest, float(block[1].max()))
        self.blocks.append(_recent(block, self.newest - self.history_s))

    def by_sensor(self) -> tuple[np.ndarray, np.ndarray, tuple[int, ...], tuple[str, ...]]:
        """``(timestamps, values, segments, sensors)`` of the readings within ``history_s`` of the newest: sensors
        by name, each one's readings in arrival order, times cut to whole seconds.

        Each block's rows are written straight to their places in the result
        (their sensor's next free rows), so the whole history is never sorted
        and no index over it is ever made; each block is freed once placed.
        """
        self._flush()
        names = sorted(self.ids)
        rank = np.empty(len(names), np.int32)
        rank[[self.ids[n] for n in names]] = np.arange(len(names), dtype=np.int32)
        counts = np.zeros(len(names), np.int64)
        for i, block in enumerate(self.blocks):
            self.blocks[i] = _recent(block, self.newest - self.history_s)
            sensor = self.blocks[i][0]
            sensor[:] = rank[sensor]  # to name order
            counts += np.bincount(sensor, minlength=len(names))
        first = np.cumsum(counts) - counts  # each sensor's first row
        fill = first.copy()  # each sensor's next free row
        out_stamps = np.empty(int(counts.sum()), np.int64)
        out_values = np.empty((len(out_stamps), self.width), np.float32)
        self.blocks.reverse()  # popped oldest first
        while self.blocks:
            sensor, stamps, values = self.blocks.pop()
            order = np.argsort(sensor, kind="stable")  # by sensor, arrival order kept
            sensor = sensor[order]
            starts = np.flatnonzero(np.concatenate([[True], sensor[1:] != sensor[:-1]]))
            within = np.arange(len(sensor)) - np.repeat(starts, np.diff(np.append(starts, len(sensor))))
            rows = fill[sensor] + within
            out_stamps[rows] = stamps[order].astype(np.int64)
            out_values[rows] = values[order]
            fill += np.bincount(sensor, minlength=len(names))
        kept = np.flatnonzero(counts)  # a sensor with nothing recent goes, name and all
        return (out_stamps, out_values, tuple(int(first[i]) for i in kept) or (0,),
                tuple(names[i] for i in kept))


def _recent(block, since: float):
    """The rows of ``block`` (sensor, time, values) at or after time ``since``."""
    keep = block[1] >= since
    return block if keep.all() else tuple(a[keep] for a in block)


def read_file(path, columns, data: DataConfig) -> Series:
    """The readings of ``columns`` in a training file (UCI, CSV or JSON lines), as ``data`` says to read it."""
    series = read_series(path, columns, ratio=data.ratio, on_error=data.on_error, time_column=data.time_column,
                         sensor_column=data.sensor_column)
    if series.duplicates:
        log.warning("%s: %d readings repeat a time already read for their sensor and were skipped (is the time "
                    "column a whole timestamp? set data.time_column)", series.source, series.duplicates)
    return series


def read_topic(config: Config, columns, stop: threading.Event) -> Series:
    """The last ``retrain.history`` of readings of the input topic, at most ``retrain.max_readings`` of them, per
    sensor, by the daemon's rules."""
    if config.kafka.client == "confluent":  # only topic-fed training needs Kafka, and only the client named
        from .confluent_io import read_history  # noqa: PLC0415
    else:
        from .topics import read_history  # noqa: PLC0415

    k, r = config.kafka, config.retrain
    since_ms = max(0, int((time.time() - r.history) * 1000))  # Kafka takes no time before 1970
    records = read_history(k, r.group_id, since_ms, stop, r.max_readings or None)
    series = series_from_records(records, columns, k.max_message_bytes, r.history, f"topic {k.input_topic}")
    if stop.is_set():
        raise Interrupted("stopped while reading history")
    return series


class SkillTrigger:
    """Whether the fleet's live skill calls for a cycle: below ``threshold`` on every look for ``hold_s``, and
    ``min_interval_s`` since the last cycle started (of any kind: one that just ran saw the same data)."""

    def __init__(self, threshold: float, hold_s: float, min_interval_s: float, clock: Clock = time.monotonic):
        self.threshold, self.hold_s, self.min_interval_s, self.clock = threshold, hold_s, min_interval_s, clock
        self.below_since: float | None = None
        self._last_cycle: float | None = None

    def cycle_started(self) -> None:
        """A cycle starts: the skill must stay low for ``hold_s`` again before it calls for another."""
        self._last_cycle, self.below_since = self.clock(), None

    def observe(self, skill: float) -> bool:
        """Note the skill just read (NaN: unknown, which is not low); True when a cycle should start now."""
        now = self.clock()
        if not skill < self.threshold:
            self.below_since = None
            return False
        if self.below_since is None:
            self.below_since = now
        rested = self._last_cycle is None or now - self._last_cycle >= self.min_interval_s
        return now - self.below_since >= self.hold_s and rested


class Retrainer:
    """``clock`` and ``wait`` pace the schedule (tests pass a manual clock's); ``fleet_skill()`` returns the
    fleet's median skill and how many sensors it counts (by default read from ``kafka.health_topic``)."""

    def __init__(self, config: Config, data_path: Path | None = None, metrics: RetrainMetrics | None = None,
                 clock: Clock = time.monotonic, wait: Wait | None = None,
                 fleet_skill: Callable[[], tuple[float, int]] | None = None):
        self.config = config
        self.data_path = data_path
        self.store = open_store(config)
        self.metrics = metrics or RetrainMetrics()
        self.stop = threading.Event()
        self.clock, self.wait = clock, wait or self.stop.wait
        self.fleet_skill = fleet_skill or self._read_fleet_skill
        self._health: HealthView | None = None  # the health topic as last read
        r = config.retrain
        self.trigger = (SkillTrigger(r.trigger_skill, r.trigger_for, r.min_interval, clock)
                        if r.trigger_skill is not None else None)
        self.columns = list(dict.fromkeys(config.data.features + config.data.targets))

    def request_stop(self, *_signal_args) -> None:
        self.stop.set()

    def run(self, once: bool = False) -> int:
        """Cycles until stopped (or one with ``once``); exit code 0, or 1 if the only cycle failed."""
        self.store.check_writable()
        server = None
        if not once:
            m = self.config.metrics
            port = self.config.retrain.metrics_port
            server = MetricsServer(self.metrics.registry, m.host, port, lambda: True).start()
            log.info("retrainer: every %.0f s, metrics on http://%s:%d/metrics", self.config.retrain.every,
                     m.host, server.port)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        try:
            reason: str | None = "schedule"
            while reason is not None:
                started = self.clock()
                self.metrics.starts[reason].inc()
                if self.trigger is not None:
                    self.trigger.cycle_started()
                try:
                    outcome = self.run_once()
                except Interrupted:
                    log.info("retrainer stopped during a cycle; nothing was published")
                    return 0
                if once:
                    return 1 if outcome.outcome == "failed" else 0
                reason = self._next_cycle(started + self.config.retrain.every)
            return 0
        finally:
            if server is not None:
                server.stop()

    def _next_cycle(self, due: float) -> str | None:
        """Wait for the next cycle: ``"schedule"`` at ``due``, ``"skill"`` sooner when the trigger says so, None
        when stopped first. The skill is read every ``metrics.health_interval``, as often as it is written."""
        while True:
            now = self.clock()
            if now >= due:
                return "schedule"
            step = due - now if self.trigger is None else min(due - now, self.config.metrics.health_interval)
            if self.wait(step):
                return None
            if self.trigger is None or self.clock() >= due:
                continue
            skill, sensors = self.fleet_skill()
            self.metrics.fleet_skill.set(skill)
            if self.trigger.observe(skill):
                log.info("retraining now: the fleet's median skill against persistence, %.4g over %d sensors, has "
                         "stayed below retrain.trigger_skill %.4g for %.0f s", skill, sensors,
                         self.trigger.threshold, self.trigger.hold_s)
                return "skill"

    def _read_fleet_skill(self) -> tuple[float, int]:
        """The median skill of the sensors in the health topic's latest rounds; NaN (logged) when unreadable."""
        from .health_topic import HealthView, fleet_median_skill, recent  # noqa: PLC0415 (Kafka only if used)

        try:
            self._health = self._health or HealthView(self.config.kafka)
            health = self._health.refresh()
        except (UserError, BrokerUnavailable) as exc:
            log.warning("the fleet's skill is unknown (%s); trying again in %.0f s", exc,
                        self.config.metrics.health_interval)
            return math.nan, 0
        return fleet_median_skill(recent(health, 2 * self.config.metrics.health_interval), MIN_SCORED)

    def run_once(self) -> Outcome:
        """One cycle: load, train, gate, maybe publish. Never raises but for :class:`Interrupted`."""
        started = time.monotonic()
        try:
            outcome = self._cycle()
        except Interrupted:
            raise
        except UserError as exc:  # bad data, a damaged store: the message says it all
            log.error("retraining failed: %s", exc)
            outcome = Outcome("failed", f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # any failure of a cycle is counted and the next cycle still runs
            log.exception("retraining failed: %s", exc)
            outcome = Outcome("failed", f"{type(exc).__name__}: {exc}")
        seconds = time.monotonic() - started
        self.metrics.runs[outcome.outcome].inc()
        self.metrics.duration.observe(seconds)
        self.metrics.last_run.labels(outcome.outcome).set(time.time())
        for name, value in (("candidate", outcome.candidate_error), ("current", outcome.current_error),
                            ("persistence", outcome.persistence_error)):
            if value is not None:
                self.metrics.error.labels(name).set(value)
        log.info("retraining %s in %.1f s: %s (version %s; %s candidate %s, current %s, persistence %s)",
                 outcome.outcome, seconds, outcome.reason, outcome.version or "-", self.config.retrain.metric,
                 _fmt(outcome.candidate_error), _fmt(outcome.current_error), _fmt(outcome.persistence_error))
        return outcome

    def load_series(self) -> Series:
        if self.data_path is not None:
            return read_file(self.data_path, self.columns, self.config.data)
        return read_topic(self.config, self.columns, self.stop)

    def _current(self) -> Forecaster | None:
        version = self.store.current()
        if version is None:
            return None
        d = self.config.data
        try:
            return self.store.load(version, expect=(d.features, d.targets, self.config.model.sequence_length),
                                   jit_compile=self.config.model.jit_compile)
        except IncompatibleModel as exc:
            log.warning("%s, as the configuration asks: training from scratch and not comparing", exc)
            return None

    def _fits(self, current: Forecaster | None) -> bool:
        """Whether ``current``'s network is the configured one, so training may start from its weights."""
        if current is None:
            return False
        m = self.config.model
        layers = current.metadata.layers
        built = (list(layers) if layers else None, current.metadata.predict, current.normalization)
        wanted = (self.config.layers(), m.predict, self.config.data.normalization)
        if built != wanted:
            log.info("current model %s has layers %s predicting the %s with %s normalisation, the configuration asks "
                     "for %s, the %s and %s: training from scratch (and still comparing)", current.version, *built,
                     *wanted)
            return False
        return True

    def _cycle(self) -> Outcome:
        from .training import backtest, train  # noqa: PLC0415 (TensorFlow)

        series = self.load_series()
        current = self._current()
        initial = current if self.config.retrain.warm_start and self._fits(current) else None
        trained = train(self.config, series, initial=initial, verbose=0, stop=self.stop)
        diverged = trained.diverged()
        if diverged:
            return Outcome("failed", diverged)
        metric = self.config.retrain.metric
        candidate = getattr(trained.test.model, metric)
        persistence = getattr(trained.test.baseline, metric)
        current_error = None
        if current is not None:
            current_error = getattr(backtest(current, series, trained.test_starts).model, metric)
        verdict = self._gate(candidate, current_error, persistence)
        if verdict is not None:
            return Outcome("rejected", verdict, None, candidate, current_error, persistence)
        reason = ("candidate beats persistence (no current model)" if current is None
                  else "candidate beats persistence and the current model")
        published = trained.forecaster.with_metadata(gate={
            "decision": "published", "reason": reason, "metric": metric,
            "candidate": candidate, "current": current_error, "current_version": current.version if current else None,
            "persistence": persistence, "min_improvement": self.config.retrain.min_improvement,
            "test_windows": int(len(trained.test_starts)),
        })
        if self.stop.is_set():
            raise Interrupted("stopped before publishing")
        if self.config.retrain.shadow and current is not None:
            # the held-out slice said yes; the live readings decide (the daemons promote it or drop it)
            version = self.store.publish(published.save, make_current=False)
            self.store.set_shadow(version)
            return Outcome("published", reason + "; in shadow until it wins live", version, candidate, current_error,
                           persistence)
        version = self.store.publish(published.save)
        return Outcome("published", reason, version, candidate, current_error, persistence)

    def _gate(self, candidate: float, current: float | None, persistence: float) -> str | None:
        """Why the candidate must not be published, or None: on the held-out slice it must beat persistence, and
        the current model by ``retrain.min_improvement``. Every test it fails is named."""
        if not math.isfinite(candidate):
            return f"candidate error is not finite ({candidate})"
        failed = []
        if math.isfinite(persistence) and not candidate < persistence:
            failed.append(f"candidate {candidate:.6g} does not beat persistence {persistence:.6g}")
        # no current model, or a broken one: anything finite is better
        if current is not None and math.isfinite(current):
            needed = current * (1.0 - self.config.retrain.min_improvement)
            if not (candidate < current and candidate <= needed):
                failed.append(f"candidate {candidate:.6g} does not beat the current {current:.6g} by "
                              f"{self.config.retrain.min_improvement:.1%} (needs <= {needed:.6g})")
        return "; ".join(failed) or None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"
