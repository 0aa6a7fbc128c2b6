import contextlib
import hashlib
import json
import multiprocessing
import shutil

import pytest

from stream_forecaster.messages import OutRecord
from stream_forecaster.store import (
    CHECKSUM_FILE,
    POINTER_FILE,
    SHADOW_FILE,
    IncompatibleModel,
    ModelMetadata,
    ModelStore,
    ModelStoreError,
)


def writer(payload: str, **metadata):
    """A version whose "model" is ``payload`` and whose metadata names it (as the first feature)."""
    def write(directory):
        (directory / "model.keras").write_text(payload)
        meta = {"features": [payload], "targets": [payload], "sequence_length": 4,
                "normalization": {"method": "window"}, **metadata}
        (directory / "metadata.json").write_text(json.dumps(meta))
    return write


def test_publish_numbers_versions_and_moves_current(tmp_path):
    store = ModelStore(tmp_path / "store", keep=5)
    assert store.current() is None and store.versions() == []
    assert store.publish(writer("a")) == "1"
    assert store.publish(writer("b")) == "2"
    assert store.versions() == ["1", "2"] and store.current() == "2"
    assert store.metadata("2").features == ("b",)
    assert store.publish(writer("c"), make_current=False) == "3"
    assert store.current() == "2"


def test_checksum_file_lists_every_file(tmp_path):
    store = ModelStore(tmp_path)
    version = store.publish(writer("a"))
    names = sorted(line.split("  ")[1] for line in (store.directory(version) / CHECKSUM_FILE).read_text().splitlines())
    assert names == ["metadata.json", "model.keras"]
    assert store.verify(store.directory(version)) == store.directory(version)


def test_corrupted_or_truncated_file_is_refused(tmp_path):
    store = ModelStore(tmp_path)
    directory = store.directory(store.publish(writer("abcdef")))
    (directory / "model.keras").write_text("abc")
    with pytest.raises(ModelStoreError, match="checksum mismatch for model.keras"):
        store.verify(directory)
    (directory / "model.keras").unlink()
    with pytest.raises(ModelStoreError, match="model.keras is listed.*missing"):
        store.verify(directory)
    (directory / CHECKSUM_FILE).unlink()
    with pytest.raises(ModelStoreError, match="not a complete model version"):
        store.verify(directory)


def test_failed_write_leaves_nothing_behind(tmp_path):
    store = ModelStore(tmp_path)

    def broken(directory):
        (directory / "model.keras").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.publish(broken)
    assert store.versions() == [] and store.current() is None
    assert list(tmp_path.iterdir()) == []


def test_keeps_the_newest_versions(tmp_path):
    store = ModelStore(tmp_path, keep=2)
    for payload in "abcd":
        store.publish(writer(payload))
    assert store.versions() == ["3", "4"]


def test_pruning_never_deletes_the_current_version(tmp_path):
    store = ModelStore(tmp_path, keep=1)
    store.publish(writer("a"))
    store.publish(writer("b"), make_current=False)
    store.publish(writer("c"), make_current=False)
    assert store.current() == "1" and store.versions() == ["1", "3"]


def test_version_numbers_skip_a_name_another_writer_took(tmp_path, monkeypatch):
    store = ModelStore(tmp_path)
    store.publish(writer("a"))
    monkeypatch.setattr(store, "versions", lambda: ["1"])  # listed before the other writer renamed "2" in
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "model.keras").write_text("the other writer's")
    assert store.publish(writer("b")) == "3"
    assert (tmp_path / "2" / "model.keras").read_text() == "the other writer's"


def test_resolve(tmp_path):
    store = ModelStore(tmp_path / "s")
    with pytest.raises(ModelStoreError, match="no model in .*stream-forecaster train"):
        store.resolve(None)
    store.publish(writer("a"))
    assert store.resolve(None) == (store.directory("1"), "1")
    assert store.resolve("1") == (store.directory("1"), "1")
    assert store.resolve(str(store.directory("1"))) == (store.directory("1"), "1")
    with pytest.raises(ModelStoreError, match="versions in .*: 1"):
        store.resolve("7")


def _publish_many(path, count):
    """Exits 1 if CURRENT is ever found older than a version just published (it went back), or a publish fails."""
    store = ModelStore(path, keep=1)
    for i in range(count):
        version = store.publish(writer(f"{path}-{i}"))
        if int(store.current()) < int(version):
            raise SystemExit(1)


@pytest.mark.integration  # starts processes
def test_two_publishers_at_once_leave_current_on_the_newest_complete_version(tmp_path):
    path = tmp_path / "store"
    ModelStore(path).publish(writer("first"))
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_publish_many, args=(path, 150)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0]  # no publish failed, CURRENT never went back
    store = ModelStore(path, keep=1)
    assert store.current() == store.versions()[-1] == "301"
    store.verify(store.directory(store.current()))


