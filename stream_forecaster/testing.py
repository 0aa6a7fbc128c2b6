"""In-memory stand-ins for the Kafka source and sink, for tests of the pipeline and daemon.

Shipped with the package (as bytewax ships its testing helpers) so users can
test their own configurations without a broker.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from .records import OutRecord

__all__ = ["FakeRecord", "ListSink", "ListSource", "LogSource", "MemoryCheckpoints", "MemoryTopic"]


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
    refusing the first ``refuse_commits`` (as when the group coordinator moves)."""

    def __init__(self, batches: Sequence[Sequence[FakeRecord]], stop_when_done: threading.Event | None = None,
                 refuse_commits: int = 0):
        self.batches = [list(b) for b in batches]
        self.commits: list[dict] = []
        self.refuse_commits = refuse_commits
        self.closed = False
        self._stop = stop_when_done
        self._changes = (set(), {r.partition for b in self.batches for r in b} or {0}, set())

    def poll(self, timeout_s: float, max_records: int | None = None) -> list:
        if self.batches:
            return self.batches.pop(0)
        if self._stop is not None:
            self._stop.set()
        return []

    def commit(self, offsets) -> bool:
        if self.refuse_commits:
            self.refuse_commits -= 1
            return False
        self.commits.append(dict(offsets))
        return True

    def rewind(self, records) -> None:
        if records:
            self.batches.insert(0, list(records))

    def lag(self):
        return sum(len(b) for b in self.batches)

    def assigned(self) -> bool:
        return True

    def take_changes(self):
        """The partitions of every batch are assigned once, at the first call, with nothing committed."""
        changes, self._changes = self._changes, (set(), set(), set())
        return changes

    def committed(self, partition):
        return None

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
        return (self.written.get(partition) or [None])[-1]

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

    def __init__(self, topic: MemoryTopic, stop_when_done: threading.Event | None = None, batch: int = 100):
        self.topic, self.batch, self._stop = topic, batch, stop_when_done
        self.checkpoints = topic.checkpoints
        self.positions = {p: topic.commits.get(p, 0) for p in range(len(topic.logs))}
        self._changes = (set(), set(self.positions), set())
        self.closed = False

    def poll(self, timeout_s: float, max_records: int | None = None) -> list:
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

    def read_range(self, partition: int, start: int, end: int, stop: threading.Event):
        yield from self.topic.logs[partition][start:end]

    def commit(self, offsets) -> bool:
        for (_, partition), offset in offsets.items():
            self.topic.commits[partition] = offset
        return True

    def rewind(self, records) -> None:
        for r in records:
            self.positions[r.partition] = min(self.positions[r.partition], r.offset)

    def lag(self):
        return sum(len(self.topic.logs[p]) - o for p, o in self.positions.items())

    def assigned(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


@dataclass
class ListSink:
    """Keeps what is published; fails the first ``failures`` publish attempts."""

    records: list[OutRecord] = field(default_factory=list)
    failures: int = 0
    attempts: int = 0
    closed: bool = False

    def publish(self, records: Iterable[OutRecord], stop: threading.Event | None = None) -> bool:
        records = list(records)
        while True:
            self.attempts += 1
            if self.failures == 0:
                self.records.extend(records)
                return True
            self.failures -= 1
            if stop is not None and stop.is_set():
                return False

    def close(self) -> None:
        self.closed = True
