"""In-memory stand-ins for every seam of :mod:`stream_forecaster.seams`: sources, a sink, checkpoints, a
forecaster that needs no TensorFlow, and a clock that moves only when told.

Shipped with the package (as bytewax ships its testing helpers) so users can
test their own configurations without a broker or a model::

    topic = MemoryTopic("readings", partitions=2)
    topic.append(0, b"sensor-1", b'{"value": 4.2}')
    stop, sink, clock = threading.Event(), ListSink(), ManualClock()
    forecaster = StubForecaster(config.data.features, config.data.targets, config.model.sequence_length)
    Daemon(config, source=LogSource(topic, stop_when_done=stop), sink=sink, stop=stop, clock=clock,
           wait=clock.wait, checkpoints=topic.checkpoints, forecaster=forecaster).run()
    # sink.records: the forecasts; topic.commits: what was committed

``tests/test_daemon_fakes.py`` runs the daemon this way.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .intervals import AdaptiveInterval, AnomalyBand
from .messages import OutRecord
from .seams import Offsets
from .store import ModelMetadata

__all__ = ["FakeRecord", "ListSink", "ListSource", "LogSource", "ManualClock", "MemoryCheckpoints", "MemoryTopic",
           "StubForecaster"]


@dataclass(frozen=True)
class FakeRecord:
    """What the pipeline reads of a Kafka consumer record."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int = 0  # ms
    headers: Sequence[tuple[str, bytes]] = ()


class ListSource:
    """Hands out ``batches`` one per poll, then sets ``stop_when_done`` if given; records commits, after
    refusing the first ``refuse_commits`` (as when the group coordinator moves).

    Every partition of the batches is assigned at the first :meth:`take_changes`,
    with nothing committed; :meth:`read_range` reads the batches' records as a log.
    """

    calls_before_revoke = True  # it never revokes

    def __init__(self, batches: Sequence[Sequence[FakeRecord]], stop_when_done: threading.Event | None = None,
                 refuse_commits: int = 0):
        self.batches = [list(b) for b in batches]
        self._log = sorted({(r.partition, r.offset): r for b in self.batches for r in b}.items())
        self.commits: list[dict] = []
        self.refuse_commits = refuse_commits
        self.closed = False
        self._stop = stop_when_done
        assigned = {r.partition for b in self.batches for r in b} or {0}
        self._changes: tuple[set[int], set[int], set[int]] = (set(), assigned, set())

    def poll(self, timeout_s: float, max_records: int | None = None, before_revoke=None) -> list:
        if self.batches:
            return self.batches.pop(0)
        if self._stop is not None:
            self._stop.set()
        return []

    def commit(self, offsets: Offsets) -> bool:
        if self.refuse_commits:
            self.refuse_commits -= 1
            return False
        self.commits.append(dict(offsets))
        return True

    def rewind(self, records) -> None:
        if records:
            self.batches.insert(0, list(records))

    def seek(self, partition: int, offset: int | None) -> None:
        pass  # never called: it regains no partition, and its batches are handed out as given

    def lag(self):
        return sum(len(b) for b in self.batches)

    def assigned(self) -> bool:
        return True

    def take_changes(self) -> tuple[set[int], set[int], set[int]]:
        changes, self._changes = self._changes, (set(), set(), set())
        return changes

    def committed(self, partition: int) -> int | None:
        return None

    def beginning(self, partition: int) -> int:
        return min((o for p, o in (k for k, _ in self._log) if p == partition), default=0)

    def read_range(self, partition: int, start: int, end: int, stop: threading.Event) -> Iterator[FakeRecord]:
        for (p, offset), record in self._log:
            if p == partition and start <= offset < end and not stop.is_set():
                yield record

    def close(self) -> None:
        self.closed = True