def test_a_version_number_is_never_used_twice_even_after_the_newest_were_deleted(tmp_path):
    store = ModelStore(tmp_path / "store")
    for payload in "abc":
        store.publish(writer(payload))
    shutil.rmtree(store.directory("3"))  # a bad model removed by hand; CURRENT still says 3
    assert store.publish(writer("d")) == "4"  # a daemon serving "3" must see a new number


def test_foreign_entries_in_the_store_are_neither_versions_nor_obstacles(tmp_path):
    store = ModelStore(tmp_path / "store")
    store.path.mkdir()
    (store.path / "2").write_text("a file, not a version")
    (store.path / "²").mkdir()  # a digit to str.isdigit, not a number
    (store.path / "20240101").mkdir()
    (store.path / "20240101" / "notes.txt").write_text("someone else's")
    assert store.versions() == []
    assert [store.publish(writer(p)) for p in "ab"] == ["1", "3"]
    assert store.versions() == ["1", "3"] and store.current() == "3"
    store.keep = 1
    store.publish(writer("c"))
    assert (store.path / "20240101" / "notes.txt").exists()  # never pruned
    (store.directory("4") / "metadata.json").write_text("[]")
    with pytest.raises(ModelStoreError, match="not an object"):
        store.metadata("4")


def test_a_store_path_that_is_a_file_is_refused_with_what_to_do(tmp_path):
    (tmp_path / "models").write_text("not a directory")
    store = ModelStore(tmp_path / "models")
    for call in (store.versions, store.current, lambda: store.resolve(None)):
        with pytest.raises(ModelStoreError, match="models is not a directory .*set model_store.path to a directory"):
            call()
    with pytest.raises(ModelStoreError, match="models is not writable \\(a file is in the way\\)"):
        store.check_writable()


def test_a_pointer_that_is_a_directory_is_refused_with_what_to_do(tmp_path):
    store = ModelStore(tmp_path / "store")
    store.publish(writer("a"))
    (store.path / POINTER_FILE).unlink()
    (store.path / POINTER_FILE).mkdir()
    says = "CURRENT is a directory, not the file naming the current version: remove it, .*models promote VERSION"
    for call in (store.current, store.previous, store.check_writable, lambda: store.set_current("1"),
                 lambda: store.publish(writer("b"))):
        with pytest.raises(ModelStoreError, match=says):
            call()
    assert store.versions() == ["1"] and sorted(p.name for p in store.path.iterdir()) == [".lock", "1", "CURRENT"]
    (store.path / POINTER_FILE).rmdir()  # as the message says: then promoting works again
    store.set_current("1")
    assert store.current() == "1"


def test_the_daemons_watcher_warns_of_a_pointer_that_is_a_directory_and_keeps_watching(tmp_path, caplog):
    from types import SimpleNamespace

    from stream_forecaster.service import ModelWatcher

    (tmp_path / POINTER_FILE).mkdir()
    watcher = ModelWatcher(ModelStore(tmp_path), SimpleNamespace(version="1"), 1.0, None, None)
    watcher.check()  # returns: a raise here would end hot swaps for good
    assert "cannot read the model store pointer" in caplog.text and "CURRENT is a directory" in caplog.text


def list_files(directory, *names):
    """Write the checksum list of ``names`` (their true checksums: only the names may be wrong)."""
    lines = [f"{hashlib.sha256((directory / name).read_bytes()).hexdigest()}  {name}" for name in names]
    (directory / CHECKSUM_FILE).write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("entry", ["absolute", "../outside.txt", "sub/../../outside.txt", "link.keras"])
def test_the_checksum_list_names_only_the_versions_own_files(tmp_path, entry):
    store = ModelStore(tmp_path / "store")
    directory = store.directory(store.publish(writer("a")))
    outside = tmp_path / "store" / "outside.txt"
    outside.write_text("someone else's")
    (directory / "sub").mkdir()
    (directory / "link.keras").symlink_to(outside)
    entry = str(outside) if entry == "absolute" else entry
    list_files(directory, "model.keras", "metadata.json", entry)
    with pytest.raises(ModelStoreError) as info:
        store.verify(directory)
    assert str(info.value).startswith(f"{directory}: {CHECKSUM_FILE} lists {entry!r}, which is not a file of this "
                                      "model version")


