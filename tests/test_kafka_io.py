import dataclasses
import threading

from hypothesis import given
from hypothesis import strategies as st
from kafka import KafkaProducer
from kafka.partitioner import DefaultPartitioner

from stream_forecaster import kafka_io
from stream_forecaster.config import load_config
from stream_forecaster.devbroker import free_port
from stream_forecaster.kafka_compat import BrokerUnavailable
from stream_forecaster.kafka_io import KafkaSink, KafkaSource, KeyPartitioner
from stream_forecaster.messages import OutRecord
from stream_forecaster.topics import ensure_topics, read_history, read_topic


class Cluster:
    """The three questions a partitioner asks of kafka-python's ClusterMetadata."""

    def __init__(self, partitions: int):
        self.partitions = set(range(partitions))

    def topics(self):
        return {"out"}

    def partitions_for_topic(self, topic):
        return self.partitions

    def available_partitions_for_topic(self, topic):
        return self.partitions


@given(st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=50), st.integers(1, 64), st.integers(1, 64))
def test_remembered_partitions_are_the_default_partitioners_even_after_a_partition_count_change(keys, before, after):
    remembering, default = KeyPartitioner(limit=10), DefaultPartitioner()
    for count in (before, after):
        cluster = Cluster(count)
        for key in keys + keys:  # the second pass answers from memory
            assert remembering.partition("out", key, key, None, b"v", cluster) == \
                default.partition("out", key, key, None, b"v", cluster)


def test_memory_is_bounded_and_unkeyed_records_still_spread():
    partitioner, cluster = KeyPartitioner(limit=100), Cluster(4)
    for i in range(1000):
        partitioner.partition("out", None, str(i).encode(), None, b"v", cluster)
    assert len(partitioner._known["out"][1]) <= 100
    known = dict(partitioner._known["out"][1])
    for key in known:  # a full memory still answers the keys it holds
        partitioner.partition("out", None, key, None, b"v", cluster)
    assert partitioner._known["out"][1] == known
    assert {partitioner.partition("out", None, None, None, b"v", cluster) for _ in range(200)} == {0, 1, 2, 3}


def test_a_producer_that_cannot_be_replaced_yet_is_kept_and_replaced_later(broker, kafka_names):
    config = load_config(None, [f"kafka.bootstrap_servers={broker.address}"], environ={})
    nowhere = dataclasses.replace(config.kafka, bootstrap_servers=(f"127.0.0.1:{free_port()}",))
    recreated, broker_gone = [], [False]

    def new_producer():  # a producer for the broker, or for an address where none answers while it is "gone"
        return KafkaSink(nowhere if broker_gone[0] else config.kafka)._producer

    sink = KafkaSink(config.kafka, on_recreate=lambda: recreated.append(1), new_producer=new_producer)
    try:
        working = sink._producer
        broker_gone[0] = True
        sink._recreate()  # no broker answers there: a long outage must not end the daemon
        assert sink._producer is working and recreated == []
        broker_gone[0] = False
        sink._recreate()
        assert sink._producer is not working and recreated == [1]
        ensure_topics(config.kafka, [kafka_names["output"]])
        assert sink.publish([OutRecord(kafka_names["output"], b"k", b"v")])
        read = read_topic(config.kafka, kafka_names["output"], threading.Event(), idle_s=1)
        assert [(r.key, r.value) for r in read] == [(b"k", b"v")]
    finally:
        sink.close()


def test_a_refill_range_past_the_end_of_the_log_ends_once_nothing_comes(broker, kafka_names, caplog):
    """As after an unclean leader election: the committed offset lies beyond what the log still holds."""
    config = load_config(None, [f"kafka.bootstrap_servers={broker.address}",
                                f"kafka.input_topic={kafka_names['input']}",
                                f"kafka.group_id={kafka_names['group']}", "kafka.session_timeout_ms=6000"], environ={})
    ensure_topics(config.kafka, [kafka_names["input"]])
    sink = KafkaSink(config.kafka)
    assert sink.publish([OutRecord(kafka_names["input"], b"s", str(i).encode()) for i in range(5)])
    sink.close()
    source = KafkaSource(config.kafka)
    try:
        read = list(source.read_range(0, 1, 8, threading.Event(), patience_s=2))
    finally:
        source.close()
    assert [r.value for r in read] == [b"1", b"2", b"3", b"4"]
    assert "nothing after offset 5 for 2 s, short of the committed offset 8" in caplog.text


