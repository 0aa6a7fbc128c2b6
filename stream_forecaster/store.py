"""The model store: numbered, checksummed, atomically published model versions.

Layout (as TensorFlow Serving expects numbered version directories)::

    <store>/1/model.keras
    <store>/1/metadata.json
    <store>/1/checksums.sha256     # `sha256sum -c` can check it too
    <store>/CURRENT                # the version being served, e.g. "1"
    <store>/SHADOW                 # optional: a version to evaluate beside the served one

A version is written into a hidden temporary directory, synced, and renamed into
place; ``CURRENT`` is replaced with ``os.replace``. Readers therefore see a
complete version or none, even after a crash. Writers (two retrainers, an
operator's ``train`` or ``rollback`` beside them) take turns on an advisory lock
file, so ``CURRENT`` never names a version being pruned nor goes back to an older
one by a race. This module knows files, not
models: callers pass a function that writes the model into a directory, which
keeps TensorFlow out of the ``models`` commands. :meth:`ModelStore.load` alone
imports the model module, when a version is to be served or trained on.

:func:`open_store` opens the store the configuration names: this directory, or
with ``model_store.topic`` a compacted Kafka topic (:mod:`.model_topic`, whose
versions are cached in ``model_store.path``).

:class:`ModelMetadata` is what a version says about its model (columns, window,
normalisation, calibration, provenance): written by training, read by the
daemon, the retrainer and ``models``, one type for all of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from .errors import UserError

if TYPE_CHECKING:
    from .config import Config
    from .model import Forecaster

__all__ = ["CHECKSUM_FILE", "METADATA_FILE", "MODEL_FILE", "POINTER_FILE", "SHADOW_FILE", "IncompatibleModel",
           "ModelMetadata", "ModelStore", "ModelStoreError", "open_store"]

CHECKSUM_FILE = "checksums.sha256"
METADATA_FILE = "metadata.json"
MODEL_FILE = "model.keras"
POINTER_FILE = "CURRENT"
SHADOW_FILE = "SHADOW"
_LOCK_FILE = ".lock"
_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 3600


class ModelStoreError(UserError, RuntimeError):
    """A missing, incomplete or corrupted model version."""


class IncompatibleModel(ModelStoreError):
    """A usable model version that reads other columns or windows than asked for."""


@dataclass(frozen=True)
class ModelMetadata:
    """What a model version says about its model; ``metadata.json`` of the version.

    The first three fields are the model's interface: a model is only ever
    swapped for one that agrees on them. Keys this release does not know (a
    newer one wrote them) are kept in ``extra`` and written back unchanged.
    """

    features: tuple[str, ...]
    targets: tuple[str, ...]
    sequence_length: int
    normalization: Mapping[str, Any]  # {"method": ...} and, for global ones, the scalers' mean and scale
    layers: tuple[int, ...] | None = None
    predict: str = "level"  # or "change": the output is the step from the last reading
    scaled_units: bool = False  # min_step and the interval's offsets are in units of each forecast's scale
    min_step: tuple[float, ...] | None = None
    intervals: Mapping[str, Any] | None = None  # AdaptiveInterval.to_dict(), calibrated on the validation slice
    anomaly: Mapping[str, Any] | None = None  # the anomaly band: AdaptiveInterval.to_dict() and the residuals' sigma
    created: str | None = None  # ISO-8601
    data: Mapping[str, Any] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)
    test: Mapping[str, Any] = field(default_factory=dict)
    gate: Mapping[str, Any] | None = None  # the retrainer's decision; None for a version trained by hand
    libraries: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        """The normalisation method (versions written before methods were recorded standardised)."""
        return self.normalization.get("method") or "standardize"

    def mismatch(self, features: Sequence[str], targets: Sequence[str], sequence_length: int) -> str | None:
        """How this model's interface differs from the one given, or None if they agree."""
        have = (tuple(self.features), tuple(self.targets), self.sequence_length)
        wanted = (tuple(features), tuple(targets), int(sequence_length))
        if have == wanted:
            return None
        return (f"the model reads {', '.join(have[0])} -> {', '.join(have[1])} with windows of {have[2]}, "
                f"not {', '.join(wanted[0])} -> {', '.join(wanted[1])} with windows of {wanted[2]}")

    def replace(self, **changes) -> "ModelMetadata":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        known = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        known = {k: list(v) if isinstance(v, tuple) else v for k, v in known.items() if v is not None}
        return {**self.extra, **known}

    @classmethod
    def from_dict(cls, raw: object) -> "ModelMetadata":
        """Read ``metadata.json``'s object; ``ValueError`` saying what is wrong with it."""
        if not isinstance(raw, dict):
            raise ValueError("metadata.json is not an object")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        missing = [k for k in ("features", "targets", "sequence_length", "normalization") if k not in raw]
        if missing:
            raise ValueError(f"metadata.json lacks {', '.join(missing)}")
        values = {k: v for k, v in raw.items() if k in names}
        try:
            for key in ("features", "targets"):
                values[key] = tuple(str(c) for c in _list(values[key], key))
            values["sequence_length"] = int(values["sequence_length"])
            for key in ("layers", "min_step"):
                if values.get(key) is not None:
                    values[key] = tuple((int if key == "layers" else float)(v) for v in _list(values[key], key))
        except (TypeError, ValueError, ArithmeticError) as exc:  # ArithmeticError: int() of 1e999
            raise ValueError(f"metadata.json: {exc}") from None
        if values.get("created") is not None and not isinstance(values["created"], str):
            raise ValueError("metadata.json: created is not an ISO-8601 string")
        if not isinstance(values["normalization"], dict):
            raise ValueError("metadata.json: normalization is not an object")
        return cls(**values, extra={k: v for k, v in raw.items() if k not in names})


