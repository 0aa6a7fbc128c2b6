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
from typing import Iterable

from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import (CorruptRecordError, InvalidRecordError, KafkaError, KafkaTimeoutError, MessageSizeTooLargeError,
                          RecordListTooLargeError, TopicAlreadyExistsError, UnsupportedCodecError)
from kafka.future import Future
from kafka.partitioner import DefaultPartitioner
from kafka.structs import OffsetAndMetadata

from .config import KafkaConfig
from .errors import UserError
from .records import OutRecord

__all__ = ["BrokerUnavailable", "KafkaCheckpoints", "KafkaSink", "KafkaSource", "KeyPartitioner", "client_settings",
           "ensure_topics", "read_history", "read_topic"]

log = logging.getLogger(__name__)


def client_settings(config: KafkaConfig, client_id: str) -> dict:
    """kafka-python keyword arguments for connecting, TLS and SASL included."""
    settings = {
        "bootstrap_servers": list(config.bootstrap_servers),
        "security_protocol": config.security_protocol,
        "client_id": client_id,
        # back in touch within seconds of a broker's return (kafka-python's defaults wait up to 30 s);
        # the daemon retries a failed start-up itself, with its own backoff
        "reconnect_backoff_max_ms": 5000,
        "bootstrap_timeout_ms": 10000,
    }
    if config.security_protocol in ("SSL", "SASL_SSL"):
        settings.update(ssl_cafile=config.ssl_cafile, ssl_certfile=config.ssl_certfile,
                        ssl_keyfile=config.ssl_keyfile, ssl_password=config.secret("ssl_password"),
                        ssl_check_hostname=config.ssl_check_hostname)
    if config.security_protocol.startswith("SASL_"):
        settings.update(sasl_mechanism=config.sasl_mechanism or "PLAIN", sasl_plain_username=config.sasl_username,
                        sasl_plain_password=config.secret("sasl_password"))
    return settings


class _Revocations(ConsumerRebalanceListener):
    def __init__(self, revoked: set[int]):
        self.revoked = revoked

    def on_partitions_revoked(self, revoked):
        self.revoked.update(tp.partition for tp in revoked)

    def on_partitions_assigned(self, assigned):
        pass