class MemoryCheckpoints:
    """The state topic in memory: every checkpoint written, per input partition, and every snapshot."""

    def __init__(self):
        self.written: dict[int, list[str]] = {}
        self.snapshots: list[bytes] = []

    def write(self, checkpoints: dict[int, str], stop: threading.Event | None = None) -> bool:
        for partition, text in checkpoints.items():
            self.written.setdefault(partition, []).append(text)
        return True

    def read(self, partition: int) -> str | None:
        written = self.written.get(partition)
        return written[-1] if written else None

    def write_snapshot(self, partition: int, at: int, data: bytes) -> dict | None:
        self.snapshots.append(data)
        return {"at": at, "index": len(self.snapshots) - 1}

    def read_snapshot(self, partition: int, ref: dict) -> bytes | None:
        return self.snapshots[ref["index"]]


class MemoryTopic:
    """A partitioned log, one consumer group's commits and its checkpoints: what outlives a daemon that restarts."""

    def __init__(self, name: str = "in", partitions: int = 1):
        self.name = name
        self.logs: list[list[FakeRecord]] = [[] for _ in range(partitions)]
        self.commits: dict[int, int] = {}  # partition -> next offset
        self.checkpoints = MemoryCheckpoints()

    def append(self, partition: int, key: bytes | None, value: bytes | None, timestamp: int = 0) -> FakeRecord:
        log = self.logs[partition]
        record = FakeRecord(self.name, partition, len(log), key, value, timestamp)
        log.append(record)
        return record