def _list(value: object, key: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{key} is not a list")
    return value


class ModelStore:
    def __init__(self, path: str | os.PathLike, keep: int = 5):
        self.path = Path(path)
        self.keep = keep

    def versions(self) -> list[str]:
        """Complete versions, oldest first (a numbered directory of someone else's is not one)."""
        try:
            entries = list(self.path.iterdir())
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            raise self._not_a_directory() from None
        except OSError as exc:
            raise ModelStoreError(f"cannot read the model store {self.path}: {exc.strerror or exc}") from None
        return sorted((p.name for p in entries if _is_number(p.name) and (p / CHECKSUM_FILE).is_file()), key=int)

    def current(self) -> str | None:
        """The version ``CURRENT`` points at, or None for an empty store."""
        return self._read_pointer(POINTER_FILE)

    def shadow(self) -> str | None:
        """The version ``SHADOW`` points at (to be evaluated beside the current one), or None."""
        return self._read_pointer(SHADOW_FILE)

    def _read_pointer(self, name: str) -> str | None:
        pointer = self.path / name
        try:
            version = pointer.read_text().strip()
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            raise self._not_a_directory() from None
        except IsADirectoryError:
            raise ModelStoreError(self._pointer_is_a_directory(name)) from None
        except OSError as exc:
            raise ModelStoreError(f"cannot read {pointer}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ModelStoreError(f"{pointer} is damaged: not text") from None
        if version and not _is_number(version):
            raise ModelStoreError(f"{pointer} is damaged: {version[:40]!r} is not a version number")
        return version or None

    def _not_a_directory(self) -> ModelStoreError:
        return ModelStoreError(f"model store {self.path} is not a directory (a file is in the way): "
                               "set model_store.path to a directory; it is created if absent")

    def _pointer_is_a_directory(self, name: str = POINTER_FILE) -> str:
        # os.replace cannot put the pointer file over a directory, so promoting cannot repair this
        if name != POINTER_FILE:
            return f"{self.path / name} is a directory, not the file naming a version: remove it"
        return (f"{self.path / POINTER_FILE} is a directory, not the file naming the current version: remove it, "
                "then choose the version to serve with `stream-forecaster models promote VERSION`")

    def directory(self, version: str) -> Path:
        """The directory of a version number; anything else is refused, so no name leaves the store."""
        if not _is_number(str(version)):
            raise ModelStoreError(f"{str(version)[:40]!r} is not a model version (versions are numbers)")
        return self.path / str(version)

    def metadata(self, version_or_path: str) -> ModelMetadata:
        """The metadata of a version (number or directory), without loading its model."""
        directory, version = self.resolve(version_or_path)
        try:
            return ModelMetadata.from_dict(json.loads((directory / METADATA_FILE).read_text()))
        except (OSError, ValueError) as exc:
            raise ModelStoreError(f"model version {version} in {self.path}: unreadable metadata ({exc})") from None

    def load(self, version_or_path: str | None = None, *,
             expect: tuple[Sequence[str], Sequence[str], int] | None = None, jit_compile: bool = True) -> Forecaster:
        """The forecaster of a version (number or directory; None: the current one), checked and loaded.

        Its checksums are verified first; with ``expect`` (features, targets,
        window length) a model with another interface raises
        :class:`IncompatibleModel` before TensorFlow builds it.
        """
        directory, version = self.resolve(version_or_path)
        self.verify(directory)
        if expect is not None:
            mismatch = self.metadata(str(directory)).mismatch(*expect)
            if mismatch:
                raise IncompatibleModel(f"model version {version}: {mismatch}")
        from .model import Forecaster  # noqa: PLC0415 (TensorFlow loads only once a model is used)

        return Forecaster.load(directory, version, jit_compile)

    def resolve(self, version_or_path: str | None = None) -> tuple[Path, str]:
        """Directory and version name for a version number, a directory, or None (current)."""
        if version_or_path is None:
            version = self.current()
            if version is None:
                raise ModelStoreError(
                    f"no model in {self.path}: train one first (stream-forecaster train) "
                    "or pass --model VERSION_OR_PATH"
                )
            return self.directory(version), version
        candidate = Path(version_or_path)
        if _is_number(str(version_or_path)) and self.directory(version_or_path).is_dir():
            return self.directory(version_or_path), str(version_or_path)
        if candidate.is_dir():
            return candidate, candidate.name
        raise ModelStoreError(
            f"no model version or directory {version_or_path!r}; versions in {self.path}: "
            f"{', '.join(self.versions()) or 'none'}"
        )

    def verify(self, directory: str | os.PathLike) -> Path:
        """Check every file against the checksum list; raise :class:`ModelStoreError` if any differs."""
        directory = Path(directory)
        try:
            listing = (directory / CHECKSUM_FILE).read_text().splitlines()
        except OSError:
            raise ModelStoreError(f"{directory}: no {CHECKSUM_FILE}; not a complete model version") from None
        if not listing:
            raise ModelStoreError(f"{directory}: {CHECKSUM_FILE} is empty")
        entries = [line.partition("  ")[::2] for line in listing]
        # checked before any file is read: a listed name must never make the store read outside the version
        for _, name in entries:
            if not _own_file(directory, name):
                raise ModelStoreError(
                    f"{directory}: {CHECKSUM_FILE} lists {name[:200]!r}, which is not a file of this model version "
                    "(an absolute path, '..' or a link out of it): the version was not written by stream-forecaster; "
                    "remove it, or promote another version")
        if Path(MODEL_FILE) not in {Path(name) for _, name in entries}:
            raise ModelStoreError(f"{directory}: {CHECKSUM_FILE} does not list {MODEL_FILE}, so the model is "
                                  "unchecked: not a complete model version; remove it, or promote another version")
        for expected, name in entries:
            try:
                actual = _sha256(directory / name)
            except OSError:
                raise ModelStoreError(f"{directory}: {name} is listed in {CHECKSUM_FILE} but missing") from None
            if actual != expected:
                raise ModelStoreError(f"{directory}: checksum mismatch for {name}; the file is corrupted")
        return directory

    def check_writable(self) -> None:
        """Raise :class:`ModelStoreError` unless versions can be written here (check before hours of training)."""
        probe = self.path / f"{_TMP_PREFIX}probe-{uuid.uuid4().hex}"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe.mkdir()
            probe.rmdir()
        except OSError as exc:
            why = "a file is in the way" if isinstance(exc, (FileExistsError, NotADirectoryError)) else exc.strerror
            raise ModelStoreError(f"model store {self.path} is not writable ({why or exc}): "
                                  "set model_store.path to a writable directory") from None
        self.current()  # a pointer that cannot be read or replaced would only fail the publish, after the work

    def publish(self, write: Callable[[Path], None], make_current: bool = True) -> str:
        """Write a new version with ``write(directory)``, rename it into place, return its name."""
        with self._writing() as tmp:
            self._write_version(write, tmp)
            with self._lock():
                version = self._rename_into_place(tmp)
                _fsync(self.path)
                if make_current:
                    self._point_at(version)
                self._prune()
        return version

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Path]:
        """An empty hidden directory in the store to write a version into, removed on leaving unless it was
        renamed away (those crashed writers left go too); a file system error is a :class:`ModelStoreError`:
        nothing was published."""
        tmp = self.path / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._remove_stale_tmp()
            tmp.mkdir()
            yield tmp
        except OSError as exc:  # a full disk, say
            raise ModelStoreError(f"cannot write a model version into {self.path}: {exc.strerror or exc}") from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _write_version(write: Callable[[Path], None], tmp: Path) -> None:
        """Fill the empty directory ``tmp`` with ``write`` and the checksum list, synced to disk."""
        write(tmp)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        lines = [f"{_sha256(tmp / name)}  {name}" for name in files]
        (tmp / CHECKSUM_FILE).write_text("\n".join(lines) + "\n")
        for name in files + [CHECKSUM_FILE]:
            _fsync(tmp / name)

    def previous(self) -> str | None:
        """The newest version older than the current one (what ``rollback`` goes back to)."""
        current = self.current()
        older = [v for v in self.versions() if current is None or int(v) < int(current)]
        return older[-1] if older else None

    def set_current(self, version: str) -> None:
        """Point ``CURRENT`` at ``version`` atomically."""
        with self._lock():
            self._point_at(version)

    def set_shadow(self, version: str | None) -> None:
        """Point ``SHADOW`` at ``version`` atomically (a complete version: it is verified); None removes it."""
        with self._lock():
            if version is not None:
                self._point_at(version, SHADOW_FILE)
                return
            try:
                (self.path / SHADOW_FILE).unlink()
                _fsync(self.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise ModelStoreError(f"cannot remove {self.path / SHADOW_FILE}: {exc.strerror or exc}") from None

    @contextlib.contextmanager
    def _lock(self):
        """One writer at a time (advisory: readers need none, every change is a rename)."""
        with open(self.path / _LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _point_at(self, version: str, name: str = POINTER_FILE) -> None:
        self.verify(self.directory(version))
        if (self.path / name).is_dir():
            raise ModelStoreError(self._pointer_is_a_directory(name))
        pointer = self.path / f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex}"
        pointer.write_text(f"{version}\n")
        _fsync(pointer)
        os.replace(pointer, self.path / name)
        _fsync(self.path)

    def _rename_into_place(self, tmp: Path) -> str:
        # after CURRENT too: a number is never used twice, even when the newest versions were deleted by hand
        # (a daemon that serves "3" would not notice a new "3")
        current = self.current()
        number = max([0, *map(int, self.versions()), int(current or 0)]) + 1
        while True:
            try:
                os.rename(tmp, self.directory(str(number)))
                return str(number)
            except OSError as exc:
                # the name is taken (a directory or file that is not a version): try the next one
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                    raise
                number += 1

    def _prune(self) -> None:
        pointed = {self.current(), self.shadow()}
        old = self.versions()[: -self.keep]
        for version in old:
            if version not in pointed:
                shutil.rmtree(self.directory(version), ignore_errors=True)

    def _remove_stale_tmp(self) -> None:
        cutoff = time.time() - _STALE_TMP_SECONDS
        for p in self.path.glob(f"{_TMP_PREFIX}*"):
            try:
                if p.stat().st_mtime < cutoff:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            except OSError:
                pass


def open_store(config: Config) -> ModelStore:
    """The model store ``config`` names: the directory ``model_store.path``, or the compacted Kafka topic
    ``model_store.topic`` (then ``model_store.path`` caches the versions read from it)."""
    s = config.model_store
    if s.topic is None:
        return ModelStore(s.path, s.keep)
    from .model_topic import TopicModelStore  # noqa: PLC0415 (a Kafka client loads only when a topic is configured)

    return TopicModelStore.open(config)


def _is_number(name: str) -> bool:
    return name.isascii() and name.isdigit()  # isdigit() alone takes "²"


def _own_file(directory: Path, name: str) -> bool:
    """Whether a listed name is a file of the version itself: relative, no "..", not a link leading out."""
    path = Path(name)
    if not path.parts or path.is_absolute() or ".." in path.parts:
        return False
    try:
        return (directory / path).resolve().is_relative_to(directory.resolve())
    except (OSError, RuntimeError):  # a link loop (RuntimeError before Python 3.13)
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