def test_history_reads_from_the_first_recent_reading_and_nothing_of_a_partition_without_one(
        broker, kafka_names, monkeypatch):
    """Broker deviation met here: for a time after every message the development broker answers offset 0
    (timestamp -1), where Apache Kafka answers -1, which kafka-python gives as None; None is forced below."""
    config = load_config(None, [f"kafka.bootstrap_servers={broker.address}",
                                f"kafka.input_topic={kafka_names['input']}"],
                         environ={})
    ensure_topics(config.kafka, [kafka_names["input"]])
    sink = KafkaSink(config.kafka)
    for i in range(4):  # one batch each: the broker may read the end offset as the last batch's base offset
        assert sink.publish([OutRecord(kafka_names["input"], b"s", str(i).encode())])
    sink.close()
    stop = threading.Event()
    read = [r.value for r in read_history(config.kafka, kafka_names["group"], 0, stop)]
    assert read in ([b"0", b"1", b"2"], [b"0", b"1", b"2", b"3"])
    monkeypatch.setattr(kafka_io.KafkaConsumer, "offsets_for_times", lambda self, query: {tp: None for tp in query})
    assert list(read_history(config.kafka, kafka_names["group"], 0, stop)) == []


def test_history_reads_at_most_the_most_recent_records_shared_between_the_partitions(broker, kafka_names):
    config = load_config(None, [f"kafka.bootstrap_servers={broker.address}",
                                f"kafka.input_topic={kafka_names['input']}"],
                         environ={})
    ensure_topics(config.kafka, [kafka_names["input"]], partitions=2)
    sink = KafkaSink(config.kafka)
    for i in range(12):  # one batch each, as above
        assert sink.publish([OutRecord(kafka_names["input"], b"s", str(i).encode(), partition=i % 2)])
    sink.close()
    read = list(read_history(config.kafka, kafka_names["group"], 0, threading.Event(), max_records=6))
    # the last 3 of each partition, less the newest one where the broker reads the end offset short
    assert {p: [int(r.value) for r in read if r.partition == p] for p in (0, 1)} in (
        {0: [6, 8, 10], 1: [7, 9, 11]}, {0: [4, 6, 8], 1: [5, 7, 9]}, {0: [6, 8, 10], 1: [5, 7, 9]},
        {0: [4, 6, 8], 1: [7, 9, 11]})


def test_a_record_refused_for_its_size_is_left_out_and_counted_not_retried_for_ever(broker, kafka_names):
    config = load_config(None, [f"kafka.bootstrap_servers={broker.address}"], environ={})
    ensure_topics(config.kafka, [kafka_names["output"]])
    refused, retried = [], []
    sink = KafkaSink(config.kafka, on_retry=retried.append, on_refused=lambda: refused.append(1))
    try:
        too_large = OutRecord(kafka_names["output"], b"k", b"x" * (3 << 20))  # over the producer's max_request_size
        assert sink.publish([OutRecord(kafka_names["output"], b"k", b"a"), too_large,
                             OutRecord(kafka_names["output"], b"k", b"b")])
    finally:
        sink.close()
    assert (refused, retried) == ([1], [])
    read = read_topic(config.kafka, kafka_names["output"], threading.Event(), idle_s=1)
    assert [r.value for r in read] == [b"a", b"b"]


def test_after_a_stop_acknowledgements_on_their_way_are_still_waited_for(broker, kafka_names):
    """A clean stop with a slow broker: the batch is acknowledged (and committed), so nothing is repeated."""
    config = load_config(None, [f"kafka.bootstrap_servers={broker.address}"], environ={})
    ensure_topics(config.kafka, [kafka_names["output"]])
    sink = KafkaSink(config.kafka)
    flush = sink._producer.flush
    sink._producer.flush = lambda timeout=None: flush(timeout=0)  # every wait ends before the acks come
    stop = threading.Event()
    stop.set()
    try:
        assert sink.publish([OutRecord(kafka_names["output"], b"k", str(i).encode()) for i in range(3)], stop)
    finally:
        sink._producer.flush = flush
        sink.close()


class _RawHeaderKey(str):
    """A header key as librdkafka may send it: bytes that are not UTF-8 (kafka-python cannot decode them)."""

    def encode(self, *args, **kwargs):
        return b"\xffkey"


