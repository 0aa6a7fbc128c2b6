"""In-memory stand-ins for the Kafka source and sink, for tests of the pipeline and daemon.

Shipped with the package (as bytewax ships its testing helpers) so users can
test their own configurations without a broker.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from .records import OutRecord

__all__ = ["FakeRecord", "ListSink", "ListSource"]


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
        return set(), set(), set()

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