class LogSource:
    """A group member reading a :class:`MemoryTopic` from its committed offsets, ``batch`` records a poll; sets
    ``stop_when_done`` once it has handed out everything (a clean stop at the end of the log)."""

    calls_before_revoke = True

    def __init__(self, topic: MemoryTopic, stop_when_done: threading.Event | None = None, batch: int = 100):
        self.topic, self.batch, self._stop = topic, batch, stop_when_done
        self.positions = {p: topic.commits.get(p, 0) for p in range(len(topic.logs))}
        self._changes: tuple[set[int], set[int], set[int]] = (set(), set(self.positions), set())
        self._revoking: set[int] = set()
        self.closed = False

    def revoke(self, partitions: set[int]) -> None:
        """Revoke ``partitions`` in the next poll, as a rebalance would: ``before_revoke`` first, then they are
        lost, and the poll hands out nothing."""
        self._revoking |= partitions

    def regain(self, partitions: set[int]) -> None:
        """Report ``partitions`` regained at the next :meth:`take_changes`, as after a rebalance that left them
        here; their positions stay where they are, as kafka-python keeps them."""
        lost, gained, regained = self._changes
        self._changes = (lost, gained, regained | partitions)

    def poll(self, timeout_s: float, max_records: int | None = None, before_revoke=None) -> list:
        if self._revoking:
            if before_revoke is not None:
                before_revoke()
            lost, self._revoking = self._revoking, set()
            for partition in lost:
                del self.positions[partition]
            self._changes = (self._changes[0] | lost, self._changes[1] - lost, self._changes[2])
            return []
        limit = min(self.batch, max_records or self.batch)
        for partition, position in self.positions.items():
            records = self.topic.logs[partition][position:position + limit]
            if records:
                self.positions[partition] = position + len(records)
                return records
        if self._stop is not None:
            self._stop.set()
        return []

    def take_changes(self):
        changes, self._changes = self._changes, (set(), set(), set())
        return changes

    def committed(self, partition: int):
        return self.topic.commits.get(partition)

    def beginning(self, partition: int) -> int:
        return 0

    def read_range(self, partition: int, start: int, end: int, stop: threading.Event) -> Iterator[FakeRecord]:
        yield from self.topic.logs[partition][start:end]

    def seek(self, partition: int, offset: int | None) -> None:
        if partition in self.positions:
            self.positions[partition] = 0 if offset is None else offset

    def commit(self, offsets: Offsets) -> bool:
        if any(partition not in self.positions for _, partition in offsets):
            return False  # the group refuses a commit for a partition the member no longer has
        for (_, partition), offset in offsets.items():
            self.topic.commits[partition] = offset
        return True

    def rewind(self, records) -> None:
        for r in records:
            if r.partition in self.positions:
                self.positions[r.partition] = min(self.positions[r.partition], r.offset)

    def lag(self):
        return sum(len(self.topic.logs[p]) - o for p, o in self.positions.items())

    def assigned(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


@dataclass
class ListSink:
    """Keeps what is published; fails the first ``failures`` publish attempts (each retried, as Kafka's is)."""

    records: list[OutRecord] = field(default_factory=list)
    failures: int = 0
    attempts: int = 0
    closed: bool = False
    queued: list[OutRecord] = field(default_factory=list)

    def queue(self, records: Sequence[OutRecord]) -> None:
        self.queued.extend(records)

    def publish(self, records: Sequence[OutRecord] = (), stop: threading.Event | None = None) -> bool:
        self.queue(records)
        while True:
            self.attempts += 1
            if self.failures == 0:
                self.records.extend(self.queued)
                self.queued.clear()
                return True
            self.failures -= 1
            if stop is not None and stop.is_set():
                self.queued.clear()  # given up: the caller reads its input again
                return False

    def close(self) -> None:
        self.closed = True


class StubForecaster:
    """A forecaster without TensorFlow: each target's last reading plus ``step`` times the window's spread.

    Its scale is what the real model's window normalisation gives (each
    column's standard deviation over the window), so intervals, scoring and
    metrics see the same kind of numbers. ``interval`` (an
    :class:`~stream_forecaster.intervals.AdaptiveInterval`) publishes bounds; ``anomaly_band``
    (:class:`~stream_forecaster.intervals.AnomalyBand`) judges readings.
    ``windows_seen`` counts the windows forecast.
    """

    def __init__(self, features: Sequence[str], targets: Sequence[str], sequence_length: int,
                 version: str | None = "1", step: float = 0.0, interval: AdaptiveInterval | None = None,
                 created: str | None = None, anomaly_band: AnomalyBand | None = None):
        self.features, self.targets = tuple(features), tuple(targets)
        missing = set(self.targets) - set(self.features)
        if missing:
            raise ValueError(f"the stub forecasts from each target's last reading: {sorted(missing)} must be features")
        self.sequence_length, self.version, self.step = sequence_length, version, step
        self.prediction_interval = interval
        self.anomaly_band = anomaly_band
        self.metadata = ModelMetadata(self.features, self.targets, sequence_length, {"method": "window"},
                                      created=created)
        self._last = [self.features.index(t) for t in self.targets]
        self.windows_seen = 0
        self._lock = threading.Lock()

    def forecast_scaled(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        windows = np.asarray(windows, dtype=np.float32)
        expected = (self.sequence_length - 1, len(self.features))
        if windows.ndim != 3 or windows.shape[1:] != expected:
            raise ValueError(f"expected windows of shape [n, {expected[0]}, {expected[1]}], got {windows.shape}")
        with self._lock:
            self.windows_seen += len(windows)
        scale = windows[:, :, self._last].astype(np.float64).std(axis=1)
        return (windows[:, -1, self._last] + self.step * scale).astype(np.float32), scale

    def bounds(self, predictions: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        return None if self.prediction_interval is None else self.prediction_interval.bounds(predictions, scale)

    def calls(self, n: int) -> list[int]:
        return [n] if n else []

    def warm_up(self, largest: int = 1) -> None:
        pass


class ManualClock:
    """A monotonic clock that moves only when told; :meth:`wait` moves it instead of sleeping.

    Pass it as a daemon's ``clock`` and its :meth:`wait` as ``wait``: retries
    and backoffs then take no time, and a test sees exactly how long they
    would have waited (``waited``).
    """

    def __init__(self, start: float = 0.0, stop: threading.Event | None = None):
        self.now, self.stop = start, stop
        self.waited: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def wait(self, seconds: float) -> bool:
        self.waited.append(seconds)
        self.advance(seconds)
        return self.stop is not None and self.stop.is_set()