class KafkaSource:
    """The input topic, read in a consumer group with manual commits."""

    def __init__(self, config: KafkaConfig, group_id: str | None = None, client_id: str = "stream-forecaster",
                 on_unreadable=None):
        self.topic = config.input_topic
        self.config = config
        self.on_unreadable = on_unreadable
        self._owned: set[int] = set()
        self._revoked: set[int] = set()
        self._consumer = _connect(lambda: KafkaConsumer(
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
        self._consumer.subscribe([config.input_topic], listener=_Revocations(self._revoked))

    def poll(self, timeout_s: float, max_records: int | None = None) -> list:
        """The next batch of at most ``max_records`` records, oldest first within each partition.

        A record kafka-python cannot decode is skipped (see :func:`_poll`) and
        counted through ``on_unreadable``.
        """
        batches = _poll(self._consumer, int(timeout_s * 1000), max_records, self.on_unreadable)
        return [record for records in batches.values() for record in records]

    def rewind(self, records) -> None:
        """Read ``records`` again from the next poll on (those of partitions still assigned)."""
        first: dict[int, int] = {}
        for r in records:
            first[r.partition] = min(first.get(r.partition, r.offset), r.offset)
        owned = {tp.partition for tp in self._consumer.assignment()}
        for partition, offset in first.items():
            if partition in owned:
                self._consumer.seek(TopicPartition(self.topic, partition), offset)

    def take_changes(self) -> tuple[set[int], set[int], set[int]]:
        """Partitions ``(lost, gained, regained)`` since the last call.

        ``regained`` were revoked and assigned back in a rebalance: their state
        is still ours only if nothing was re-read (the caller compares the
        committed offset). The listener merely records revocations: kafka-python
        3.0 forbids blocking calls (``commit``, ``committed``) inside it, so the
        main loop does the rest. Every batch is committed before the next poll,
        so a revoked partition never has uncommitted work.
        """
        owned = {tp.partition for tp in self._consumer.assignment()}
        revoked = set(self._revoked)
        self._revoked.clear()
        lost, gained = self._owned - owned, owned - self._owned
        regained = (revoked & owned) - gained
        self._owned = owned
        return lost, gained, regained

    def committed(self, partition: int) -> int | None:
        # bounded, so a stop during an outage is not held up by a coordinator that never answers
        return self._consumer.committed(TopicPartition(self.topic, partition), timeout_ms=self.config.session_timeout_ms)

    def beginning(self, partition: int) -> int:
        tp = TopicPartition(self.topic, partition)
        return self._consumer.beginning_offsets([tp])[tp]

    def read_range(self, partition: int, start: int, end: int, stop: threading.Event, patience_s: float = 30.0):
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

            yield from _records_between(reader, tp, start, end, stop, patience_s, stalled)
        finally:
            reader.close(autocommit=False, timeout_ms=5000)

    def commit(self, offsets: dict[tuple[str, int], int]) -> bool:
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
        """Partitions are assigned and the group coordinator answered within the session timeout.

        kafka-python keeps the heartbeat clock privately; without it, assignment alone is the answer.
        """
        heartbeat = getattr(getattr(self._consumer, "_coordinator", None), "heartbeat", None)
        if heartbeat is not None and heartbeat.session_timeout_expired():
            return False
        return bool(self._consumer.assignment())

    def close(self) -> None:
        self._consumer.close(autocommit=False, timeout_ms=5000)


# what unpacking a fetched batch raises for a record it cannot decode
_UNDECODABLE = (CorruptRecordError, UnsupportedCodecError, UnicodeDecodeError)


def _poll(consumer, timeout_ms: int, max_records: int | None = None, on_unreadable=None) -> dict:
    """``consumer.poll``, stepping over a record kafka-python cannot decode (logged, counted, left in the topic).

    A batch failing its CRC or a header key that is not UTF-8 makes the poll raise;
    kafka-python 3.0 then keeps the partition's exhausted records in line and the
    next poll spins on them for ever (100 % CPU, deaf to its timeout). Moving the
    position past the record lets it drop them.
    """
    try:
        return consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
    except _UNDECODABLE as exc:
        # the partition whose records were being unpacked when it raised (still in line, as no other can be)
        stuck = getattr(getattr(consumer, "_fetcher", None), "_next_partition_records", None)
        tp = getattr(stuck, "topic_partition", None) if stuck else None
        offset = consumer.position(tp, timeout_ms=1000) if tp in consumer.assignment() else None
        if offset is None:
            raise  # not a record of ours (a fetch's error code, say): the caller retries
        log.error("%s[%d]: the record at offset %d cannot be read (%s: %s); skipped, it stays in the topic",
                  tp.topic, tp.partition, offset, type(exc).__name__, exc)
        consumer.seek(tp, offset + 1)
        if on_unreadable:
            on_unreadable()
        return {}


def _records_between(reader, tp, start: int, end: int, stop: threading.Event | None = None,
                     patience_s: float = 30.0, stalled=None):
    """Records ``start <= offset < end`` of ``tp``, assigned to ``reader`` (fewer where compaction removed some).

    Ends early when ``stop`` is set, or after ``patience_s`` without progress
    (calling ``stalled(position)``): a log can end short of an offset read
    elsewhere (an unclean leader election truncated it).
    """
    reader.seek(tp, start)
    position, moved = start, time.monotonic()
    while position < end and not (stop is not None and stop.is_set()):
        for records in _poll(reader, 500).values():
            yield from (r for r in records if r.offset < end)
        now = reader.position(tp, timeout_ms=1000)
        if now is not None and now > position:
            position, moved = now, time.monotonic()
        elif time.monotonic() - moved > patience_s:
            if stalled is not None:
                stalled(position)
            return


class BrokerUnavailable(UserError, RuntimeError):
    """No broker could be reached to set up a client; try again later, or fix ``kafka.bootstrap_servers``."""


def _connect(factory, what: str, config: KafkaConfig):
    try:
        return factory()
    except KafkaError as exc:  # NoBrokersAvailable and friends, raised while bootstrapping
        raise BrokerUnavailable(f"cannot set up the {what}: {type(exc).__name__}: {exc} (kafka.bootstrap_servers "
                                f"{','.join(config.bootstrap_servers)}: is a broker running there?)") from None


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

    def __init__(self, config: KafkaConfig, client_id: str = "stream-forecaster", on_retry=None, on_recreate=None,
                 on_refused=None):
        self._config, self._client_id = config, client_id
        self._producer = self._new_producer()
        self._on_retry, self._on_recreate, self._on_refused = on_retry, on_recreate, on_refused

    def _new_producer(self):
        # max_block_ms: a send waiting for metadata (a topic gone with a restarted broker) gives up soon
        # and is retried here, instead of blocking the loop for kafka-python's default minute
        # batch_size: a poll batch's forecasts go out in a few large requests (each new batch wakes the
        # sender thread, which cost 9 % of the daemon at the 16 KiB default)
        # max_request_size: a dead letter carries up to max_message_bytes and its headers
        return _connect(lambda: KafkaProducer(acks="all", enable_idempotence=True, linger_ms=5, max_block_ms=5000,
                                              batch_size=256 * 1024, partitioner=KeyPartitioner(),
                                              max_request_size=max(1 << 20, self._config.max_message_bytes + 65536),
                                              **client_settings(self._config, self._client_id)), "producer",
                        self._config)

    def publish(self, records: Iterable[OutRecord], stop: threading.Event | None = None,
                backoff_s: float = 0.5, max_backoff_s: float = 10.0) -> bool:
        """Send ``records`` and wait for their acknowledgements, resending failures with backoff.

        Returns False only when ``stop`` was set before every record was
        acknowledged: the caller must then not commit their offsets. After a
        stop, records in flight are still waited for (``STOP_GRACE_S`` at most),
        failed ones are not sent again. A record the broker
        refuses for itself (too large for it, say) is logged, counted through
        ``on_refused`` and left out: retried, it would stall the daemon for ever.
        """
        stop = stop or threading.Event()
        in_flight = self._send_all(records)
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
                waiting += self._send_all(r for r, _ in failed)
            in_flight = waiting
        return True

    def _send_all(self, records: Iterable[OutRecord]) -> list:
        """``(record, future)`` for each record. Once a send timed out (no metadata for its topic, a full
        buffer), the rest of that topic fails at once instead of each blocking ``max_block_ms``: a round
        then takes seconds, not hours, and a stop is heard between rounds."""
        sent, timed_out = [], {}
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
        try:
            old.close(timeout=0)
        except Exception:  # noqa: BLE001 (the old producer is broken anyway)
            # kafka-python 3.0 flushes first and raises while batches are incomplete, before it stops its
            # sender thread: stop it here, or its thread, sockets and batches live on (and may still deliver)
            sender = getattr(old, "_sender", None)
            if sender is not None:
                sender.force_close()
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


def ensure_topics(config: KafkaConfig, topics: Iterable[str], partitions: int = 1, topic_configs: dict | None = None,
                  replication_factor: int = 1) -> None:
    """Create the topics that do not exist yet (for development and tests; production provisions its own,
    the daemon's state topic excepted)."""
    admin = _connect(lambda: KafkaAdminClient(**client_settings(config, "stream-forecaster-admin")), "admin client",
                     config)
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(t, partitions, replication_factor, topic_configs=topic_configs or {})
               for t in dict.fromkeys(topics) if t and t not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


class KafkaCheckpoints:
    """Each input partition's latest refill checkpoint, in a compacted topic: record key and partition are the
    input partition's number, so the latest one is the last record of its partition.

    Created if absent, as Kafka Streams creates its changelog topics: compacted, one partition per input
    partition, replicated as the broker's default. A partition added to the input later than its state topic
    was created has no checkpoints, and refills fall back to ``window.rebuild_messages``.
    """

    def __init__(self, config: KafkaConfig, sink: "KafkaSink"):
        self.topic = config.state_topic or f"{config.group_id}-state"
        self._config, self._sink = config, sink
        reader = self._reader()
        try:
            try:
                self.partitions = len(reader.partitions_for_topic(self.topic) or ())
                wanted = max(1, len(reader.partitions_for_topic(config.input_topic) or ()))
            except KafkaError as exc:  # the broker went away since the clients connected: tried again
                raise BrokerUnavailable(f"cannot read the topics' metadata: {type(exc).__name__}: {exc}") from None
            if 0 < self.partitions < wanted:
                log.warning("the state topic %s has %d partitions, the input topic %d: partitions from %d on refill "
                            "from window.rebuild_messages readings; add partitions to %s", self.topic,
                            self.partitions, wanted, self.partitions, self.topic)
            if not self.partitions:
                try:
                    self._create(wanted)
                    self.partitions = wanted
                except KafkaError as exc:  # not allowed to create topics, say: the daemon still serves
                    log.error("cannot create the state topic %s (%s: %s): create it (cleanup.policy=compact, %d "
                              "partitions) or name another in kafka.state_topic; until then refills replay "
                              "window.rebuild_messages readings", self.topic, type(exc).__name__, exc, wanted)
        finally:
            reader.close(autocommit=False, timeout_ms=5000)

    def _reader(self):
        return _connect(lambda: KafkaConsumer(enable_auto_commit=False,
                                              **client_settings(self._config, "stream-forecaster-state")),
                        "state reader", self._config)

    def _create(self, partitions: int) -> None:
        compacted = {"cleanup.policy": "compact"}
        try:
            ensure_topics(self._config, [self.topic], partitions, compacted, replication_factor=-1)
        except KafkaError:  # a broker that cannot take the default replication (before Kafka 2.4)
            ensure_topics(self._config, [self.topic], partitions, compacted, replication_factor=1)
        log.info("created the state topic %s (compacted, %d partitions)", self.topic, partitions)

    def write(self, checkpoints: dict[int, str], stop: threading.Event) -> bool:
        """Publish ``{input partition: checkpoint}`` and wait for the acknowledgements; False if stopped first or
        a partition has no place in the state topic (it then refills from the fallback)."""
        records = [OutRecord(self.topic, str(p).encode(), text.encode(), partition=p)
                   for p, text in checkpoints.items() if p < self.partitions]
        return self._sink.publish(records, stop) if records else True

    SNAPSHOT_CHUNK = 512 * 1024  # bytes a message: well under the brokers' default limit of 1 MiB

    def write_snapshot(self, partition: int, at: int, data: bytes) -> dict | None:
        """Publish a snapshot of ``partition``'s windows at input offset ``at``, in chunks; where it lies, or None
        when it could not be written (logged: the next one is tried at the next interval)."""
        if partition >= self.partitions:
            return None
        chunks = [data[i:i + self.SNAPSHOT_CHUNK] for i in range(0, len(data), self.SNAPSHOT_CHUNK)] or [b""]
        # a key per chunk, so compaction keeps the newest snapshot whole; the header tells snapshots apart
        futures = [self._sink.send(OutRecord(self.topic, f"{partition}/snapshot/{k}".encode(), chunk,
                                             [("snapshot", str(at).encode())], partition=partition))
                   for k, chunk in enumerate(chunks)]
        try:
            self._sink.flush()
            first = futures[0].get(timeout=1)
            for future in futures[1:]:
                future.get(timeout=1)
        except KafkaError as exc:
            log.warning("partition %d: the snapshot of its windows was not written (%s: %s); refills replay "
                        "from the previous one", partition, type(exc).__name__, exc)
            return None
        return {"at": at, "offset": first.offset, "chunks": len(chunks), "bytes": len(data)}

    def read_snapshot(self, partition: int, ref: dict) -> bytes | None:
        """The snapshot ``ref`` names (from :meth:`write_snapshot`); None if it is gone or incomplete."""
        try:
            offset, count, size, at = int(ref["offset"]), int(ref["chunks"]), int(ref["bytes"]), int(ref["at"])
        except (KeyError, TypeError, ValueError):
            return None
        if partition >= self.partitions:
            return None
        reader = self._reader()
        tp = TopicPartition(self.topic, partition)
        chunks: dict[int, bytes] = {}
        prefix, tag = f"{partition}/snapshot/".encode(), str(at).encode()
        try:
            reader.assign([tp])
            end = reader.end_offsets([tp])[tp]
            for r in _records_between(reader, tp, offset, end):
                if r.key and r.key.startswith(prefix) and dict(r.headers or ()).get("snapshot") == tag:
                    chunks[int(r.key[len(prefix):])] = r.value or b""
                    if len(chunks) == count:
                        break
        except ValueError:  # a chunk key that is not ours
            return None
        finally:
            reader.close(autocommit=False, timeout_ms=5000)
        data = b"".join(chunks.get(k, b"") for k in range(count))
        return data if len(chunks) == count and len(data) == size else None

    def read(self, partition: int) -> str | None:
        """The latest checkpoint of ``partition``; None if there is none.

        Usually the partition's last record; after a snapshot written without
        its checkpoint (a crash between them), a little further back.
        """
        if partition >= self.partitions:
            return None
        reader = self._reader()
        tp = TopicPartition(self.topic, partition)
        key = str(partition).encode()
        try:
            reader.assign([tp])
            first, end = reader.beginning_offsets([tp])[tp], reader.end_offsets([tp])[tp]
            back, stop = 1, end
            while stop > first:
                start = max(first, end - back)
                found = None
                for record in _records_between(reader, tp, start, stop):
                    if record.key == key:
                        found = record
                if found is not None:
                    return found.value.decode("utf-8", "replace") if found.value else None
                back, stop = back * 8, start
            return None
        finally:
            reader.close(autocommit=False, timeout_ms=5000)

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
        consumer.close(autocommit=False, timeout_ms=5000)


def read_history(config: KafkaConfig, group_id: str, since_ms: int, stop: threading.Event,
                 max_records: int | None = None):
    """Yield the input topic's records from ``since_ms`` (message time) up to its end offsets when called, at
    most the last ``max_records`` of them (shared evenly between the partitions).

    Partitions are assigned, not subscribed, under ``group_id``: the retrainer
    never joins or moves the daemon's group, and commits nothing. The start is
    looked up by time (``offsets_for_times``); a partition with nothing that
    recent gives nothing; the end is
    fixed when reading starts, so a topic under steady load still ends.
    """
    consumer = _connect(lambda: KafkaConsumer(group_id=group_id, enable_auto_commit=False,
                                              **client_settings(config, "stream-forecaster-retrain")),
                        "history reader", config)
    try:
        partitions = consumer.partitions_for_topic(config.input_topic)
        if not partitions:
            raise UserError(f"topic {config.input_topic!r} does not exist or has no partitions (kafka.input_topic)")
        assigned = [TopicPartition(config.input_topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        starts = consumer.offsets_for_times({tp: since_ms for tp in assigned})
        ends = consumer.end_offsets(assigned)
        share = max(1, max_records // len(assigned)) if max_records else None
        for tp in assigned:
            found = starts.get(tp)
            if found is not None:
                consumer.seek(tp, found.offset if share is None else max(found.offset, ends[tp] - share))
            else:  # no message at or after since_ms (Kafka answers -1): nothing of this partition is recent
                consumer.seek_to_end(tp)
        remaining = {tp for tp in assigned if consumer.position(tp) < ends[tp]}
        while remaining and not stop.is_set():
            for tp, records in _poll(consumer, 1000).items():
                yield from (r for r in records if r.offset < ends[tp])
            remaining = {tp for tp in remaining if consumer.position(tp) < ends[tp]}
    finally:
        consumer.close(autocommit=False, timeout_ms=5000)
