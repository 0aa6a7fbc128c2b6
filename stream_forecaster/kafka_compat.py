"""The boundary with kafka-python: the only module that imports it.

Everything else reaches Kafka through the names re-exported here, and every
access to kafka-python's private attributes (its fetcher, coordinator and
sender) is one function below, checked against the release range that
``pyproject.toml`` pins (:data:`SUPPORTED`): moving the pin means reading
these functions against the new release, and nothing else.
"""

from __future__ import annotations

import logging

import kafka
from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import (
    CorruptRecordError,
    InvalidRecordError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAlreadyExistsError,
    UnsupportedCodecError,
)
from kafka.future import Future
from kafka.partitioner import DefaultPartitioner
from kafka.structs import OffsetAndMetadata

from .config import KafkaConfig
from .errors import BrokerUnavailable

__all__ = ["SUPPORTED", "BrokerUnavailable", "ConsumerRebalanceListener", "CorruptRecordError", "DefaultPartitioner",
           "Future", "InvalidRecordError", "KafkaAdminClient", "KafkaConsumer", "KafkaError", "KafkaProducer",
           "KafkaTimeoutError", "MessageSizeTooLargeError", "NewTopic", "OffsetAndMetadata", "RecordListTooLargeError",
           "TopicAlreadyExistsError", "TopicPartition", "UnsupportedCodecError", "client_settings", "connect",
           "force_close", "poll", "session_expired"]

log = logging.getLogger(__name__)

SUPPORTED = (3, 0)  # kafka-python>=3.0,<3.1 in pyproject.toml: the release the private accesses below were read in

if tuple(int(p) for p in kafka.__version__.split(".")[:2]) != SUPPORTED:
    log.warning("kafka-python %s is installed; stream-forecaster is tested with %d.%d.x, whose internals it works "
                "around: install kafka-python>=3.0,<3.1", kafka.__version__, *SUPPORTED)


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


def connect(factory, what: str, config: KafkaConfig):
    try:
        return factory()
    except KafkaError as exc:  # NoBrokersAvailable and friends, raised while bootstrapping
        raise BrokerUnavailable(f"cannot set up the {what}: {exc} (kafka.bootstrap_servers "
                                f"{','.join(config.bootstrap_servers)}: is a broker running there?)") from None


# what unpacking a fetched batch raises for a record it cannot decode
_UNDECODABLE = (CorruptRecordError, UnsupportedCodecError, UnicodeDecodeError)


def poll(consumer, timeout_ms: int, max_records: int | None = None, on_unreadable=None) -> dict:
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
        stuck = getattr(getattr(consumer, "_fetcher", None), "_next_partition_records", None)  # private
        tp = getattr(stuck, "topic_partition", None) if stuck else None
        offset = consumer.position(tp, timeout_ms=1000) if tp is not None and tp in consumer.assignment() else None
        if tp is None or offset is None:
            raise  # not a record of ours (a fetch's error code, say): the caller retries
        log.error("%s[%d]: the record at offset %d cannot be read (%s: %s); skipped, it stays in the topic",
                  tp.topic, tp.partition, offset, type(exc).__name__, exc)
        consumer.seek(tp, offset + 1)
        if on_unreadable:
            on_unreadable()
        return {}


def session_expired(consumer: KafkaConsumer) -> bool:
    """Whether the group coordinator has not answered within the session timeout (False when unknown).

    kafka-python keeps the heartbeat clock privately.
    """
    heartbeat = getattr(getattr(consumer, "_coordinator", None), "heartbeat", None)  # private
    return heartbeat is not None and heartbeat.session_timeout_expired()


def force_close(producer: KafkaProducer) -> None:
    """Close a broken producer now, batches in flight or not.

    kafka-python 3.0 flushes first and raises while batches are incomplete,
    before it stops its sender thread: stop that thread here, or it, its
    sockets and batches live on (and may still deliver).
    """
    try:
        producer.close(timeout=0)
    except Exception:  # noqa: BLE001 (the producer is broken anyway)
        sender = getattr(producer, "_sender", None)  # private
        if sender is not None:
            sender.force_close()
