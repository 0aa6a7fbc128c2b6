"""The model store in a compacted topic, against the embedded broker, with either Kafka client."""

from __future__ import annotations

import threading

import pytest
from conftest import daemon_overrides, make_forecaster
from daemon import DaemonProcess, wait_for
from test_store import writer

from stream_forecaster.cli import main
from stream_forecaster.config import load_config
from stream_forecaster.messages import OutRecord
from stream_forecaster.metrics import Metrics
from stream_forecaster.model_topic import KafkaModelLogs
from stream_forecaster.service import ModelWatcher
from stream_forecaster.store import CHECKSUM_FILE, ModelStoreError, open_store
from stream_forecaster.topics import ensure_topics

CLIENTS = ["kafka-python", "confluent"]


def settings(broker, topic, cache, client="kafka-python", keep=5) -> list[str]:
    return [f"kafka.bootstrap_servers={broker.address}", f"kafka.client={client}", f"model_store.topic={topic}",
            f"model_store.path={cache}", f"model_store.keep={keep}"]


@pytest.fixture
def topic_store(broker, kafka_names, tmp_path):
    """``make(cache, client, keep)``: a store in this test's topic, caching in ``tmp_path / cache``."""
    topic = f"models-{kafka_names['group']}"

    def make(cache="cache", client="kafka-python", keep=5):
        return open_store(load_config(None, settings(broker, topic, tmp_path / cache, client, keep), environ={}))

    make.topic = topic
    return make


def files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def by_hand(store, records: dict[str, bytes | None]) -> None:
    """Append records to the store's topic as another program would, one acknowledged batch each."""
    with KafkaModelLogs(store._logs.config).writer() as log:
        for key, value in records.items():
            log.append([OutRecord(store.topic, key.encode(), value, partition=0)])


@pytest.mark.parametrize("client", CLIENTS)
def test_versions_published_to_the_topic_are_read_back_whole_elsewhere_and_old_ones_pruned(client, topic_store):
    publisher = topic_store("publisher", client, keep=2)
    assert publisher.current() is None and publisher.versions() == []  # no topic yet: an empty store
    big = "x" * 1_300_000  # three chunks
    assert [publisher.publish(writer(p)) for p in ("a", big, "c")] == ["1", "2", "3"]
    reader = topic_store("reader", client)
    assert reader.versions() == ["2", "3"] and reader.current() == "3" and reader.shadow() is None
    directory, version = reader.resolve(None)
    assert version == "3" and files(directory) == files(publisher.directory("3"))
    assert reader.verify(directory) == directory and reader.metadata("2").features == (big,)
    assert not publisher.directory("1").exists()  # pruned from the topic and from the cache
    reader.set_shadow("2")
    assert publisher.shadow() == "2"
    reader.set_current("2")
    assert publisher.current() == "2" and publisher.previous() is None
    publisher.set_shadow(None)
    assert reader.shadow() is None and reader.current() == "2"
    with pytest.raises(ModelStoreError, match="model version 1 is not a complete version"):
        reader.set_current("1")


def test_chunks_without_their_manifest_or_a_manifest_without_its_chunks_are_no_version(topic_store):
    store = topic_store()
    store.publish(writer("a"))
    by_hand(store, {"chunk/u1/model.keras/0": b"half of a model",
                    "manifest/3/u2": b'{"files": [{"name": "model.keras", "bytes": 10, "chunks": 2, "sha256": "0"}]}',
                    "chunk/u2/model.keras/0": b"12345",
                    "CURRENT": b"3"})
    fresh = topic_store("fresh")
    assert fresh.versions() == ["1"] and fresh.current() == "3"
    with pytest.raises(ModelStoreError, match="no model version or directory '3'"):
        fresh.load("3")
    assert store.publish(writer("b")) == "4"  # a number the topic names is never used again


def test_a_damaged_chunk_is_refused_and_the_daemons_watcher_keeps_serving(topic_store):
    from stream_forecaster.model import Forecaster

    publisher = topic_store("publisher")
    publisher.publish(make_forecaster(seed=1).save)
    daemon_store = topic_store("daemon")
    metrics = Metrics(["Global_active_power"])
    watcher = ModelWatcher(daemon_store, daemon_store.load("1", jit_compile=False), 1.0, threading.Event(), metrics,
                           jit_compile=False)
    publisher.publish(make_forecaster(seed=2).save, make_current=False)
    key = f"chunk/{publisher._manifests()['2'].upload}/model.keras/0"
    damaged = bytearray(publisher._view[key].value)
    damaged[len(damaged) // 2] ^= 0x01
    by_hand(publisher, {key: bytes(damaged), "CURRENT": b"2"})
    watcher.check()
    assert watcher.take() is None and watcher.serving.version == "1"
    assert metrics.registry.get_sample_value("stream_forecaster_model_swaps_total", {"outcome": "refused"}) == 1
    assert not daemon_store.directory("2").exists()  # never cached damaged
    publisher.publish(make_forecaster(seed=3).save)
    watcher.check()
    swapped = watcher.take()
    assert isinstance(swapped, Forecaster) and swapped.version == "3"


def test_models_list_and_promote_work_on_the_topic_store(topic_store, broker, tmp_path, capsys):
    store = topic_store("publisher")
    for payload in "ab":
        store.publish(writer(payload))
    args = [arg for setting in settings(broker, topic_store.topic, tmp_path / "operator") for arg in ("--set", setting)]
    assert main(["models", "list", *args]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in listing[1:]] == [["1", "?"], ["*", "2"]]
    assert main(["models", "promote", "1", *args]) == 0
    assert store.current() == "1"
    assert main(["models", "rollback", *args]) == 2
    assert "nothing to roll back to" in capsys.readouterr().err
    assert main(["models", "promote", "7", *args]) == 2


def test_an_unreachable_broker_is_one_line_for_a_command(tmp_path, capsys, monkeypatch):
    def refuse(self):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(KafkaModelLogs, "reader", refuse)
    assert main(["models", "list", "--set", "model_store.topic=models", "--set",
                 f"model_store.path={tmp_path / 'cache'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model store topic models: cannot read it" in err
    assert "is a broker running at 127.0.0.1:9092" in err


def test_a_daemon_swaps_to_a_version_published_to_the_topic_without_a_shared_directory(broker, kafka_names,
                                                                                       topic_store, tmp_path):
    """The publisher writes with kafka-python, the daemon reads with librdkafka; their caches differ."""
    publisher = topic_store("publisher")
    publisher.publish(make_forecaster(seed=1).save)
    config = load_config(None, daemon_overrides(broker.address, kafka_names, tmp_path), environ={})
    ensure_topics(config.kafka, [config.kafka.input_topic, config.kafka.output_topic], partitions=1)
    overrides = daemon_overrides(broker.address, kafka_names, tmp_path / "daemon-cache", kafka__client="confluent",
                                 model_store__topic=topic_store.topic, model_store__poll_interval="0.5s")
    daemon = DaemonProcess(overrides, tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        assert daemon.metrics()["stream_forecaster_model_version"] == 1
        publisher.publish(make_forecaster(seed=2).save)
        wait_for(lambda: daemon.metrics()["stream_forecaster_model_version"] == 2, 60, "the swap to version 2")
        assert (tmp_path / "daemon-cache" / "2" / CHECKSUM_FILE).is_file()
        assert daemon.terminate() == 0
    finally:
        daemon.close()
