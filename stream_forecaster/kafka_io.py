"""The daemon's Kafka: its source (the input topic in a consumer group), its sink (an idempotent producer) and
its checkpoints (the state topic).

They implement :mod:`stream_forecaster.seams`; ``stream_forecaster.testing``
has in-memory stand-ins. Written for Apache Kafka's documented behaviour (see
``devbroker`` for where the development broker differs); kafka-python is
reached through :mod:`stream_forecaster.kafka_compat`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable, Iterable, Iterator, Sequence

from .config import KafkaConfig
from .kafka_compat import (
    BrokerUnavailable,
    ConsumerRebalanceListener,
    DefaultPartitioner,
    Future,
    InvalidRecordError,
    KafkaConsumer,
    KafkaError,
    KafkaProducer,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OffsetAndMetadata,
    RecordListTooLargeError,
    TopicPartition,
    client_settings,
    connect,
    force_close,
    poll,
    session_expired,
)
from .messages import OutRecord
from .seams import Offsets, Ownership, Record, first_offsets
from .state_topic import StateLogError, StateTopic
from .topics import ensure_topics, records_between

__all__ = ["KafkaSink", "KafkaSource", "KafkaStateLog", "KeyPartitioner", "kafka_checkpoints"]

log = logging.getLogger(__name__)


class _Revocations(ConsumerRebalanceListener):
    def __init__(self, revoked: set[int]):
        self.revoked = revoked

    def on_partitions_revoked(self, revoked):
        self.revoked.update(tp.partition for tp in revoked)

    def on_partitions_assigned(self, assigned):
        pass


class KafkaSource:
    """The input topic, read in a consumer group with manual commits."""

    calls_before_revoke = False  # kafka-python 3.0 forbids blocking calls (a commit) in its rebalance listener

    def __init__(self, config: KafkaConfig, group_id: str | None = None, client_id: str = "stream-forecaster",
                 on_unreadable=None):
        self.topic = config.input_topic
        self.config = config
        self.on_unreadable = on_unreadable
        self._ownership = Ownership()
        self._consumer = connect(lambda: KafkaConsumer(
            group_id=group_id or config.group_id,
            enable_auto_commit=False,  # offsets are committed only after the predictions are acknowledged
            auto_offset_reset=config.auto_offset_reset,
            session_timeout_ms=config.session_timeout_ms,
            heartbeat_interval_ms=max(100, config.session_timeout_ms // 3),
            max_poll_records=config.max_poll_records,
            max_poll_interval_ms=config.max_poll_interval_ms,
            # Apache Kafka answers a fetch as soon as data arrives; the development broker holds it for
            # up to this long regardless, so a short wait bounds latency there and costs little here
            fetch_max_wait_ms=config.fetch_max_wait_ms,
            **client_settings(config, client_id),
        ), "consumer", config)
        self._consumer.subscribe([config.input_topic], listener=_Revocations(self._ownership.revoked))

    def poll(self, timeout_s: float, max_records: int | None = None, before_revoke=None) -> list:
        """The next batch of at most ``max_records`` records, oldest first within each partition.

        A record kafka-python cannot decode is skipped (see :func:`_poll`) and
        counted through ``on_unreadable``.
        """
        batches = poll(self._consumer, int(timeout_s * 1000), max_records, self.on_unreadable)
        return [record for records in batches.values() for record in records]

    def rewind(self, records) -> None:
        """Read ``records`` again from the next poll on (those of partitions still assigned)."""
        owned = {tp.partition for tp in self._consumer.assignment()}
        for partition, offset in first_offsets(records).items():
            if partition in owned:
                self._consumer.seek(TopicPartition(self.topic, partition), offset)

    def seek(self, partition: int, offset: int | None) -> None:
        tp = TopicPartition(self.topic, partition)
        if offset is not None:
            self._consumer.seek(tp, offset)
        elif self.config.auto_offset_reset == "earliest":
            self._consumer.seek_to_beginning(tp)
        else:
            self._consumer.seek_to_end(tp)

    def take_changes(self) -> tuple[set[int], set[int], set[int]]:
        """Partitions ``(lost, gained, regained)`` since the last call (see :class:`.seams.Ownership`).

        The listener merely records revocations: kafka-python 3.0 forbids
        blocking calls (``commit``, ``committed``) inside it, so the main loop
        does the rest. Every batch is committed before the next poll, so a
        revoked partition never has uncommitted work.
        """
        return self._ownership.changes({tp.partition for tp in self._consumer.assignment()})

    def committed(self, partition: int) -> int | None:
        # bounded, so a stop during an outage is not held up by a coordinator that never answers
        tp = TopicPartition(self.topic, partition)
        return self._consumer.committed(tp, timeout_ms=self.config.session_timeout_ms)

    def beginning(self, partition: int) -> int:
        tp = TopicPartition(self.topic, partition)
        return self._consumer.beginning_offsets([tp])[tp]

    def read_range(self, partition: int, start: int, end: int, stop: threading.Event,
                   patience_s: float = 30.0) -> Iterator:
        """Records ``start <= offset < end`` of one partition, read by a separate, group-less consumer.

        Ends early, logged, when nothing new comes for ``patience_s``: the log
        may end before ``end`` (truncated by an unclean leader election).
        """
        reader = KafkaConsumer(enable_auto_commit=False, **client_settings(self.config, "stream-forecaster-rebuild"))
        tp = TopicPartition(self.topic, partition)
        try:
            reader.assign([tp])

            def stalled(position: int) -> None:
                log.warning("partition %d: nothing after offset %d for %.0f s, short of the committed offset %d "
                            "(a truncated log?); windows refilled from what there was",
                            partition, position, patience_s, end)

            yield from records_between(reader, tp, start, end, stop, patience_s, stalled)
        finally:
            reader.close(autocommit=False, timeout_ms=5000)

    def commit(self, offsets: Offsets) -> bool:
        """Commit ``{(topic, partition): next offset to read}``; False if the group had moved on.

        A failed commit (this member was dropped from the group, the broker is
        gone) is not fatal: the partitions come back through a rebalance and
        their windows are rebuilt from what was committed.
        """
        if not offsets:
            return True
        try:
            self._consumer.commit({TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()},
                                  timeout_ms=self.config.session_timeout_ms)
            return True
        except KafkaError as exc:
            log.warning("commit failed (%s: %s); the partitions will be re-read from the last commit",
                        type(exc).__name__, exc)
            return False

    def lag(self) -> int | None:
        """Readings not yet consumed, summed over the assigned partitions (None until known)."""
        total, known = 0, False
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            position = self._consumer.position(tp, timeout_ms=1000) if highwater is not None else None
            if position is None:  # not fetched yet, or an offset reset pending
                continue
            total += max(0, highwater - position)
            known = True
        return total if known else None

    def assigned(self) -> bool:
        """Partitions are assigned and the group coordinator answered within the session timeout."""
        return not session_expired(self._consumer) and bool(self._consumer.assignment())

    def close(self) -> None:
        self._consumer.close(autocommit=False, timeout_ms=5000)


class KeyPartitioner(DefaultPartitioner):
    """kafka-python's default partitioner (murmur2 of the key, as Java clients), remembering each key's partition.

    Its pure-Python hash took 12 % of the daemon's main thread, and a fleet sends
    under the same sensor keys again and again. A new partition count starts over;
    so does a full memory (``limit`` keys per topic), which bounds it.
    """

    def __init__(self, limit: int = 1_000_000):
        self.limit = limit
        self._known: dict[str, tuple[int, dict]] = {}

    def partition(self, topic, key, serialized_key, value, serialized_value, cluster):
        partitions = cluster.partitions_for_topic(topic)
        if serialized_key is None or not partitions:
            return super().partition(topic, key, serialized_key, value, serialized_value, cluster)
        count, known = self._known.get(topic, (0, {}))
        if count != len(partitions):
            count, known = self._known[topic] = (len(partitions), {})
        found = known.get(serialized_key)
        if found is None:
            if len(known) >= self.limit:
                known.clear()
            found = known[serialized_key] = super().partition(topic, key, serialized_key, value, serialized_value,
                                                              cluster)
        return found


class KafkaSink:
    """An idempotent producer with ``acks=all``; ``publish`` returns once every record is acknowledged.

    A producer that keeps failing is replaced by a new one: kafka-python 3.0's
    idempotent producer stays dead after a broker loses its state (every send
    fails), and only a new producer id recovers.
    """

    RECREATE_AFTER = 2  # consecutive failed rounds before the producer is replaced
    STOP_GRACE_S = 10.0  # after a stop, how long acknowledgements still on their way are waited for
    # refused for what the record is, not for the broker's state: sending it again can never succeed
    REFUSED = (MessageSizeTooLargeError, RecordListTooLargeError, InvalidRecordError)

    def __init__(self, config: KafkaConfig, client_id: str = "stream-forecaster",
                 on_retry: Callable[[int], None] | None = None, on_recreate: Callable[[], None] | None = None,
                 on_refused: Callable[[], None] | None = None, new_producer: Callable[[], KafkaProducer] | None = None):
        """``new_producer`` makes each producer (a new one replaces one that keeps failing): by default a
        kafka-python producer per ``config``; ``on_*`` count retries, replacements and refused records."""
        self._config, self._client_id = config, client_id
        self._new_producer = new_producer or self._kafka_producer
        self._producer = self._new_producer()
        self._on_retry, self._on_recreate, self._on_refused = on_retry, on_recreate, on_refused
        self._queued: list = []  # (record, future) sent since the last publish
        self._timed_out: dict[str, Exception] = {}  # topics whose sends timed out since the last publish

    def _kafka_producer(self) -> KafkaProducer:
        # max_block_ms: a send waiting for metadata (a topic gone with a restarted broker) gives up soon
        # and is retried here, instead of blocking the loop for kafka-python's default minute
        # batch_size: a poll batch's forecasts go out in a few large requests (each new batch wakes the
        # sender thread, which cost 9 % of the daemon at the 16 KiB default)
        # max_request_size: a dead letter carries up to max_message_bytes and its headers
        return connect(lambda: KafkaProducer(acks="all", enable_idempotence=True, linger_ms=5, max_block_ms=5000,
                                              batch_size=256 * 1024, partitioner=KeyPartitioner(),
                                              max_request_size=max(1 << 20, self._config.max_message_bytes + 65536),
                                              **client_settings(self._config, self._client_id)), "producer",
                        self._config)

    def queue(self, records: Sequence[OutRecord]) -> None:
        """Send ``records`` without waiting; the next :meth:`publish` waits for their acknowledgements."""
        self._queued += self._send_all(records, self._timed_out)

    def publish(self, records: Sequence[OutRecord] = (), stop: threading.Event | None = None,
                backoff_s: float = 0.5, max_backoff_s: float = 10.0) -> bool:
        """Send ``records`` and wait for their acknowledgements and those of every record queued since the last
        publish, resending failures with backoff.

        Returns False only when ``stop`` was set before every record was
        acknowledged: the caller must then not commit their offsets. After a
        stop, records in flight are still waited for (``STOP_GRACE_S`` at most),
        failed ones are not sent again. A record the broker
        refuses for itself (too large for it, say) is logged, counted through
        ``on_refused`` and left out: retried, it would stall the daemon for ever.
        """
        stop = stop or threading.Event()
        self.queue(records)
        in_flight, self._queued, self._timed_out = self._queued, [], {}
        failed_rounds, stopped_at = 0, None
        while in_flight:
            try:
                self._producer.flush(timeout=2)
            except KafkaError:
                pass  # a stalled broker: look at what did finish, then wait again
            failed, waiting = [], []
            for record, future in in_flight:
                if not future.is_done:
                    waiting.append((record, future))
                elif future.failed() and isinstance(future.exception, self.REFUSED):
                    log.error("the broker refuses a record for %s [%d bytes of key and value]: %s; left out",
                              record.topic, len(record.key or b"") + len(record.value or b""), future.exception)
                    if self._on_refused:
                        self._on_refused()
                elif future.failed():
                    failed.append((record, future.exception))
            if failed:
                failed_rounds += 1
                log.warning("%d of %d records not acknowledged (%s); retrying in %.1f s",
                            len(failed), len(in_flight), failed[0][1], backoff_s)
                if self._on_retry:
                    self._on_retry(len(failed))
            if stop.is_set() and (failed or waiting):
                # acks on their way are worth a short wait (a slow broker): a batch given up is repeated
                stopped_at = stopped_at or time.monotonic()
                if failed or time.monotonic() - stopped_at > self.STOP_GRACE_S:
                    return False
            elif failed and stop.wait(backoff_s):
                return False
            if failed:
                backoff_s = min(max_backoff_s, backoff_s * 2)
                if failed_rounds >= self.RECREATE_AFTER:
                    failed_rounds = 0
                    if self._recreate():
                        # what was in flight on the old producer is sent again on the new one
                        failed += [(r, None) for r, _ in waiting]
                        waiting = []
                waiting += self._send_all((r for r, _ in failed), {})
            in_flight = waiting
        return True

    def _send_all(self, records: Iterable[OutRecord], timed_out: dict[str, Exception]) -> list:
        """``(record, future)`` for each record. Once a send timed out (no metadata for its topic, a full
        buffer), the rest of that topic fails at once instead of each blocking ``max_block_ms``: a round
        (``timed_out`` is the round's) then takes seconds, not hours, and a stop is heard between rounds."""
        sent: list = []
        for record in records:
            if record.topic in timed_out:
                future = Future().failure(timed_out[record.topic])
            else:
                future = self.send(record)
                if future.is_done and isinstance(future.exception, KafkaTimeoutError):
                    timed_out[record.topic] = future.exception
            sent.append((record, future))
        return sent

    def _recreate(self) -> bool:
        """Replace the producer; False if no new one could be set up (the old one is kept)."""
        log.warning("replacing the Kafka producer after repeated failures")
        try:
            new = self._new_producer()
        except BrokerUnavailable as exc:  # still no broker: the old one goes on failing until the next round
            log.warning("%s; trying again after the next failed round", exc)
            return False
        old, self._producer = self._producer, new
        force_close(old)
        if self._on_recreate:
            self._on_recreate()
        return True

    def send(self, record: OutRecord):
        """Queue one record without waiting; returns its future (failed at once if it could not be queued)."""
        try:
            return self._producer.send(record.topic, key=record.key, value=record.value, headers=record.headers or None,
                                       partition=record.partition)
        except KafkaError as exc:
            return Future().failure(exc)

    def flush(self) -> None:
        self._producer.flush()

    def close(self, timeout_s: float = 10.0) -> None:
        self._producer.close(timeout=timeout_s)


class KafkaStateLog:
    """The state topic's Kafka calls through kafka-python (:class:`~stream_forecaster.state_topic.StateLog`)."""

    def __init__(self, config: KafkaConfig, sink: KafkaSink | None = None):  # None: reading only
        self._config, self._sink = config, sink

    @contextlib.contextmanager
    def _reader(self) -> Iterator[KafkaConsumer]:
        reader = connect(lambda: KafkaConsumer(enable_auto_commit=False,
                                               **client_settings(self._config, "stream-forecaster-state")),
                         "state reader", self._config)
        try:
            yield reader
        finally:
            reader.close(autocommit=False, timeout_ms=5000)

    def partitions(self, topic: str) -> int:
        with self._reader() as reader:
            try:
                return len(reader.partitions_for_topic(topic) or ())
            except KafkaError as exc:  # the broker went away since the clients connected: tried again
                raise BrokerUnavailable(f"cannot read the topics' metadata: {exc}") from None

    def create_compacted(self, topic: str, partitions: int) -> None:
        compacted = {"cleanup.policy": "compact"}
        try:
            try:
                ensure_topics(self._config, [topic], partitions, compacted, replication_factor=-1)
            except KafkaError:  # a broker that cannot take the default replication (before Kafka 2.4)
                ensure_topics(self._config, [topic], partitions, compacted, replication_factor=1)
        except KafkaError as exc:
            raise StateLogError(str(exc)) from None

    def _writer(self) -> KafkaSink:
        if self._sink is None:
            raise StateLogError("this state log only reads")
        return self._sink

    def publish(self, records: Sequence[OutRecord], stop: threading.Event) -> bool:
        return self._writer().publish(records, stop)

    def append(self, records: Sequence[OutRecord]) -> int:
        sink = self._writer()
        futures = [sink.send(r) for r in records]
        try:
            sink.flush()
            offsets = [f.get(timeout=1).offset for f in futures]
        except KafkaError as exc:
            raise StateLogError(str(exc)) from None
        return offsets[0]

    def offsets(self, topic: str, partition: int) -> tuple[int, int]:
        tp = TopicPartition(topic, partition)
        with self._reader() as reader:
            return reader.beginning_offsets([tp])[tp], reader.end_offsets([tp])[tp]

    def read(self, topic: str, partition: int, start: int, end: int) -> Iterator[Record]:
        tp = TopicPartition(topic, partition)
        with self._reader() as reader:
            reader.assign([tp])
            yield from records_between(reader, tp, start, end)


def kafka_checkpoints(config: KafkaConfig, sink: KafkaSink) -> StateTopic:
    """The daemon's checkpoints in the state topic, through kafka-python."""
    return StateTopic(config, KafkaStateLog(config, sink))
