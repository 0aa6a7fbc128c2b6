"""The daemon's model watcher: new versions are loaded off the loop; bad ones are refused."""

from __future__ import annotations

import gc
import json
import threading
import weakref

import pytest
from conftest import make_forecaster, sample_lines

from stream_forecaster.config import load_config
from stream_forecaster.metrics import Metrics
from stream_forecaster.model import Forecaster
from stream_forecaster.service import Daemon, ModelWatcher
from stream_forecaster.store import CHECKSUM_FILE, POINTER_FILE, ModelStore
from stream_forecaster.testing import FakeRecord, ListSink, ListSource

L = 6


@pytest.fixture
def store(tmp_path):
    store = ModelStore(tmp_path / "models")
    store.publish(make_forecaster(sequence_length=L, seed=1).save)
    return store


def watcher_for(store):
    metrics = Metrics(["Global_active_power"])
    serving = Forecaster.load(store.directory("1"), "1")
    return ModelWatcher(store, serving, 1.0, threading.Event(), metrics), metrics


def refused(metrics):
    return metrics.registry.get_sample_value("stream_forecaster_model_swaps_total", {"outcome": "refused"})


def test_a_new_version_is_loaded_once(store):
    watcher, metrics = watcher_for(store)
    watcher.check()
    assert watcher.take() is None  # nothing new
    store.publish(make_forecaster(sequence_length=L, seed=2).save)
    watcher.check()
    new = watcher.take()
    assert new.version == "2" and watcher.take() is None
    assert refused(metrics) == 0


def point_at(store, version):
    (store.path / POINTER_FILE).write_text(version + "\n")  # as a damaged or hand-edited store would


def test_a_damaged_pointer_is_waited_out_and_its_repair_is_picked_up(store, caplog):
    watcher, metrics = watcher_for(store)
    store.publish(make_forecaster(sequence_length=L, seed=2).save, make_current=False)
    point_at(store, "latest")
    watcher.check()  # must not raise: the watcher thread would die with it, and swaps with the thread
    assert watcher.take() is None and "is damaged" in caplog.text
    point_at(store, "2")
    watcher.check()
    assert watcher.take().version == "2" and refused(metrics) == 0


def test_truncated_file_is_refused(store):
    watcher, metrics = watcher_for(store)
    version = store.publish(make_forecaster(sequence_length=L, seed=2).save, make_current=False)
    model = store.directory(version) / "model.keras"
    model.write_bytes(model.read_bytes()[:100])
    point_at(store, version)
    watcher.check()
    assert watcher.take() is None and refused(metrics) == 1


def test_wrong_checksum_is_refused(store):
    watcher, metrics = watcher_for(store)
    version = store.publish(make_forecaster(sequence_length=L, seed=2).save, make_current=False)
    listing = store.directory(version) / CHECKSUM_FILE
    listing.write_text(listing.read_text().replace(listing.read_text()[:8], "00000000", 1))
    point_at(store, version)
    watcher.check()
    assert watcher.take() is None and refused(metrics) == 1


def test_other_sequence_length_is_refused(store, caplog):
    watcher, metrics = watcher_for(store)
    store.publish(make_forecaster(sequence_length=L + 3).save)
    watcher.check()
    assert watcher.take() is None and refused(metrics) == 1
    assert "refusing model version 2" in caplog.text and "windows of 9" in caplog.text
    watcher.check()  # the same bad version is not retried on every poll
    assert refused(metrics) == 1


