"""The daemon's Kafka through librdkafka (``confluent-kafka``): a source and a sink beside :mod:`kafka_io`'s.

The only module that imports confluent_kafka (``pip install
stream-forecaster[confluent]``; chosen with ``kafka.client: confluent``). The
contracts are :mod:`stream_forecaster.seams`' and the semantics kafka_io's: a
consumer group with manual commits, an idempotent producer with ``acks=all``
whose ``publish`` returns once every record is acknowledged, records the broker
refuses for themselves left out and counted. Keys go to the partitions Java
clients and kafka-python choose (murmur2), so the two clients can replace each
other on one topic.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Callable, Iterator, NamedTuple, Sequence

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    OFFSET_INVALID,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from .config import KafkaConfig
from .errors import BrokerUnavailable, UserError
from .messages import OutRecord
from .seams import Offsets, Ownership, Record, first_offsets
from .state_topic import StateLogError, StateTopic

__all__ = ["ConfluentSink", "ConfluentSource", "ConfluentStateLog", "client_config", "confluent_checkpoints",
           "read_history"]

log = logging.getLogger(__name__)


def client_config(config: KafkaConfig, client_id: str) -> dict:
    """librdkafka properties for connecting, TLS and SASL included (kafka_compat.client_settings' equivalents)."""
    settings: dict = {
        "bootstrap.servers": ",".join(config.bootstrap_servers),
        "client.id": client_id,
        "security.protocol": config.security_protocol.lower(),
        "reconnect.backoff.max.ms": 5000,
        "logger": logging.getLogger("confluent_kafka"),
    }
    if config.security_protocol in ("SSL", "SASL_SSL"):
        optional = {"ssl.ca.location": config.ssl_cafile, "ssl.certificate.location": config.ssl_certfile,
                    "ssl.key.location": config.ssl_keyfile, "ssl.key.password": config.secret("ssl_password")}
        settings.update({k: v for k, v in optional.items() if v is not None})
        settings["ssl.endpoint.identification.algorithm"] = "https" if config.ssl_check_hostname else "none"
    if config.security_protocol.startswith("SASL_"):
        settings.update({"sasl.mechanism": config.sasl_mechanism or "PLAIN", "sasl.username": config.sasl_username,
                         "sasl.password": config.secret("sasl_password")})
    return settings


class _Record(NamedTuple):  # a tuple: made for every message consumed
    """A consumed message in the shape the pipeline reads (:class:`stream_forecaster.seams.Record`)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int
    headers: Sequence[tuple[str, bytes | None]]


def _record(message) -> _Record:
    return _Record(message.topic(), message.partition(), message.offset(), message.key(), message.value(),
                   message.timestamp()[1], message.headers() or ())


def _client(factory, settings: dict, what: str):
    """A librdkafka client; settings it refuses (a bad certificate path, say) are one line, not a traceback."""
    try:
        return factory(settings)
    except KafkaException as exc:
        raise UserError(f"kafka: librdkafka refuses the {what}'s settings: {exc.args[0].str()}; check the kafka "
                        "section of the configuration") from None


def _of_a_record(message) -> bool:
    """Whether an error message is about a record (a topic, partition and offset) rather than the consumer."""
    partition, offset = message.partition(), message.offset()
    return message.topic() is not None and partition is not None and partition >= 0 \
        and offset is not None and offset >= 0


def _reachable(client, config: KafkaConfig, what: str) -> None:
    """Raise :class:`BrokerUnavailable` unless a broker answers (librdkafka itself only retries in the background)."""
    try:
        client.list_topics(timeout=10)
    except KafkaException as exc:
        raise BrokerUnavailable(f"cannot set up the {what}: {exc.args[0].str()} (kafka.bootstrap_servers "
                                f"{','.join(config.bootstrap_servers)}: is a broker running there?)") from None


def _reader(config: KafkaConfig, client_id: str) -> Consumer:
    """A consumer for assigned partitions: it joins no group and commits nothing."""
    return _client(Consumer, {**client_config(config, client_id), "group.id": client_id, "enable.auto.commit": False,
                              "enable.partition.eof": False}, "reader")


def _records_between(config: KafkaConfig, client_id: str, topic: str, partition: int, start: int, end: int,
                     stop: threading.Event | None = None, patience_s: float = 30.0,
                     stalled: Callable[[int], None] | None = None) -> Iterator[_Record]:
    """Records ``start <= offset < end`` of a partition (fewer where compaction removed some); ends early when
    ``stop`` is set, or after ``patience_s`` without progress (calling ``stalled(position)``)."""
    reader = _reader(config, client_id)
    try:
        tp = TopicPartition(topic, partition, start)
        reader.assign([tp])
        position, moved = start, time.monotonic()
        while position < end and not (stop is not None and stop.is_set()):
            for message in reader.consume(num_messages=10_000, timeout=0.5):
                offset = message.offset()
                if message.error() is None and offset is not None and offset < end:
                    yield _record(message)
            # the fetch position, not the last offset seen: it also steps over offsets compaction removed
            now = reader.position([tp])[0].offset
            if now > position:
                position, moved = now, time.monotonic()
            elif time.monotonic() - moved > patience_s:
                if stalled is not None:
                    stalled(position)
                return
    finally:
        reader.close()


class ConfluentSource:
    """The input topic, read in a consumer group with manual commits."""

    calls_before_revoke = True

    def __init__(self, config: KafkaConfig, group_id: str | None = None, client_id: str = "stream-forecaster",
                 on_unreadable: Callable[[], None] | None = None):
        self.topic, self.config, self.on_unreadable = config.input_topic, config, on_unreadable
        self._ownership = Ownership()
        self._rebalancing = False  # revoked, and the new assignment not yet come
        self._before_revoke: Callable[[], object] | None = None
        self._consumer = _client(Consumer, {
            **client_config(config, client_id),
            "group.id": group_id or config.group_id,
            "enable.auto.commit": False,  # offsets are committed only after the predictions are acknowledged
            "enable.auto.offset.store": False,
            "auto.offset.reset": config.auto_offset_reset,
            "session.timeout.ms": config.session_timeout_ms,
            "heartbeat.interval.ms": max(100, config.session_timeout_ms // 3),
            "max.poll.interval.ms": config.max_poll_interval_ms,
            "fetch.wait.max.ms": config.fetch_max_wait_ms,
        }, "consumer")
        try:
            _reachable(self._consumer, config, "consumer")
        except BrokerUnavailable:
            self._consumer.close()
            raise
        self._consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_revoke)

    def _on_revoke(self, consumer, partitions) -> None:
        if self._before_revoke is not None:
            self._before_revoke()  # librdkafka's callbacks run inside poll(), on this thread: commits work here
        self._ownership.revoked.update(p.partition for p in partitions)
        self._rebalancing = True

    def _on_assign(self, consumer, partitions) -> None:
        self._rebalancing = False  # librdkafka assigns them once this returns

    def poll(self, timeout_s: float, max_records: int | None = None,
             before_revoke: Callable[[], object] | None = None) -> list[_Record]:
        """The next batch, oldest first within each partition; a record that cannot be read is counted and skipped
        (it stays in the topic). ``before_revoke`` is called in a rebalance before partitions go."""
        self._before_revoke = before_revoke
        try:
            # consume() would wait out its timeout for a full batch: wait for the first message only, then take
            # what is already fetched
            first = self._consumer.poll(timeout_s)
            if first is None:
                return []
            more = (max_records or 10_000) - 1
            messages = [first, *(self._consumer.consume(num_messages=more, timeout=0) if more > 0 else ())]
        finally:
            self._before_revoke = None  # close() revokes too: by then nothing is in hand
        batch = []
        for message in messages:
            error = message.error()
            if error is None:
                batch.append(_record(message))
            elif error.code() == KafkaError._PARTITION_EOF:
                continue
            elif not _of_a_record(message):  # the consumer's own trouble (the group, the subscription)
                log.warning("kafka consumer: %s", error.str())
            else:
                log.error("%s[%s]: a record cannot be read (%s); skipped", message.topic(), message.partition(),
                          error.str())
                if self.on_unreadable:
                    self.on_unreadable()
        return batch

    def rewind(self, records: Sequence[Record]) -> None:
        owned = {tp.partition for tp in self._consumer.assignment()}
        for partition, offset in first_offsets(records).items():
            if partition in owned:
                self._consumer.seek(TopicPartition(self.topic, partition, offset))

    def seek(self, partition: int, offset: int | None) -> None:
        if offset is None:
            offset = OFFSET_BEGINNING if self.config.auto_offset_reset == "earliest" else OFFSET_END
        self._consumer.seek(TopicPartition(self.topic, partition, offset))

    def take_changes(self) -> tuple[set[int], set[int], set[int]]:
        """Partitions ``(lost, gained, regained)`` since the last call (see :class:`.seams.Ownership`).

        librdkafka serves a rebalance's revocation and its new assignment in
        separate polls; in between, nothing is reported, so a partition that
        comes straight back is regained (its windows kept), not lost and gained.
        """
        if self._rebalancing:
            return set(), set(), set()
        return self._ownership.changes({tp.partition for tp in self._consumer.assignment()})

    def committed(self, partition: int) -> int | None:
        found = self._consumer.committed([TopicPartition(self.topic, partition)],
                                         timeout=self.config.session_timeout_ms / 1000)
        offset = found[0].offset if found else OFFSET_INVALID
        return None if offset < 0 else offset

    def beginning(self, partition: int) -> int:
        low, _ = self._consumer.get_watermark_offsets(TopicPartition(self.topic, partition), timeout=10)
        return max(0, low)

    def read_range(self, partition: int, start: int, end: int, stop: threading.Event,
                   patience_s: float = 30.0) -> Iterator[Record]:
        """Records ``start <= offset < end`` of one partition, read by a consumer outside the group."""
        def stalled(position: int) -> None:
            log.warning("partition %d: nothing after offset %d for %.0f s, short of the committed offset %d "
                        "(a truncated log?); windows refilled from what there was", partition, position,
                        patience_s, end)

        yield from _records_between(self.config, "stream-forecaster-rebuild", self.topic, partition, start, end,
                                    stop, patience_s, stalled)

    def commit(self, offsets: Offsets) -> bool:
        if not offsets:
            return True
        try:
            self._consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                  asynchronous=False)
            return True
        except KafkaException as exc:
            log.warning("commit failed (%s); the partitions will be re-read from the last commit", exc.args[0].str())
            return False

    def lag(self) -> int | None:
        total, known = 0, False
        assignment = self._consumer.assignment()
        for tp in self._consumer.position(assignment) if assignment else ():
            if tp.offset < 0:  # not fetched yet
                continue
            _, high = self._consumer.get_watermark_offsets(tp, cached=True)
            if high < 0:
                continue
            total += max(0, high - tp.offset)
            known = True
        return total if known else None

    def assigned(self) -> bool:
        return bool(self._consumer.assignment())

    def close(self) -> None:
        self._consumer.close()


# refused for what the record is, not for the broker's state: sending it again can never succeed
_REFUSED = {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD, KafkaError.RECORD_LIST_TOO_LARGE,
            KafkaError.INVALID_MSG_SIZE}


class ConfluentSink:
    """An idempotent producer with ``acks=all``; ``publish`` returns once every record is acknowledged.

    librdkafka retries a record itself until ``delivery.timeout.ms``; a record
    it gives up on is sent again here, with backoff, and the producer is
    replaced after repeated failed rounds (an idempotent producer that met a
    fatal error stays failed).
    """

    RECREATE_AFTER = 2
    STOP_GRACE_S = 10.0

    def __init__(self, config: KafkaConfig, client_id: str = "stream-forecaster",
                 on_retry: Callable[[int], None] | None = None, on_recreate: Callable[[], None] | None = None,
                 on_refused: Callable[[], None] | None = None):
        self._config, self._client_id = config, client_id
        self._on_retry, self._on_recreate, self._on_refused = on_retry, on_recreate, on_refused
        self._fatal = False  # the producer failed for good: only a new one sends again
        self._producer = self._new_producer()
        self._in_flight: dict[int, OutRecord] = {}  # queued, not yet reported by librdkafka
        self._tokens = itertools.count()
        self._failed: list[tuple[OutRecord, KafkaError]] = []

    def _new_producer(self) -> Producer:
        producer = _client(Producer, {
            **client_config(self._config, self._client_id),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "batch.size": 256 * 1024,  # as kafka-python's: a batch must fit a topic's own max.message.bytes
            "partitioner": "murmur2_random",  # the Java clients' (and kafka-python's) choice for keyed records
            "message.max.bytes": max(1 << 20, self._config.max_message_bytes + 65536),
            "delivery.timeout.ms": 30_000,  # then this sink's own retries and backoff take over
            "error_cb": self._on_error,
        }, "producer")
        _reachable(producer, self._config, "producer")
        return producer

    def _on_error(self, error: KafkaError) -> None:  # on this thread, from flush or poll
        if error.fatal():  # an idempotent producer the broker no longer knows (a broker that lost its state)
            self._fatal = True

    def queue(self, records: Sequence[OutRecord]) -> None:
        """Send ``records`` without waiting; the next :meth:`publish` waits for their acknowledgements."""
        produce, tokens = self._producer.produce, self._tokens
        for record in records:  # runs for every forecast: the produce call inlined, no frame per record
            token = next(tokens)

            # on this thread, from flush or poll; self's: a recreated producer's sink starts a new count
            def delivered(error, _message, token=token, record=record):
                if self._in_flight.pop(token, None) is not None and error is not None:
                    self._failed.append((record, error))

            self._in_flight[token] = record
            topic, key, value, headers, partition = record
            try:
                produce(topic, value, key, -1 if partition is None else partition, on_delivery=delivered,
                        headers=list(headers) or None)
            except BufferError:  # librdkafka's queue is full: wait for room
                try:
                    self._send(record, delivered)
                except KafkaException as exc:
                    delivered(exc.args[0], None)
            except KafkaException as exc:  # refused before it was queued (too large, say)
                delivered(exc.args[0], None)

    def _send(self, record: OutRecord, on_delivery: Callable) -> None:
        """Hand ``record`` to librdkafka, waiting while its queue is full; ``KafkaException`` if refused."""
        while True:
            try:
                self._producer.produce(record.topic, record.value, record.key,
                                       -1 if record.partition is None else record.partition,
                                       on_delivery=on_delivery, headers=list(record.headers) or None)
                return
            except BufferError:  # librdkafka's queue is full (a large snapshot, say): let it send, then try again
                self._producer.poll(0.1)

    def publish(self, records: Sequence[OutRecord] = (), stop: threading.Event | None = None,
                backoff_s: float = 0.5, max_backoff_s: float = 10.0) -> bool:
        """Send ``records``; wait for their acknowledgements and those of every record queued since the last
        publish, resending failures with backoff. False only when ``stop`` was set first."""
        stop = stop or threading.Event()
        self.queue(records)
        failed_rounds, stopped_at = 0, None
        while True:
            if not self._fatal:
                try:
                    self._producer.flush(1.0)  # serves the delivery and error callbacks
                except (KafkaException, SystemError):  # confluent-kafka's answers once the producer failed for good
                    self._fatal = True
            if self._fatal:
                log.error("the Kafka producer failed for good")
                self._recreate()
                if stop.wait(backoff_s):  # no new producer yet, say: a stop is still heard
                    self._failed, self._in_flight = [], {}
                    return False
                continue
            failed = [(r, e) for r, e in self._failed if not self._refused(r, e)]
            self._failed = []
            if not failed and not self._in_flight:
                return True
            if failed:
                failed_rounds += 1
                log.warning("%d records not acknowledged (%s); retrying in %.1f s", len(failed), failed[0][1].str(),
                            backoff_s)
                if self._on_retry:
                    self._on_retry(len(failed))
            if stop.is_set():
                stopped_at = stopped_at or time.monotonic()
                if failed or time.monotonic() - stopped_at > self.STOP_GRACE_S:
                    self._failed, self._in_flight = [], {}  # given up: the caller reads its input again
                    return False
            elif failed and stop.wait(backoff_s):
                return False
            if failed:
                backoff_s = min(max_backoff_s, backoff_s * 2)
                if failed_rounds >= self.RECREATE_AFTER or any(e.fatal() for _, e in failed):
                    failed_rounds = 0
                    self._recreate()
                self.queue([r for r, _ in failed])

    def _refused(self, record: OutRecord, error: KafkaError) -> bool:
        if error.code() not in _REFUSED:
            return False
        log.error("the broker refuses a record for %s [%d bytes of key and value]: %s; left out", record.topic,
                  len(record.key or b"") + len(record.value or b""), error.str())
        if self._on_refused:
            self._on_refused()
        return True

    def _recreate(self) -> None:
        log.warning("replacing the Kafka producer")
        try:
            new = self._new_producer()
        except BrokerUnavailable as exc:
            log.warning("%s; trying again after the next failed round", exc)
            return
        old, self._producer, self._fatal = self._producer, new, False
        stranded, self._in_flight = list(self._in_flight.values()), {}
        try:
            old.purge()  # its queue, in flight included: sent again on the new producer
            old.flush(0)  # reports the purged records to callbacks that no longer count them
        except (KafkaException, SystemError):  # a producer failed for good refuses even that
            pass
        self.queue(stranded)
        if self._on_recreate:
            self._on_recreate()

    def deliver(self, records: Sequence[OutRecord], timeout_s: float = 10.0) -> list[int]:
        """Send ``records`` and wait for them apart from the queue; the offset each got. ``KafkaException`` if any
        was not written in ``timeout_s``."""
        offsets: list[int | None] = [None] * len(records)
        errors: list[KafkaError] = []

        def delivered(i: int):
            def report(error, message):
                if error is not None:
                    errors.append(error)
                else:
                    offsets[i] = message.offset()
            return report

        for i, record in enumerate(records):
            self._send(record, delivered(i))
        try:
            self._producer.flush(timeout_s)
        except SystemError:  # the producer failed for good: the records are not written, the next publish replaces it
            self._fatal = True
        written = [o for o in offsets if o is not None]
        if errors or len(written) < len(records):
            raise KafkaException(errors[0] if errors else KafkaError(KafkaError._TIMED_OUT))
        return written

    def close(self, timeout_s: float = 10.0) -> None:
        self._producer.flush(timeout_s)


class ConfluentStateLog:
    """The state topic's Kafka calls through librdkafka (:class:`~stream_forecaster.state_topic.StateLog`)."""

    def __init__(self, config: KafkaConfig, sink: ConfluentSink | None = None):  # None: reading only
        self._config, self._sink = config, sink
        self._admin = _client(AdminClient, client_config(config, "stream-forecaster-admin"), "admin client")

    def partitions(self, topic: str) -> int:
        try:
            found = self._admin.list_topics(timeout=10).topics.get(topic)
        except KafkaException as exc:
            raise BrokerUnavailable(f"cannot read the topics' metadata: {exc.args[0].str()}") from None
        return 0 if found is None or found.error is not None else len(found.partitions)

    def create_compacted(self, topic: str, partitions: int) -> None:
        for replication in (-1, 1):  # the broker's default; 1 for a broker that takes none (before Kafka 2.4)
            future = self._admin.create_topics([NewTopic(topic, partitions, replication,
                                                         config={"cleanup.policy": "compact"})])[topic]
            try:
                future.result(timeout=30)
                return
            except TimeoutError:  # concurrent.futures': the controller did not answer
                raise BrokerUnavailable(f"cannot create the state topic {topic}: no answer within 30 s") from None
            except KafkaException as exc:
                error = exc.args[0]
                if error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    return
                if replication == 1:
                    raise StateLogError(error.str()) from None

    def _writer(self) -> ConfluentSink:
        if self._sink is None:
            raise StateLogError("this state log only reads")
        return self._sink

    def publish(self, records: Sequence[OutRecord], stop: threading.Event) -> bool:
        return self._writer().publish(records, stop)

    def append(self, records: Sequence[OutRecord]) -> int:
        try:
            return self._writer().deliver(records)[0]
        except KafkaException as exc:
            raise StateLogError(exc.args[0].str()) from None

    def offsets(self, topic: str, partition: int) -> tuple[int, int]:
        reader = _reader(self._config, "stream-forecaster-state")
        try:
            low, high = reader.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        finally:
            reader.close()
        return max(0, low), max(0, high)

    def read(self, topic: str, partition: int, start: int, end: int) -> Iterator[Record]:
        yield from _records_between(self._config, "stream-forecaster-state", topic, partition, start, end)


def confluent_checkpoints(config: KafkaConfig, sink: ConfluentSink) -> StateTopic:
    """The daemon's checkpoints in the state topic, through librdkafka."""
    return StateTopic(config, ConfluentStateLog(config, sink))


def read_history(config: KafkaConfig, group_id: str, since_ms: int, stop: threading.Event,
                 max_records: int | None = None) -> Iterator[Record]:
    """The input topic's records from ``since_ms`` (message time) up to its end offsets when called, at most the
    last ``max_records`` of them (shared evenly between the partitions); see :func:`topics.read_history`.

    Partitions are assigned, never subscribed: the reader joins no group and commits nothing.
    """
    reader = _client(Consumer, {**client_config(config, "stream-forecaster-retrain"), "group.id": group_id,
                                "enable.auto.commit": False, "enable.partition.eof": False}, "history reader")
    try:
        try:
            found = reader.list_topics(config.input_topic, timeout=10).topics.get(config.input_topic)
        except KafkaException as exc:
            raise BrokerUnavailable(f"cannot read the history: {exc.args[0].str()} (kafka.bootstrap_servers "
                                    f"{','.join(config.bootstrap_servers)}: is a broker running there?)") from None
        if found is None or found.error is not None or not found.partitions:
            raise UserError(f"topic {config.input_topic!r} does not exist or has no partitions (kafka.input_topic)")
        partitions = sorted(found.partitions)
        starts = reader.offsets_for_times([TopicPartition(config.input_topic, p, since_ms) for p in partitions],
                                          timeout=30)
        share = max(1, max_records // len(partitions)) if max_records else None
        ends, assignment = {}, []
        for tp in starts:
            _, end = reader.get_watermark_offsets(TopicPartition(config.input_topic, tp.partition), timeout=10)
            if tp.offset < 0 or tp.offset >= end:  # nothing that recent (-1)
                continue
            start = tp.offset if share is None else max(tp.offset, end - share)
            ends[tp.partition] = end
            assignment.append(TopicPartition(config.input_topic, tp.partition, start))
        if not assignment:
            return
        reader.assign(assignment)
        remaining = set(ends)
        while remaining and not stop.is_set():
            for message in reader.consume(num_messages=10_000, timeout=1.0):
                offset, partition = message.offset(), message.partition()
                if message.error() is None and offset is not None and partition is not None \
                        and offset < ends[partition]:
                    yield _record(message)
            for tp in reader.position([TopicPartition(config.input_topic, p) for p in remaining]):
                if tp.offset >= ends[tp.partition]:
                    remaining.discard(tp.partition)
    finally:
        reader.close()
