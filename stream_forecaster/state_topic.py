"""The state topic: each input partition's latest refill checkpoint and windows' snapshot, in a compacted topic.

Record key and partition are the input partition's number, so the latest
checkpoint is the last record of its partition; a snapshot is a run of chunks
keyed ``<partition>/snapshot/<k>`` with the input offset it was taken at in a
header, so compaction keeps the newest whole. Created if absent, as Kafka
Streams creates its changelog topics: compacted, one partition per input
partition. A partition added to the input later than its state topic was
created has no checkpoints, and refills fall back to ``window.rebuild_messages``.

Written for any Kafka client through :class:`StateLog`, which ``kafka_io`` and
``confluent_io`` implement.
"""

from __future__ import annotations

import logging
import threading
from typing import Iterator, Protocol, Sequence

from .config import KafkaConfig
from .messages import OutRecord
from .seams import Record

__all__ = ["StateLog", "StateLogError", "StateTopic", "ensure_compacted"]

log = logging.getLogger(__name__)

SNAPSHOT_CHUNK = 512 * 1024  # bytes a message: well under the brokers' default limit of 1 MiB


class StateLogError(Exception):
    """A Kafka call of the state topic failed; what it was for is tried again later or falls back."""


class StateLog(Protocol):
    """What the state topic needs of a Kafka client."""

    def partitions(self, topic: str) -> int:
        """How many partitions ``topic`` has (0: absent); ``BrokerUnavailable`` if no broker answers."""

    def create_compacted(self, topic: str, partitions: int) -> None:
        """Create ``topic``, compacted; :class:`StateLogError` if that is refused."""

    def publish(self, records: Sequence[OutRecord], stop: threading.Event) -> bool:
        """Send and wait for every acknowledgement; False if ``stop`` was set first."""

    def append(self, records: Sequence[OutRecord]) -> int:
        """Send and wait; the offset the first record got. :class:`StateLogError` if any was not written."""

    def offsets(self, topic: str, partition: int) -> tuple[int, int]:
        """The first and the next offset of a partition."""

    def read(self, topic: str, partition: int, start: int, end: int) -> Iterator[Record]:
        """The records ``start <= offset < end`` (fewer where compaction removed some)."""


class StateTopic:
    """:class:`stream_forecaster.seams.Checkpoints` in the state topic, through ``store``."""

    def __init__(self, config: KafkaConfig, store: StateLog):
        self.topic = config.state_topic or f"{config.group_id}-state"
        self._store = store
        self.partitions = store.partitions(self.topic)
        wanted = max(1, store.partitions(config.input_topic))
        if 0 < self.partitions < wanted:
            log.warning("the state topic %s has %d partitions, the input topic %d: partitions from %d on refill "
                        "from window.rebuild_messages readings; add partitions to %s", self.topic,
                        self.partitions, wanted, self.partitions, self.topic)
        if not self.partitions:
            try:
                store.create_compacted(self.topic, wanted)
                self.partitions = wanted
                log.info("created the state topic %s (compacted, %d partitions)", self.topic, wanted)
            except StateLogError as exc:  # not allowed to create topics, say: the daemon still serves
                log.error("cannot create the state topic %s (%s): create it (cleanup.policy=compact, %d "
                          "partitions) or name another in kafka.state_topic; until then refills replay "
                          "window.rebuild_messages readings", self.topic, exc, wanted)

    def write(self, checkpoints: dict[int, str], stop: threading.Event) -> bool:
        """Publish ``{input partition: checkpoint}`` and wait for the acknowledgements; False if stopped first. A
        partition without a place in the state topic is left out (it refills from the fallback)."""
        records = [OutRecord(self.topic, str(p).encode(), text.encode(), partition=p)
                   for p, text in checkpoints.items() if p < self.partitions]
        return self._store.publish(records, stop) if records else True

    def write_snapshot(self, partition: int, at: int, data: bytes) -> dict | None:
        """Publish a snapshot of ``partition``'s windows at input offset ``at``, in chunks; where it lies, or None
        when it could not be written (logged: the next one is tried at the next interval)."""
        if partition >= self.partitions:
            return None
        chunks = [data[i:i + SNAPSHOT_CHUNK] for i in range(0, len(data), SNAPSHOT_CHUNK)] or [b""]
        records = [OutRecord(self.topic, f"{partition}/snapshot/{k}".encode(), chunk,
                             [("snapshot", str(at).encode())], partition=partition) for k, chunk in enumerate(chunks)]
        try:
            first = self._store.append(records)
        except StateLogError as exc:
            log.warning("partition %d: the snapshot of its windows was not written (%s); refills replay from the "
                        "previous one", partition, exc)
            return None
        return {"at": at, "offset": first, "chunks": len(chunks), "bytes": len(data)}

    def read_snapshot(self, partition: int, ref: dict) -> bytes | None:
        """The snapshot ``ref`` names (from :meth:`write_snapshot`); None if it is gone or incomplete."""
        try:
            offset, count, size, at = int(ref["offset"]), int(ref["chunks"]), int(ref["bytes"]), int(ref["at"])
        except (KeyError, TypeError, ValueError):
            return None
        if partition >= self.partitions:
            return None
        chunks: dict[int, bytes] = {}
        prefix, tag = f"{partition}/snapshot/".encode(), str(at).encode()
        try:
            _, end = self._store.offsets(self.topic, partition)
            # its chunks were written one after the other from ``offset``: read them all even where a broker's
            # end offset lags its last batch (the development broker's, for a batch of several records)
            for r in self._store.read(self.topic, partition, offset, max(end, offset + count)):
                if r.key and r.key.startswith(prefix) and dict(r.headers or ()).get("snapshot") == tag:
                    chunks[int(r.key[len(prefix):])] = r.value or b""
                    if len(chunks) == count:
                        break
        except ValueError:  # a chunk key that is not ours
            return None
        data = b"".join(chunks.get(k, b"") for k in range(count))
        return data if len(chunks) == count and len(data) == size else None

    def read(self, partition: int) -> str | None:
        """The latest checkpoint of ``partition``; None if there is none.

        Usually the partition's last record; after a snapshot written without
        its checkpoint (a crash between them), a little further back.
        """
        if partition >= self.partitions:
            return None
        key = str(partition).encode()
        first, end = self._store.offsets(self.topic, partition)
        back, stop = 1, end
        while stop > first:
            start = max(first, end - back)
            found = None
            for record in self._store.read(self.topic, partition, start, stop):
                if record.key == key:
                    found = record
            if found is not None:
                return found.value.decode("utf-8", "replace") if found.value else None
            back, stop = back * 8, start
        return None


def ensure_compacted(store: StateLog, topic: str, partitions: int, what: str) -> bool:
    """Create ``topic`` compacted with ``partitions`` if it does not exist; False (logged, saying what to do) if
    it cannot be."""
    try:
        if store.partitions(topic):
            return True
        store.create_compacted(topic, partitions)
    except StateLogError as exc:  # not allowed to create topics, say
        log.error("cannot create the %s %s (%s): create it (cleanup.policy=compact) or name another", what, topic,
                  exc)
        return False
    log.info("created the %s %s (compacted, %d partitions)", what, topic, partitions)
    return True

