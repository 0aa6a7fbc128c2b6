"""The Kafka client ``kafka.client`` names: its sink, source and state log types, its module alone imported."""

from __future__ import annotations

from typing import Any, NamedTuple

from .config import KafkaConfig

__all__ = ["Client", "kafka_client"]


class Client(NamedTuple):
    sink: type[Any]  # a seams.Sink
    source: type[Any]  # a seams.Source
    state_log: type[Any]  # a state_topic.StateLog; built with a sink, or None to read only


def kafka_client(config: KafkaConfig) -> Client:
    if config.client == "confluent":
        from . import confluent_io  # noqa: PLC0415 (librdkafka only when asked for)

        return Client(confluent_io.ConfluentSink, confluent_io.ConfluentSource, confluent_io.ConfluentStateLog)
    from . import kafka_io  # noqa: PLC0415

    return Client(kafka_io.KafkaSink, kafka_io.KafkaSource, kafka_io.KafkaStateLog)
