"""The model store in a compacted Kafka topic, for daemons that share no disk.

Records, all in partition 0, keys as text::

    chunk/<upload>/<file>/<k>   the k-th piece (at most CHUNK bytes) of one file of an upload
    manifest/<n>/<upload>       JSON: version n is that upload's files (name, bytes, chunks, sha256)
    CURRENT                     b"<n>": the version being served
    SHADOW                      b"<n>": the version to evaluate beside it (a tombstone: none)

A publisher writes the chunks, then the manifest, then ``CURRENT``, each once
the previous is acknowledged, so a reader sees a complete version or none: a
version is a manifest with every chunk it lists. Two publishers may choose the
same number; the manifest with the lower offset is that version for every
reader (the keys differ, so compaction keeps both until the other publisher
tombstones its own and takes the next number). Pruning writes tombstones,
manifests before chunks. An upload left without a manifest (a publisher that
died) is tombstoned an hour later.

Versions are materialised in ``model_store.path``, a cache, and checked there by
:meth:`ModelStore.verify`: loading, the compatibility check and warm-up are the
directory store's. The Kafka calls are :class:`~.state_topic.StateLog`'s, through
the client ``kafka.client`` names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager, Iterator, NamedTuple, Protocol

from .clients import kafka_client
from .errors import BrokerUnavailable
from .messages import OutRecord
from .state_topic import StateLog, StateLogError
from .store import (
    _TMP_PREFIX,
    CHECKSUM_FILE,
    POINTER_FILE,
    SHADOW_FILE,
    ModelStore,
    ModelStoreError,
    _fsync,
    _is_number,
    _sha256,
)

if TYPE_CHECKING:
    from .config import Config, KafkaConfig

__all__ = ["CHUNK", "KafkaModelLogs", "ModelLogs", "ModelTopicUnavailable", "TopicModelStore"]

CHUNK = 512 * 1024  # bytes a record: well under the brokers' default limit of 1 MiB
_STALE_UPLOAD_S = 3600  # an upload without a manifest this old was abandoned
_CLAIM_TRIES = 10


class ModelTopicUnavailable(ModelStoreError, BrokerUnavailable):
    """The model store's topic cannot be read or written now; the daemon tries again at its next poll."""


class ModelLogs(Protocol):
    """The topic store's Kafka: one reader for the store's life, a writer (with a producer) per change."""

    def reader(self) -> StateLog: ...

    def writer(self) -> ContextManager[StateLog]: ...


class KafkaModelLogs:
    """:class:`ModelLogs` through the client ``kafka.client`` names; only its module is imported."""

    def __init__(self, config: KafkaConfig):
        self.config = config
        self._reader: StateLog | None = None

    def reader(self) -> StateLog:
        if self._reader is None:
            self._reader = kafka_client(self.config).state_log(self.config, None)  # reads only
        return self._reader

    @contextlib.contextmanager
    def writer(self) -> Iterator[StateLog]:
        client = kafka_client(self.config)
        sink = client.sink(self.config, "stream-forecaster-models")
        try:
            yield client.state_log(self.config, sink)
        finally:
            sink.close()


class _Entry(NamedTuple):
    offset: int
    value: bytes
    timestamp: int  # ms


class _File(NamedTuple):
    name: str
    size: int
    chunks: int
    sha256: str


class _Manifest(NamedTuple):
    version: str
    upload: str
    key: str
    files: tuple[_File, ...]


