"""Kafka source and sink: the only module that imports kafka-python.

The pipeline sees plain records (``topic``, ``partition``, ``offset``,
``timestamp`` in ms, ``key``, ``value``, ``headers``) and a sink with
``publish(records, stop)``; ``stream_forecaster.testing`` has in-memory
stand-ins with the same shape. Written for Apache Kafka's documented
behaviour (see ``devbroker`` for where the development broker differs).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Iterable, Sequence

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from .config import KafkaConfig
from .records import OutRecord

__all__ = ["KafkaSink", "KafkaSource", "client_settings", "ensure_topics", "read_history", "read_topic"]

log = logging.getLogger(__name__)


def client_settings(config: KafkaConfig, client_id: str) -> dict:
    """kafka-python keyword arguments for connecting, TLS and SASL included."""
    settings = {
        "bootstrap_servers": list(config.bootstrap_servers),
        "security_protocol": config.security_protocol,
        "client_id": client_id,
    }
    if config.security_protocol in ("SSL", "SASL_SSL"):
        settings.update(ssl_cafile=config.ssl_cafile, ssl_certfile=config.ssl_certfile,
                        ssl_keyfile=config.ssl_keyfile, ssl_password=config.secret("ssl_password"),
                        ssl_check_hostname=config.ssl_check_hostname)
    if config.security_protocol.startswith("SASL_"):
        settings.update(sasl_mechanism=config.sasl_mechanism or "PLAIN", sasl_plain_username=config.sasl_username,
                        sasl_plain_password=config.secret("sasl_password"))
    return settings


class KafkaSource:
    """The input topic, read in a consumer group with manual commits."""

    def __init__(self, config: KafkaConfig, group_id: str | None = None, client_id: str = "stream-forecaster"):
        self.topic = config.input_topic
        self.config = config
        self._owned: set[int] = set()
        self._consumer = KafkaConsumer(
            config.input_topic,
            group_id=group_id or config.group_id,
            enable_auto_commit=False,  # offsets are committed only after the predictions are acknowledged
            auto_offset_reset=config.auto_offset_reset,
            session_timeout_ms=config.session_timeout_ms,
            heartbeat_interval_ms=max(100, config.session_timeout_ms // 3),
            max_poll_records=config.max_poll_records,
            **client_settings(config, client_id),
        )

    def poll(self, timeout_s: float) -> list:
        """The next batch of records, oldest first within each partition."""
        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000))
        return [record for records in batches.values() for record in records]

    def take_changes(self) -> tuple[set[int], set[int]]:
        """Partitions (lost, gained) since the last call, from the assignment after a poll.

        Comparing assignments rather than acting in a rebalance listener keeps
        blocking calls (``committed``) out of the listener, as kafka-python 3.0
        requires; nothing is lost by it because every batch is committed before
        the next poll, so a revoked partition has no uncommitted work.
        """
        owned = {tp.partition for tp in self._consumer.assignment()}
        lost, gained = self._owned - owned, owned - self._owned
        self._owned = owned
        return lost, gained

    def committed(self, partition: int) -> int | None:
        return self._consumer.committed(TopicPartition(self.topic, partition))

    def beginning(self, partition: int) -> int:
        tp = TopicPartition(self.topic, partition)
        return self._consumer.beginning_offsets([tp])[tp]

    def read_range(self, partition: int, start: int, end: int, stop: threading.Event):
        """Records ``start <= offset < end`` of one partition, read by a separate, group-less consumer."""
        reader = KafkaConsumer(enable_auto_commit=False, **client_settings(self.config, "stream-forecaster-rebuild"))
        tp = TopicPartition(self.topic, partition)
        try:
            reader.assign([tp])
            reader.seek(tp, start)
            while reader.position(tp) < end and not stop.is_set():
                for records in reader.poll(timeout_ms=500).values():
                    yield from (r for r in records if r.offset < end)
        finally:
            reader.close(autocommit=False)

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        """Commit ``{(topic, partition): next offset to read}``."""
        if offsets:
            self._consumer.commit({TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()})

    def lag(self) -> int | None:
        """Readings not yet consumed, summed over the assigned partitions (None until known)."""
        total, known = 0, False
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            if highwater is None:
                continue
            total += max(0, highwater - self._consumer.position(tp, timeout_ms=1000))
            known = True
        return total if known else None

    def assigned(self) -> bool:
        return bool(self._consumer.assignment())

    def close(self) -> None:
        self._consumer.close(autocommit=False)


class KafkaSink:
    """An idempotent producer with ``acks=all``; ``publish`` returns once every record is acknowledged."""

    def __init__(self, config: KafkaConfig, client_id: str = "stream-forecaster", on_retry=None):
        self._producer = KafkaProducer(
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            **client_settings(config, client_id),
        )
        self._on_retry = on_retry

    def publish(self, records: Sequence[OutRecord], stop: threading.Event | None = None,
                backoff_s: float = 0.5, max_backoff_s: float = 10.0) -> bool:
        """Send ``records`` and wait for their acknowledgements, resending failures with backoff.

        Returns False only when ``stop`` was set before every record was
        acknowledged: the caller must then not commit their offsets.
        """
        pending = list(records)
        while pending:
            futures = [(r, self.send(r)) for r in pending]
            self._producer.flush()
            failed = []
            for record, future in futures:
                try:
                    future.get(timeout=0)
                except KafkaError as exc:
                    failed.append((record, exc))
            if not failed:
                return True
            log.warning("%d of %d records not acknowledged (%s); retrying in %.1f s",
                        len(failed), len(pending), failed[0][1], backoff_s)
            if self._on_retry:
                self._on_retry(len(failed))
            pending = [record for record, _ in failed]
            if stop is not None and stop.wait(backoff_s):
                return False
            backoff_s = min(max_backoff_s, backoff_s * 2)
        return True

    def send(self, record: OutRecord):
        """Queue one record without waiting; returns its future (``.get()`` raises on failure)."""
        return self._producer.send(record.topic, key=record.key, value=record.value, headers=record.headers or None)

    def flush(self) -> None:
        self._producer.flush()

    def close(self, timeout_s: float = 10.0) -> None:
        self._producer.close(timeout=timeout_s)


def ensure_topics(config: KafkaConfig, topics: Iterable[str], partitions: int = 1) -> None:
    """Create the topics that do not exist yet (for development and tests; production provisions its own)."""
    admin = KafkaAdminClient(**client_settings(config, "stream-forecaster-admin"))
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(t, partitions, 1) for t in dict.fromkeys(topics) if t and t not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


def read_topic(config: KafkaConfig, topic: str, stop: threading.Event, idle_s: float | None = None):
    """Yield every record of ``topic`` from the beginning, without a consumer group.

    Ends when ``stop`` is set, or after ``idle_s`` seconds without a new record.
    For the demo and tests; the daemon reads through :class:`KafkaSource`.
    """
    consumer = KafkaConsumer(enable_auto_commit=False, **client_settings(config, "stream-forecaster-reader"))
    try:
        partitions = None
        while partitions is None and not stop.is_set():
            partitions = consumer.partitions_for_topic(topic)
            if partitions is None:
                stop.wait(0.2)  # the topic does not exist yet
        if partitions is None:
            return
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        consumer.seek_to_beginning()
        last = time.monotonic()
        while not stop.is_set():
            batch = consumer.poll(timeout_ms=200)
            for records in batch.values():
                yield from records
                last = time.monotonic()
            if idle_s is not None and time.monotonic() - last > idle_s:
                return
    finally:
        consumer.close(autocommit=False)


def read_history(config: KafkaConfig, group_id: str, since_ms: int, stop: threading.Event):
    """Yield the input topic's records from ``since_ms`` (message time) up to its end offsets when called.

    Partitions are assigned, not subscribed, under ``group_id``: the retrainer
    never joins or moves the daemon's group, and commits nothing. The start is
    looked up by time (``offsets_for_times``), else the beginning; the end is
    fixed when reading starts, so a topic under steady load still ends.
    """
    consumer = KafkaConsumer(group_id=group_id, enable_auto_commit=False, **client_settings(config, "stream-forecaster-retrain"))
    try:
        partitions = consumer.partitions_for_topic(config.input_topic)
        if not partitions:
            raise RuntimeError(f"topic {config.input_topic!r} does not exist or has no partitions")
        assigned = [TopicPartition(config.input_topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        starts = consumer.offsets_for_times({tp: since_ms for tp in assigned})
        for tp in assigned:
            found = starts.get(tp)
            if found is not None:
                consumer.seek(tp, found.offset)
            else:
                consumer.seek_to_beginning(tp)
        ends = consumer.end_offsets(assigned)
        remaining = {tp for tp in assigned if consumer.position(tp) < ends[tp]}
        while remaining and not stop.is_set():
            for tp, records in consumer.poll(timeout_ms=1000).items():
                yield from (r for r in records if r.offset < ends[tp])
            remaining = {tp for tp in remaining if consumer.position(tp) < ends[tp]}
    finally:
        consumer.close(autocommit=False)