def test_daemon_swaps_between_batches_without_dropping_or_repeating(store, tmp_path):
    config = load_config(None, [f"model_store.path={store.path}", "kafka.input_topic=in", "model.sequence_length=6",
                                "data.features=[Global_active_power]", "model.layers=[1, 8, 1]",
                                "metrics.port=0", "model_store.poll_interval=3600s"], environ={})
    lines = sample_lines(40)
    records = [FakeRecord("in", 0, i, b"s", line.encode()) for i, line in enumerate(lines)]
    stop = threading.Event()
    batches = [records[:15], records[15:30], records[30:]]
    source, sink = ListSource(batches, stop_when_done=stop), ListSink()
    daemon = Daemon(config, source=source, sink=sink, stop=stop)

    class PublishAfterFirstBatch:
        """Publishes version 2 once the first batch was handled, then lets the watcher look."""

        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def queue(self, out):
            self.inner.queue(out)

        def publish(self, out=(), stop=None):
            self.calls += 1
            ok = self.inner.publish(out, stop)
            if self.calls == 1:
                store.publish(make_forecaster(sequence_length=L, seed=5).save)
                daemon.watcher.check()
            return ok

        def close(self):
            self.inner.close()

    daemon.sink = PublishAfterFirstBatch(sink)
    serving_first = []
    initialize = daemon.initialize

    def initialize_and_note_the_model():
        ok = initialize()
        serving_first.append(weakref.ref(daemon.pipeline.forecaster))
        return ok

    daemon.initialize = initialize_and_note_the_model
    assert daemon.run() == 0
    # run() froze the heap it started with, the first model in it; the swap let that model go
    assert gc.get_freeze_count() > 0
    gc.collect()
    assert serving_first[0]() is None
    got = [json.loads(r.value) for r in sink.records]
    offsets = [g["source"]["offset"] for g in got]
    assert offsets == list(range(L - 2, 40))  # every reading after the first full window, once, in order
    versions = [g["model_version"] for g in got]
    assert versions == ["1"] * (15 - (L - 2)) + ["2"] * 25
    assert daemon.metrics.registry.get_sample_value("stream_forecaster_model_swaps_total", {"outcome": "swapped"}) == 1
    assert daemon.metrics.registry.get_sample_value("stream_forecaster_model_version") == 2
    assert source.commits[-1] == {("in", 0): 40}


def test_while_it_waits_for_a_first_model_the_daemon_is_alive_but_not_ready(tmp_path):
    """A fresh install: the store fills only when a trainer or the retrainer publishes. Probes of the process
    must not kill it meanwhile (/healthz 200), and traffic must not reach it (/readyz 503)."""
    import urllib.error
    import urllib.request

    from daemon import wait_for

    store = ModelStore(tmp_path / "models")
    config = load_config(None, [f"model_store.path={store.path}", "kafka.input_topic=in", "model.sequence_length=6",
                                "data.features=[Global_active_power]", "model.layers=[1, 8, 1]", "metrics.port=0",
                                "model_store.poll_interval=0.1s"], environ={})
    stop = threading.Event()
    records = [FakeRecord("in", 0, i, b"s", line.encode()) for i, line in enumerate(sample_lines(L))]
    source, sink = ListSource([records], stop_when_done=stop), ListSink()
    daemon = Daemon(config, source=source, sink=sink, stop=stop)
    runner = threading.Thread(target=daemon.run)
    runner.start()

    def status(path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{daemon.server.port}{path}", timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        wait_for(lambda: daemon.server is not None, 30, "the endpoint")
        assert status("/healthz") == 200 and status("/readyz") == 503
        assert daemon.pipeline is None  # still waiting: nothing was consumed
        store.publish(make_forecaster(sequence_length=L).save)
    finally:
        runner.join(60)
        stop.set()
    assert not runner.is_alive() and len(sink.records) == 2  # the first model then served the batch


def test_a_pointer_that_is_not_text_is_reported_and_the_watcher_goes_on(store, caplog):
    watcher, metrics = watcher_for(store)
    store.publish(make_forecaster(sequence_length=L, seed=2).save)
    (store.path / POINTER_FILE).write_bytes(b"\xff\xfe")
    watcher.check()  # used to raise UnicodeDecodeError, which ended the watcher thread for good
    assert "is damaged: not text" in caplog.text and watcher.take() is None
    store.set_current("2")
    watcher.check()
    assert watcher.take().version == "2"


def test_a_refused_commit_is_tried_again_and_at_the_latest_at_a_clean_stop(store, tmp_path):
    config = load_config(None, [f"model_store.path={store.path}", "kafka.input_topic=in", "model.sequence_length=6",
                                "data.features=[Global_active_power]", "model.layers=[1, 8, 1]",
                                "metrics.port=0"], environ={})
    stop = threading.Event()
    records = [FakeRecord("in", 0, i, b"s", line.encode()) for i, line in enumerate(sample_lines(L))]
    source = ListSource([records], stop_when_done=stop, refuse_commits=1)  # the coordinator moved, once
    daemon = Daemon(config, source=source, sink=ListSink(), stop=stop)
    assert daemon.run() == 0
    assert source.commits == [{("in", 0): L}]  # the published batch is not read again after the stop