def test_the_checksum_list_must_name_the_model(tmp_path):
    store = ModelStore(tmp_path / "store")
    directory = store.directory(store.publish(writer("a")))
    list_files(directory, "metadata.json")
    with pytest.raises(ModelStoreError, match=f"{directory}: {CHECKSUM_FILE} does not list model.keras"):
        store.verify(directory)
    (directory / "sub").mkdir()
    (directory / "sub" / "notes.txt").write_text("inside, in a folder of the version")
    list_files(directory, "./model.keras", "sub/notes.txt")
    assert store.verify(directory) == directory


def test_metadata_round_trips_and_keeps_keys_it_does_not_know():
    raw = {"features": ["a", "b"], "targets": ["a"], "sequence_length": 6, "normalization": {"method": "window"},
           "layers": [2, 8, 1], "min_step": [0.5], "created": "2026-01-01T00:00:00+00:00", "from_a_later_release": 1}
    meta = ModelMetadata.from_dict(raw)
    assert (meta.features, meta.layers, meta.min_step, meta.method) == (("a", "b"), (2, 8, 1), (0.5,), "window")
    assert meta.extra == {"from_a_later_release": 1}
    written = meta.to_dict()
    assert {k: written[k] for k in raw} == raw and ModelMetadata.from_dict(written) == meta
    assert ModelMetadata.from_dict({**raw, "normalization": {}}).method == "standardize"  # before methods were recorded
    with pytest.raises(AttributeError):
        meta.features = ("c",)  # frozen: a change is a new value (replace)
    assert meta.replace(gate={"decision": "published"}).to_dict()["gate"] == {"decision": "published"}


@pytest.mark.parametrize("raw, why", [
    ([], "not an object"),
    ({"features": ["a"], "targets": ["a"], "normalization": {}}, "lacks sequence_length"),
    ({"features": "a", "targets": ["a"], "sequence_length": 4, "normalization": {}}, "features is not a list"),
    ({"features": ["a"], "targets": ["a"], "sequence_length": "x", "normalization": {}}, "invalid literal"),
    ({"features": ["a"], "targets": ["a"], "sequence_length": 4, "normalization": []},
     "normalization is not an object"),
])
def test_metadata_that_is_not_a_models_is_refused_saying_why(raw, why):
    with pytest.raises(ValueError, match=why):
        ModelMetadata.from_dict(raw)


def test_metadata_says_how_an_interface_differs():
    meta = ModelMetadata.from_dict({"features": ["a", "b"], "targets": ["a"], "sequence_length": 6,
                                    "normalization": {}})
    assert meta.mismatch(["a", "b"], ("a",), 6) is None
    assert meta.mismatch(["a"], ["a"], 6) == "the model reads a, b -> a with windows of 6, not a -> a with windows of 6"


def test_load_checks_checksums_and_the_interface_before_building_the_model(tmp_path):
    store = ModelStore(tmp_path)
    store.publish(writer("a"))
    with pytest.raises(IncompatibleModel, match="model version 1: the model reads a -> a with windows of 4, not b"):
        store.load("1", expect=(["b"], ["b"], 4))
    (store.directory("1") / "model.keras").write_text("changed")
    with pytest.raises(ModelStoreError, match="checksum mismatch for model.keras"):
        store.load("1", expect=(["a"], ["a"], 4))
    with pytest.raises(ModelStoreError, match="no model version or directory '7'"):
        store.load("7")


def test_the_shadow_pointer_is_set_atomically_cleared_and_spared_by_pruning(tmp_path):
    store = ModelStore(tmp_path, keep=1)
    store.publish(writer("a"))
    assert store.shadow() is None
    store.set_shadow("1")
    assert store.shadow() == "1" and (tmp_path / SHADOW_FILE).read_text() == "1\n"
    store.publish(writer("b"))
    store.publish(writer("c"))
    assert store.versions() == ["1", "3"] and store.current() == "3"  # the shadow version is kept, as the current
    (store.directory("1") / "model.keras").write_text("changed")
    with pytest.raises(ModelStoreError, match="checksum mismatch"):
        store.set_shadow("1")  # only a complete version is pointed at
    store.set_shadow(None)
    store.set_shadow(None)  # already none: nothing to do
    assert store.shadow() is None and not (tmp_path / SHADOW_FILE).exists() and store.current() == "3"
    (tmp_path / SHADOW_FILE).write_text("latest\n")
    with pytest.raises(ModelStoreError, match="SHADOW is damaged"):
        store.shadow()


