"""Partition ownership and recovery: which partitions are ours, refilling their windows, commits, eviction.

Checkpoints. Before each commit, a checkpoint of the partition is written to the
state topic (compacted, keyed by the input partition): the offset being
committed, the oldest offset still inside any of the partition's windows
(``refill_from``), the evictions since, and where the latest snapshot of the
partition's windows lies. The checkpoint is written ahead of the commit and
carries the last committed one too, so whichever of the two a crash left
committed is found.

Refills. A new owner (after a restart, a deploy, a rebalance) loads the
snapshot and replays the readings after it, or, without one, replays
``[refill_from, committed)``; either way through the pipeline's own ingest path,
so every window comes back as it was, at any fleet size, and nothing is read
that no window needs. Snapshots are written every ``window.snapshot_interval``:
replaying every window's readings costs ``sequence_length - 1`` readings per
sensor, which at 100,000 sensors is minutes; a snapshot bounds the replay by
the interval instead of the fleet.

Why not Kafka's commit metadata, a string kept with each committed offset,
which would make checkpoint and offset one write: the development broker drops
it. Why not a changelog of every window update, as Kafka Streams keeps: it
doubles the writes, for restores no faster than a snapshot's.

Eviction. A sensor without a reading for ``window.idle_ttl`` is evicted, by the
daemon's own monotonic clock, never a producer's. The clock is turned into
offsets: each partition keeps marks of how far it had been read when, so
"silent since ``now - idle_ttl``" becomes "last read before offset ``before``".
Each eviction ``(at, before)`` goes into the checkpoints, and a refill applies
it at the same place (a second time on a snapshot that has it changes
nothing), so refill and live path make the same decisions from the same
readings.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .config import Config
from .seams import Checkpoints, Clock, Offsets, Source

if TYPE_CHECKING:
    from .metrics import Metrics
    from .pipeline import Pipeline

__all__ = ["Checkpoint", "PartitionState", "Recovery"]

log = logging.getLogger(__name__)

MAX_EVICTIONS = 1000  # kept in a checkpoint, the newest; more would only matter for windows spanning months
MARKS_PER_TTL = 100  # eviction runs at most idle_ttl / this late


@dataclass(frozen=True)
class Checkpoint:
    """What a refill of one partition up to ``committed`` needs."""

    committed: int
    refill_from: int
    evictions: tuple[tuple[int, int], ...] = ()  # (at, before): see the module's docstring
    snapshot: dict | None = None  # the latest snapshot of the windows: {"at": offset, ...where the store put it}

    def encode(self, previous: "Checkpoint | None") -> str:
        def fields(c):
            return {"committed": c.committed, "refill_from": c.refill_from,
                    "evictions": [list(e) for e in c.evictions[-MAX_EVICTIONS:]], "snapshot": c.snapshot}
        return json.dumps({**fields(self), "previous": fields(previous) if previous else None},
                          separators=(",", ":"))

    @staticmethod
    def decode(text: str | None, committed: int) -> "Checkpoint | None":
        """The checkpoint for ``committed`` in ``text`` (its own, or the previous one it carries); None if neither
        matches or the text is not a checkpoint."""
        try:
            data = json.loads(text or "")
            for c in (data, data.get("previous") or {}):
                if c.get("committed") == committed:
                    start = c["refill_from"]
                    if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start <= committed:
                        return None
                    snapshot = c.get("snapshot")
                    if not (isinstance(snapshot, dict) and isinstance(snapshot.get("at"), int)
                            and 0 <= snapshot["at"] <= committed):
                        snapshot = None
                    return Checkpoint(committed, start, tuple((int(at), int(b)) for at, b in c.get("evictions", ())),
                                      snapshot)
        except (ValueError, TypeError, KeyError, AttributeError):
            pass
        return None


@dataclass
class PartitionState:
    """One assigned partition, from assignment through its refill to each commit."""

    refilling: bool = True  # its windows must be refilled before its readings count
    checking: bool = False  # regained in a rebalance: still ours only if nothing was re-read
    moved: bool = False  # regained, but the group's committed offset is not where this member read to
    processed: int | None = None  # next offset after the last reading handled
    committed: Checkpoint | None = None  # the last checkpoint committed
    dirty: bool = False  # the windows changed since the last commit (an eviction)
    snapshot: dict | None = None  # the latest snapshot written, or restored
    snapshot_time: float = float("-inf")  # when it was written (monotonic)
    marks: deque = field(default_factory=deque)  # (monotonic time, processed then)
    evictions: list = field(default_factory=list)  # (at, before) since the oldest reading a window holds


class Recovery:
    """Owns the partitions' state; the daemon calls it around each poll.

    Without ``checkpoints`` (no state topic), every refill falls back to ``window.rebuild_messages``.
    """

    def __init__(self, config: Config, source: Source, pipeline: Pipeline, metrics: Metrics, stop: threading.Event,
                 checkpoints: Checkpoints | None = None, clock: Clock = time.monotonic):
        self.source, self.pipeline, self.metrics, self.stop, self.clock = source, pipeline, metrics, stop, clock
        self.checkpoints = checkpoints
        self.topic = config.kafka.input_topic
        self.idle_ttl = config.window.idle_ttl
        self.snapshot_interval = config.window.snapshot_interval
        self.fallback_messages = config.window.rebuild_messages
        self.partitions: dict[int, PartitionState] = {}

    # -- ownership and refills -------------------------------------------------------------------------------

    def take_changes(self) -> None:
        """Take the assignment's changes: drop lost partitions, mark gained ones for a refill, and regained ones
        for a check (:meth:`refill` does both)."""
        lost, gained, regained = self.source.take_changes()
        if lost:
            dropped = self.pipeline.drop_partitions(lost)
            for partition in lost:
                self.partitions.pop(partition, None)
            log.info("partitions %s revoked: %d sensors dropped", sorted(lost), dropped)
        for partition in gained:
            self.partitions[partition] = PartitionState()
        for partition in regained:
            state = self.partitions.setdefault(partition, PartitionState())
            state.checking = not state.refilling
        self.metrics.rebuilding.set(self.refilling())

    def refill(self) -> set[int]:
        """Check the regained partitions and refill those that need it; return the partitions the source was moved
        back to the group's committed offset (the poll's records of those come again: drop them).

        The broker calls may fail midway (a coordinator moving): what is not
        done yet stays marked for the next call.
        """
        for partition, state in sorted(self.partitions.items()):
            if state.checking:
                # still ours only if the group will not make us re-read: committed must be where we are
                state.refilling = state.moved = self.source.committed(partition) != state.processed
                state.checking = False
        self.metrics.rebuilding.set(self.refilling())
        moved = set()
        for partition, state in sorted(self.partitions.items()):
            if state.refilling:
                if self.stop.is_set():
                    break  # the rest stay to be refilled; the loop stops without reading them
                if self._refill(partition, state):
                    moved.add(partition)
        return moved

    def refilling(self) -> int:
        return sum(s.refilling or s.checking for s in self.partitions.values())

    def _refill(self, partition: int, state: PartitionState) -> bool:
        """Refill the windows of ``partition`` as its checkpoint says: from the latest snapshot and the readings
        after it, or from the oldest reading a window held; True if the source was moved to where it ends.

        A regained partition keeps its position in kafka-python, the offset this
        member read to: where the group's committed offset is elsewhere (another
        member's, or none after the broker lost its offsets), the source is moved
        there, so no reading between the two is skipped.
        """
        # whatever is there (a stale window, an earlier attempt cut short) would be counted twice
        self.pipeline.drop_partitions({partition})
        state.processed = state.committed = state.snapshot = None
        state.evictions, state.marks = [], deque()
        end = self.source.committed(partition)
        if end is not None:
            started = time.monotonic()
            checkpoint = self._checkpoint(partition, end)
            start, snapshot = checkpoint.refill_from, checkpoint.snapshot
            if snapshot is not None and snapshot["at"] > start and self._restore(partition, snapshot):
                start = snapshot["at"]
            else:
                snapshot = None
            start = max(self.source.beginning(partition), start)
            records = self.source.read_range(partition, start, end, self.stop) if start < end else iter(())
            n = self.pipeline.refill(partition, records, checkpoint.evictions)
            log.info("partition %d: windows refilled from %s%d readings (offsets %d-%d) in %.2f s", partition,
                     "a snapshot and " if snapshot else "", n, start, end - 1, time.monotonic() - started)
            if self.stop.is_set():
                return False  # cut short: refilled again, from scratch, by whoever reads it next
            state.processed, state.committed, state.snapshot = end, checkpoint, snapshot
            state.evictions = list(checkpoint.evictions)
            state.marks.append((self.clock(), end))
            state.snapshot_time = self.clock()
        moved, state.moved = state.moved, False
        if moved:
            self.source.seek(partition, end)
        state.refilling = False
        self.metrics.rebuilding.set(self.refilling())
        return moved

    def _restore(self, partition: int, snapshot: dict) -> bool:
        data = self.checkpoints.read_snapshot(partition, snapshot) if self.checkpoints is not None else None
        if data is None:
            log.warning("partition %d: the snapshot at offset %d is gone; replaying every window's readings instead",
                        partition, snapshot["at"])
            return False
        try:
            self.pipeline.restore(partition, data)
        except ValueError as exc:  # windows of another model, say
            log.warning("partition %d: the snapshot at offset %d does not fit (%s); replaying every window's "
                        "readings instead", partition, snapshot["at"], exc)
            return False
        return True

    def _checkpoint(self, partition: int, committed: int) -> Checkpoint:
        """The checkpoint written for the committed offset, or a fallback replaying ``window.rebuild_messages``."""
        found = Checkpoint.decode(self.checkpoints.read(partition), committed) if self.checkpoints else None
        if found is not None:
            return found
        if committed:
            log.warning("partition %d: no checkpoint for its committed offset %d (committed by another tool or an "
                        "earlier version, or the state topic is lost or off); replaying up to "
                        "window.rebuild_messages (%d) readings", partition, committed, self.fallback_messages)
        return Checkpoint(committed, max(0, committed - self.fallback_messages))

    def ready(self) -> bool:
        """Partitions are assigned and none is waiting for its windows."""
        return bool(self.partitions) and not self.refilling() and self.source.assigned()

    # -- progress and commits --------------------------------------------------------------------------------

    def processed(self, offsets: Offsets) -> None:
        """Note how far each partition was read (``{(topic, partition): next offset}``) and when."""
        now = self.clock()
        for (_, partition), offset in offsets.items():
            state = self.partitions.get(partition)
            if state is None:
                continue
            state.processed = offset
            if not state.marks or now - state.marks[-1][0] >= self.idle_ttl / MARKS_PER_TTL:
                state.marks.append((now, offset))

    def prepare(self, ahead: Offsets | None = None) -> dict[int, Checkpoint]:
        """The checkpoint of each partition read further (or whose windows changed) since its last commit, as its
        windows stand now: read up to its processed offset, or up to ``ahead``'s (batches added to the windows,
        their forecasts not yet acknowledged). Writes the snapshots that are due.

        Taken when the windows hold exactly what the checkpoint's offset says;
        :meth:`commit` commits it once those batches are processed.
        """
        read = {p: s.processed for p, s in self.partitions.items() if s.processed is not None}
        read.update((p, offset) for (_, p), offset in (ahead or {}).items() if p in self.partitions)
        due = {p: (s, read[p]) for p, s in self.partitions.items() if p in read
               and not (s.refilling or s.checking)
               and (s.dirty or s.committed is None or read[p] != s.committed.committed)}
        if not due:
            return {}
        starts = self.pipeline.windows.refill_starts(list(due))
        made, now = {}, self.clock()
        for partition, (state, offset) in due.items():
            if (self.checkpoints is not None and self.snapshot_interval
                    and now - state.snapshot_time >= self.snapshot_interval):
                state.snapshot_time = now
                snapshot = self.checkpoints.write_snapshot(partition, offset, self.pipeline.snapshot(partition))
                state.snapshot = snapshot or state.snapshot
            start = min(starts.get(partition, offset), offset)
            # kept while a refill may need them: one from the oldest window reading, or one from the snapshot
            after = state.snapshot["at"] if state.snapshot else start
            state.evictions = [e for e in state.evictions if e[1] > start or e[0] >= after][-MAX_EVICTIONS:]
            made[partition] = Checkpoint(offset, start, tuple(state.evictions), state.snapshot)
        return made

    def commit(self, prepared: dict[int, Checkpoint] | None = None) -> bool:
        """Checkpoint and commit ``prepared`` (:meth:`prepare`'s, its batches now processed), or else each
        partition read further (or whose windows changed) since its last commit.

        Without ``prepared``, the windows must hold nothing past the processed
        offsets. A failed commit is tried again on the next call: an idle
        partition would never commit again, and a clean stop would repeat its batch.
        """
        made = self.prepare() if prepared is None else {
            p: c for p, c in prepared.items() if p in self.partitions
            and c.committed == self.partitions[p].processed and c != self.partitions[p].committed}
        if not made:
            return True
        if self.checkpoints is not None:
            written = {p: c.encode(self.partitions[p].committed) for p, c in made.items()}
            if not self.checkpoints.write(written, self.stop):
                return False
        if not self.source.commit({(self.topic, p): c.committed for p, c in made.items()}):
            return False
        for partition, checkpoint in made.items():
            state = self.partitions[partition]
            state.committed, state.dirty = checkpoint, False
        return True

    # -- eviction --------------------------------------------------------------------------------------------

    def evict(self) -> int:
        """Evict the sensors silent for ``idle_ttl`` by this daemon's clock; returns how many."""
        horizon, evicted = self.clock() - self.idle_ttl, 0
        for partition, state in self.partitions.items():
            marks, before = state.marks, None
            while marks and marks[0][0] <= horizon:
                before = marks.popleft()[1]
            if before is None:
                continue
            marks.appendleft((horizon, before))  # still the answer until a later mark is old enough
            n = self.pipeline.evict_before(partition, before)
            if n:
                state.evictions.append((state.processed, before))
                state.dirty = True
                evicted += n
        return evicted