class TopicModelStore(ModelStore):
    """:class:`ModelStore` whose versions and pointers are records of a compacted topic; ``path`` caches versions.

    Each call that looks at the store reads what was appended since the last
    one; nothing touches Kafka before that (a daemon starts without a broker).
    """

    def __init__(self, path: str | os.PathLike, keep: int, topic: str, logs: ModelLogs, servers: str = ""):
        super().__init__(path, keep)
        self.topic, self._logs, self._servers = topic, logs, servers
        self._view: dict[str, _Entry] = {}  # each key's latest record
        self._next = 0  # the next offset to read
        self._exists = False

    @classmethod
    def open(cls, config: Config) -> "TopicModelStore":
        s, k = config.model_store, config.kafka
        if s.topic is None:
            raise ValueError("model_store.topic is not set")
        return cls(s.path, s.keep, s.topic, KafkaModelLogs(k), ",".join(k.bootstrap_servers))

    # reading

    def versions(self) -> list[str]:
        """Complete versions in the topic, oldest first."""
        self._refresh()
        return self._versions()

    def current(self) -> str | None:
        self._refresh()
        return self._pointer(POINTER_FILE)

    def shadow(self) -> str | None:
        self._refresh()
        return self._pointer(SHADOW_FILE)

    def resolve(self, version_or_path: str | None = None) -> tuple[Path, str]:
        """Directory and version name for a version number (materialised in the cache), a directory, or None
        (the current version)."""
        if version_or_path is None:
            version = self.current()
            if version is None:
                raise ModelStoreError(f"no model in the topic {self.topic}: train one first (stream-forecaster "
                                      "train) or pass --model VERSION_OR_PATH")
            return self._materialise(self._manifest(version)), version
        name = str(version_or_path)
        if _is_number(name):
            manifest = self._find(name)
            if manifest is not None:
                return self._materialise(manifest), manifest.version
        elif Path(name).is_dir():
            return Path(name), Path(name).name
        raise ModelStoreError(f"no model version or directory {name!r}; versions in the topic {self.topic}: "
                              f"{', '.join(self._versions()) or 'none'}")

    def check_writable(self) -> None:
        """Raise :class:`ModelStoreError` unless the cache can be written and the topic reached (it is created,
        compacted, if absent)."""
        super().check_writable()  # the cache; its current() reaches the broker
        self._check_cache()
        with self._kafka("create the topic"):
            self._ensure_topic()

    # writing

    def publish(self, write: Callable[[Path], None], make_current: bool = True) -> str:
        """Write a version with ``write(directory)``, publish it to the topic, return its number."""
        self._check_cache()
        with self._writing() as tmp:
            self._write_version(write, tmp)
            upload = uuid.uuid4().hex
            files, chunks = self._chunks(tmp, upload)
            with self._kafka("publish a model version"), self._logs.writer() as log:
                self._ensure_topic()
                self._append(log, chunks)
                version = self._claim(log, upload, files)
                current = self._pointed(POINTER_FILE)
                # a newer version a concurrent publisher made current stays current (a damaged pointer is repaired)
                if make_current and (current is None or int(current) < int(version)):
                    self._append(log, [self._record(POINTER_FILE, version.encode())])
                self._prune_topic(log)
            with contextlib.suppress(OSError):  # published: a cache that cannot take it reads it back when needed
                self._move_into_cache(tmp, version)
        return version

    def set_current(self, version: str) -> None:
        """Point ``CURRENT`` at ``version``, once it was read back whole and verified."""
        self._point(POINTER_FILE, version)

    def set_shadow(self, version: str | None) -> None:
        """Point ``SHADOW`` at ``version`` (verified first); None writes its tombstone."""
        self._point(SHADOW_FILE, version)

    # the topic

    @contextlib.contextmanager
    def _kafka(self, what: str) -> Iterator[None]:
        """Any failure of a Kafka call as one :class:`ModelTopicUnavailable` line saying what to check."""
        try:
            yield
        except ModelStoreError:
            raise
        except BrokerUnavailable as exc:
            raise ModelTopicUnavailable(f"model store topic {self.topic}: cannot {what}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 (each client raises its own kinds; all mean the same here)
            raise ModelTopicUnavailable(
                f"model store topic {self.topic}: cannot {what} ({type(exc).__name__}: {exc}); is a broker running "
                f"at {self._servers or 'kafka.bootstrap_servers'}? Try again, or check the kafka section") from None

    def _ensure_topic(self) -> None:
        log = self._logs.reader()
        if self._exists or log.partitions(self.topic):
            self._exists = True
            return
        try:
            log.create_compacted(self.topic, 1)
        except StateLogError as exc:
            raise ModelStoreError(f"cannot create the model store topic {self.topic} ({exc}): create it "
                                  "(cleanup.policy=compact, 1 partition) or name another in model_store.topic"
                                  ) from None
        self._exists = True

    def _refresh(self, until: int = 0) -> None:
        """Read the records appended since the last look (at least up to offset ``until``)."""
        with self._kafka("read it"):
            log = self._logs.reader()
            if not self._exists:
                if not log.partitions(self.topic):
                    return  # no topic yet: an empty store
                self._exists = True
            first, end = log.offsets(self.topic, 0)
            # records removed before they were read (deleted), or a topic made anew (a broker that lost its
            # state): what was read says nothing any more, so read it all again
            if first > self._next or end < self._next:
                self._view, self._next = {}, first
            end = max(end, until)
            if end > self._next:
                for record in log.read(self.topic, 0, self._next, end):
                    key = (record.key or b"").decode("utf-8", "replace")
                    if record.value is None:
                        self._view.pop(key, None)
                    else:
                        self._view[key] = _Entry(record.offset, record.value, record.timestamp)
                self._next = end

    def _append(self, log: StateLog, records: list[OutRecord]) -> int:
        """Append and wait for the acknowledgements; the first record's offset."""
        try:
            return log.append(records)
        except StateLogError as exc:
            raise ModelTopicUnavailable(f"model store topic {self.topic}: a write was not acknowledged ({exc}); "
                                        "nothing was made current: try again") from None

    def _record(self, key: str, value: bytes | None) -> OutRecord:
        return OutRecord(self.topic, key.encode(), value, partition=0)

    # what the records say

    def _pointer(self, name: str) -> str | None:
        entry = self._view.get(name)
        if entry is None:
            return None
        version = entry.value.decode("utf-8", "replace").strip()
        if version and not _is_number(version):
            raise ModelStoreError(f"{name} in the topic {self.topic} is damaged: {version[:40]!r} is not a version "
                                  "number; set it again (stream-forecaster models promote VERSION)")
        return version or None

    def _pointed(self, name: str) -> str | None:
        """The version a pointer names; None for none or a damaged one (which a publish overwrites)."""
        try:
            return self._pointer(name)
        except ModelStoreError:
            return None

    def _winners(self) -> dict[str, tuple[str, _Entry]]:
        """Each version number's first manifest in the log, as ``(key, record)``."""
        found: dict[str, tuple[str, _Entry]] = {}
        for key, entry in self._view.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "manifest" and _is_number(parts[1]):
                number = str(int(parts[1]))
                if number not in found or entry.offset < found[number][1].offset:
                    found[number] = (key, entry)
        return found

    def _parse(self, version: str, key: str, entry: _Entry) -> _Manifest | None:
        """The manifest if it is readable and every chunk it lists is there, whole; else None (not a version)."""
        try:
            raw = json.loads(entry.value)
            upload = key.split("/")[2]
            files = tuple(_File(str(f["name"]), int(f["bytes"]), int(f["chunks"]), str(f["sha256"]))
                          for f in raw["files"])
        except (ValueError, TypeError, KeyError, IndexError):
            return None
        for f in files:
            if not _plain_name(f.name):
                return None
            pieces = [self._view.get(_chunk_key(upload, f.name, k)) for k in range(f.chunks)]
            if any(p is None for p in pieces) or sum(len(p.value) for p in pieces if p is not None) != f.size:
                return None
        return _Manifest(version, upload, key, files)

    def _manifests(self) -> dict[str, _Manifest]:
        found = {v: self._parse(v, key, entry) for v, (key, entry) in self._winners().items()}
        return {v: m for v, m in found.items() if m is not None}

    def _versions(self) -> list[str]:
        return sorted(self._manifests(), key=int)

    def _find(self, version: str) -> _Manifest | None:
        """The complete version ``version``, read again from the topic if not known yet."""
        version = str(int(version))
        found = self._manifests().get(version)
        if found is None:
            self._refresh()
            found = self._manifests().get(version)
        return found

    def _manifest(self, version: str) -> _Manifest:
        found = self._find(version)
        if found is None:
            raise ModelStoreError(f"model version {version} is not a complete version in the topic {self.topic} "
                                  f"(versions: {', '.join(self._versions()) or 'none'}); promote another")
        return found

    def _next_number(self) -> int:
        """One more than any number the topic or the cache names: a number is never used twice (the cache's count
        for a topic made anew, whose old versions daemons may still serve)."""
        numbers = [int(key.split("/")[1]) for key in self._view
                   if key.startswith("manifest/") and _is_number(key.split("/")[1])]
        with contextlib.suppress(OSError):
            numbers += [int(p.name) for p in self.path.iterdir() if _is_number(p.name)]
        for name in (POINTER_FILE, SHADOW_FILE):
            pointed = self._view.get(name)
            text = pointed.value.decode("utf-8", "replace").strip() if pointed else ""
            numbers += [int(text)] if _is_number(text) else []
        return max([0, *numbers]) + 1

    # writing, step by step

    def _chunks(self, directory: Path, upload: str) -> tuple[list[_File], list[OutRecord]]:
        files, records = [], []
        for path in sorted(p for p in directory.iterdir() if p.is_file()):
            data = path.read_bytes()
            pieces = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
            files.append(_File(path.name, len(data), len(pieces), hashlib.sha256(data).hexdigest()))
            records += [self._record(_chunk_key(upload, path.name, k), piece) for k, piece in enumerate(pieces)]
        return files, records

    def _claim(self, log: StateLog, upload: str, files: list[_File]) -> str:
        """Write the manifest under the next number; another publisher's earlier manifest for it wins, and this
        one moves on to the next number."""
        manifest = json.dumps({"files": [{"name": f.name, "bytes": f.size, "chunks": f.chunks, "sha256": f.sha256}
                                         for f in files]}).encode()
        for _ in range(_CLAIM_TRIES):
            self._refresh()
            version = str(self._next_number())
            key = f"manifest/{version}/{upload}"
            offset = self._append(log, [self._record(key, manifest)])
            self._refresh(until=offset + 1)
            if self._winners()[version][0] == key:
                return version
            self._append(log, [self._record(key, None)])
        raise ModelTopicUnavailable(f"model store topic {self.topic}: other publishers took {_CLAIM_TRIES} version "
                                    "numbers in a row; nothing was published: try again")

    def _point(self, name: str, version: str | None) -> None:
        if version is not None:
            self._materialise(self._manifest(str(version)))  # read back whole and verified, as a directory is
        with self._kafka(f"set {name}"), self._logs.writer() as log:
            self._ensure_topic()
            self._append(log, [self._record(name, None if version is None else str(int(version)).encode())])

    def _prune_topic(self, log: StateLog) -> None:
        """Tombstones for the versions beyond ``keep`` (never the current or shadow one), manifests that lost
        their number, and abandoned uploads (as the view was when the version was claimed: anything newer is
        for the next publish to prune)."""
        pointed = {self._pointed(POINTER_FILE), self._pointed(SHADOW_FILE)}
        manifests = self._manifests()
        old = {v for v in sorted(manifests, key=int)[: -self.keep] if v not in pointed}
        winners = {key for v, (key, _) in self._winners().items() if v not in old}
        kept = {key.split("/")[2] for key in winners}
        dropped = {manifests[v].upload for v in old}
        stale = (time.time() - _STALE_UPLOAD_S) * 1000
        first, rest = [], []
        for key, entry in self._view.items():
            parts = key.split("/")
            if parts[0] == "manifest" and key not in winners:
                first.append(key)
            elif parts[0] == "chunk" and len(parts) > 1 and parts[1] not in kept \
                    and (parts[1] in dropped or 0 <= entry.timestamp < stale):
                rest.append(key)
        if first or rest:
            self._append(log, [self._record(key, None) for key in first + rest])
        for version in old:
            shutil.rmtree(self.directory(version), ignore_errors=True)

    # the cache

    def _check_cache(self) -> None:
        if (self.path / POINTER_FILE).exists():
            # its versions' numbers are not the topic's: serving one for the other would be wrong
            raise ModelStoreError(f"{self.path} holds a directory model store ({POINTER_FILE} is there); with "
                                  "model_store.topic, model_store.path is the cache of the topic's versions: "
                                  "set it to another directory")

    def _materialise(self, manifest: _Manifest) -> Path:
        """The version's directory in the cache, written from its records unless already there intact."""
        self._check_cache()
        target = self.directory(manifest.version)
        listing = next((f for f in manifest.files if f.name == CHECKSUM_FILE), None)
        if listing is None:
            raise ModelStoreError(f"model version {manifest.version} in the topic {self.topic} has no "
                                  f"{CHECKSUM_FILE}: not a complete model version; promote another")
        with contextlib.suppress(OSError, ModelStoreError):
            if _sha256(target / CHECKSUM_FILE) == listing.sha256 and self.verify(target):
                return target
        with self._writing() as tmp:
            for f in manifest.files:
                data = b"".join(self._view[_chunk_key(manifest.upload, f.name, k)].value for k in range(f.chunks))
                (tmp / f.name).write_bytes(data)
                _fsync(tmp / f.name)
            # the manifest vouches for the checksum list, which vouches for every file
            if _sha256(tmp / CHECKSUM_FILE) != listing.sha256:
                raise ModelStoreError(f"model version {manifest.version} in the topic {self.topic} is damaged: "
                                      f"{CHECKSUM_FILE} does not match its manifest")
            try:
                self.verify(tmp)
            except ModelStoreError as exc:
                raise ModelStoreError(f"model version {manifest.version} in the topic {self.topic} is damaged: "
                                      f"{str(exc).removeprefix(f'{tmp}: ')}") from None
            self._move_into_cache(tmp, manifest.version)
            self._trim_cache()
        return target

    def _trim_cache(self) -> None:
        """Remove the cached versions the topic no longer has (pruned by whichever publisher)."""
        versions = set(self._manifests())
        for path in self.path.iterdir():
            if _is_number(path.name) and path.name not in versions and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)

    def _move_into_cache(self, tmp: Path, version: str) -> None:
        """Rename ``tmp`` into place as ``version``, replacing what the cache held under that number."""
        target = self.directory(version)
        if target.exists():
            old = self.path / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
            os.rename(target, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, target)
        _fsync(self.path)


def _chunk_key(upload: str, name: str, k: int) -> str:
    return f"chunk/{upload}/{name}/{k}"


def _plain_name(name: str) -> bool:
    """A file name of the version itself: no directory, nothing that leads out of it."""
    return bool(name) and "/" not in name and "\\" not in name and "\0" not in name and name not in (".", "..") \
        and not name.startswith(_TMP_PREFIX)