class MemoryLog:
    """A compacted topic in memory (:class:`~stream_forecaster.state_topic.StateLog`), for the topic store's logic.

    ``before_append(records)`` runs first on each append: another publisher's turn."""

    def __init__(self):
        self.records, self.topics, self.before_append = [], {}, None

    def partitions(self, topic):
        return self.topics.get(topic, 0)

    def create_compacted(self, topic, partitions):
        self.topics[topic] = partitions

    def append(self, records):
        if self.before_append is not None:
            hook, self.before_append = self.before_append, None
            hook(records)
        from stream_forecaster.testing import FakeRecord

        first = len(self.records)
        for r in records:
            self.records.append(FakeRecord(r.topic, 0, len(self.records), r.key, r.value, self.now_ms()))
        return first

    @staticmethod
    def now_ms():
        import time

        return int(time.time() * 1000)

    def offsets(self, topic, partition):
        return 0, len(self.records)

    def read(self, topic, partition, start, end):
        return iter(self.records[start:end])

    def keys(self):
        """The keys a compaction would keep."""
        latest = {r.key: r.value for r in self.records}
        return sorted(k.decode() for k, v in latest.items() if v is not None)


class MemoryLogs:
    def __init__(self, log):
        self.log = log

    def reader(self):
        return self.log

    @contextlib.contextmanager
    def writer(self):
        yield self.log


def memory_store(path, log, keep=5):
    from stream_forecaster.model_topic import TopicModelStore

    return TopicModelStore(path, keep, "models", MemoryLogs(log))


def test_two_publishers_choosing_one_number_keep_the_first_manifest_and_the_other_takes_the_next(tmp_path):
    log = MemoryLog()
    first, second = memory_store(tmp_path / "first", log), memory_store(tmp_path / "second", log)
    assert first.publish(writer("a")) == "1"

    def the_other_publisher_first(records):
        if records[0].key.startswith(b"manifest/"):
            assert second.publish(writer("c")) == "2"  # it read the topic before this manifest was written

    log.before_append = lambda records: setattr(log, "before_append", the_other_publisher_first)  # after the chunks
    assert first.publish(writer("b")) == "3"
    reader = memory_store(tmp_path / "reader", log)
    assert reader.versions() == ["1", "2", "3"] and reader.current() == "3"
    assert [reader.metadata(v).features for v in ("2", "3")] == [("c",), ("b",)]
    assert len([k for k in log.keys() if k.startswith("manifest/")]) == 3  # the lost claim was tombstoned


def test_an_abandoned_upload_is_invisible_and_tombstoned_an_hour_later(tmp_path, monkeypatch):
    log = MemoryLog()
    store = memory_store(tmp_path / "cache", log)
    store.publish(writer("a"))
    log.append([OutRecord("models", b"chunk/dead/model.keras/0", b"half")])  # a publisher that died
    assert store.versions() == ["1"] and memory_store(tmp_path / "other", log).versions() == ["1"]
    store.publish(writer("b"))
    assert "chunk/dead/model.keras/0" in log.keys()  # may still be on its way to a manifest
    monkeypatch.setattr("stream_forecaster.model_topic._STALE_UPLOAD_S", -1)
    store.publish(writer("c"))
    assert "chunk/dead/model.keras/0" not in log.keys() and store.versions() == ["1", "2", "3"]


def test_the_topic_store_never_caches_into_a_directory_store(tmp_path):
    ModelStore(tmp_path / "models").publish(writer("a"))
    store = memory_store(tmp_path / "models", MemoryLog())
    with pytest.raises(ModelStoreError, match="holds a directory model store .*set it to another directory"):
        store.publish(writer("b"))
    assert ModelStore(tmp_path / "models").versions() == ["1"]


def test_a_topic_store_whose_broker_is_away_says_so_and_the_watcher_waits(tmp_path, caplog):
    from types import SimpleNamespace

    from stream_forecaster.errors import BrokerUnavailable
    from stream_forecaster.service import ModelWatcher

    class Away(MemoryLogs):
        def reader(self):
            raise BrokerUnavailable("cannot set up the state reader: no broker (kafka.bootstrap_servers ...)")

    store = memory_store(tmp_path, MemoryLog())
    store._logs = Away(None)
    with pytest.raises(BrokerUnavailable, match="model store topic models: cannot read it: cannot set up"):
        store.current()
    watcher = ModelWatcher(store, SimpleNamespace(version="1"), 1.0, None, None)
    watcher.check()  # a warning; the next poll tries again
    assert "cannot read the model store pointer: model store topic models" in caplog.text


def test_a_topic_made_anew_is_read_anew(tmp_path):
    log = MemoryLog()
    store = memory_store(tmp_path / "cache", log)
    store.publish(writer("a"))
    log.records.clear()  # a development broker restarted: everything is gone
    assert store.current() is None and store.versions() == []
    assert store.publish(writer("b")) == "2" and store.metadata("2").features == ("b",)  # "1" may still serve
