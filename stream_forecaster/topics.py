"""Topic tools: creating topics and reading them outside the daemon's consumer group.

For the state topic, refills, the retrainer, the demo and tests; the daemon's
own reading and writing is :mod:`stream_forecaster.kafka_io`.
"""

from __future__ import annotations

import threading
import time
from typing import Iterable

from .config import KafkaConfig
from .errors import UserError
from .kafka_compat import (
    KafkaAdminClient,
    KafkaConsumer,
    NewTopic,
    TopicAlreadyExistsError,
    TopicPartition,
    client_settings,
    connect,
    poll,
)

__all__ = ["ensure_topics", "read_history", "read_topic", "records_between"]


def ensure_topics(config: KafkaConfig, topics: Iterable[str], partitions: int = 1, topic_configs: dict | None = None,
                  replication_factor: int = 1) -> None:
    """Create the topics that do not exist yet (for development and tests; production provisions its own,
    the daemon's state topic excepted)."""
    admin = connect(lambda: KafkaAdminClient(**client_settings(config, "stream-forecaster-admin")), "admin client",
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


def records_between(reader, tp, start: int, end: int, stop: threading.Event | None = None,
                     patience_s: float = 30.0, stalled=None):
    """Records ``start <= offset < end`` of ``tp``, assigned to ``reader`` (fewer where compaction removed some).

    Ends early when ``stop`` is set, or after ``patience_s`` without progress
    (calling ``stalled(position)``): a log can end short of an offset read
    elsewhere (an unclean leader election truncated it).
    """
    reader.seek(tp, start)
    position, moved = start, time.monotonic()
    while position < end and not (stop is not None and stop.is_set()):
        for records in poll(reader, 500).values():
            yield from (r for r in records if r.offset < end)
        now = reader.position(tp, timeout_ms=1000)
        if now is not None and now > position:
            position, moved = now, time.monotonic()
        elif time.monotonic() - moved > patience_s:
            if stalled is not None:
                stalled(position)
            return


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
    consumer = connect(lambda: KafkaConsumer(group_id=group_id, enable_auto_commit=False,
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
            for tp, records in poll(consumer, 1000).items():
                yield from (r for r in records if r.offset < ends[tp])
            remaining = {tp for tp in remaining if consumer.position(tp) < ends[tp]}
    finally:
        consumer.close(autocommit=False, timeout_ms=5000)