def test_an_undecodable_record_is_skipped_counted_and_the_records_around_it_are_read(broker, kafka_names):
    config = load_config(None, [f"kafka.bootstrap_servers={broker.address}",
                                f"kafka.input_topic={kafka_names['input']}",
                                f"kafka.group_id={kafka_names['group']}", "kafka.session_timeout_ms=6000"], environ={})
    ensure_topics(config.kafka, [kafka_names["input"]])
    producer = KafkaProducer(bootstrap_servers=broker.address)
    for value, headers in ((b"1", None), (b"2", [(_RawHeaderKey("h"), b"v")]), (b"3", None)):
        producer.send(kafka_names["input"], value, b"s", headers=headers)
        producer.flush()  # a batch each
    producer.close()
    unreadable, got = [], []
    source = KafkaSource(config.kafka, on_unreadable=lambda: unreadable.append(1))

    def consume():  # on a thread: without the skip, kafka-python's poll spins for ever
        while len(got) < 2:
            got.extend(r.value for r in source.poll(0.5))

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    reader.join(60)
    assert not reader.is_alive(), "the poll spun on the undecodable record"
    source.close()
    assert got == [b"1", b"3"] and unreadable == [1]


class ScriptedProducer:
    """A producer whose sends fail or hang as scripted: ``outcome(record value)`` gives an exception to raise
    from ``send`` (no metadata), a KafkaError to fail its future with, or None to leave it in flight."""

    def __init__(self, outcome):
        self.outcome, self.sent = outcome, []

    def send(self, topic, key=None, value=None, headers=None, partition=None):
        from kafka.errors import KafkaTimeoutError
        from kafka.future import Future

        self.sent.append(value)
        result = self.outcome(value)
        if isinstance(result, KafkaTimeoutError):
            raise result
        return Future().failure(result) if result is not None else Future()

    def flush(self, timeout=None):
        pass


def scripted_sink(outcome, stop_after_retries, new_producer=None):
    """A sink on ScriptedProducers (``new_producer`` makes the replacements); stopped after that many retries."""
    stop, retries = threading.Event(), []

    def on_retry(n):
        retries.append(n)
        if len(retries) >= stop_after_retries:
            stop.set()

    first = [ScriptedProducer(outcome)]
    sink = KafkaSink(load_config(None, environ={}).kafka, "test", on_retry=on_retry,
                     new_producer=lambda: first.pop() if first else new_producer())
    return sink, stop


def test_a_topic_without_metadata_costs_one_blocked_send_per_round_not_one_per_record():
    from kafka.errors import KafkaTimeoutError

    # each real send would block max_block_ms (5 s): 20,000 forecasts were 28 hours deaf to SIGTERM
    sink, stop = scripted_sink(lambda value: KafkaTimeoutError("no metadata for out"), stop_after_retries=2)
    assert not sink.publish([OutRecord("out", b"k", b"%d" % i) for i in range(100)], stop, backoff_s=0.01)
    assert len(sink._producer.sent) == 2  # one per round


def test_a_topic_without_metadata_costs_one_blocked_send_however_many_chunks_were_queued():
    from kafka.errors import KafkaTimeoutError

    sink, stop = scripted_sink(lambda value: KafkaTimeoutError("no metadata for out"), stop_after_retries=1)
    for chunk in range(20):  # a poll batch's forecasts, queued chunk by chunk
        sink.queue([OutRecord("out", b"k", b"%d-%d" % (chunk, i)) for i in range(10)])
    assert not sink.publish((), stop, backoff_s=0.01)
    assert len(sink._producer.sent) == 1


def test_records_in_flight_are_not_sent_twice_on_a_producer_that_could_not_be_replaced():
    from kafka.errors import KafkaConnectionError

    def no_broker():
        raise BrokerUnavailable("no broker")

    sink, stop = scripted_sink(lambda value: KafkaConnectionError("down") if value == b"fails" else None,
                               stop_after_retries=3, new_producer=no_broker)
    assert not sink.publish([OutRecord("out", b"k", b"fails"), OutRecord("out", b"k", b"in flight")], stop,
                            backoff_s=0.01)
    assert sink._producer.sent.count(b"in flight") == 1 and sink._producer.sent.count(b"fails") == 3


def test_a_replaced_producer_stops_its_sender_even_with_batches_it_could_not_deliver():
    import time

    from kafka import TopicPartition

    def stranded():  # a producer with a batch no broker will take (as in flight during an outage)
        producer = KafkaProducer(bootstrap_servers=f"127.0.0.1:{free_port()}", api_version=(2, 8), acks="all",
                                 enable_idempotence=True)
        producer._accumulator.append(TopicPartition("out", 0), int(time.time() * 1000), b"k", b"v", [])
        return producer

    sink, _ = scripted_sink(lambda value: None, stop_after_retries=1, new_producer=stranded)
    sink._producer = old = stranded()
    try:
        assert sink._recreate()
        old._sender.join(10)
        assert not old._sender.is_alive()  # before, its thread, sockets and batch lived on
    finally:
        sink._producer._sender.force_close()
