"""The seams of the daemon: what it needs of a source, a sink, a forecaster, a checkpoint store and a clock.

Kafka and TensorFlow implement them in production (:mod:`~stream_forecaster.kafka_io`,
:mod:`~stream_forecaster.model`); :mod:`~stream_forecaster.testing` ships in-memory
ones, so a configuration can be tested without a broker or a model. The
partition bookkeeping both Kafka clients share lives here too. Nothing here
imports a third-party library but numpy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from .intervals import AdaptiveInterval, AnomalyBand
    from .messages import OutRecord
    from .store import ModelMetadata

__all__ = ["Checkpoints", "Clock", "Forecaster", "Offsets", "Ownership", "Record", "Sink", "Source", "Wait",
           "first_offsets"]

Clock = Callable[[], float]
"""Monotonic seconds (``time.monotonic``, or a test's :class:`~stream_forecaster.testing.ManualClock`)."""

Wait = Callable[[float], bool]
"""Waits up to the seconds given; True if the wait ended because a stop was requested (``threading.Event.wait``)."""

Offsets = dict[tuple[str, int], int]
"""``{(topic, partition): next offset to read}``."""


class Record(Protocol):
    """What the pipeline reads of a consumer record."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def timestamp(self) -> int: ...  # ms; -1 when the producer set none
    @property
    def headers(self) -> Sequence[tuple[str, bytes | None]]: ...


class Source(Protocol):
    """The input topic as one member of a consumer group sees it."""

    #: whether :meth:`poll` calls ``before_revoke`` in a rebalance, before it gives partitions up: only then may a
    #: batch be read before the one before it is committed
    calls_before_revoke: bool

    def poll(self, timeout_s: float, max_records: int | None = None,
             before_revoke: Callable[[], object] | None = None) -> Sequence[Record]:
        """The next batch, oldest first within each partition; empty after ``timeout_s`` without one.

        Where :attr:`calls_before_revoke`, ``before_revoke`` is called inside
        the poll before partitions are revoked, so work in hand is finished and
        committed while they are still this member's.
        """

    def rewind(self, records: Sequence[Record]) -> None:
        """Hand ``records`` out again from the next poll on (those of partitions still assigned)."""

    def seek(self, partition: int, offset: int | None) -> None:
        """Read ``partition`` from ``offset`` on from the next poll (None: where ``kafka.auto_offset_reset`` says)."""

    def take_changes(self) -> tuple[set[int], set[int], set[int]]:
        """Partitions ``(lost, gained, regained)`` since the last call."""

    def committed(self, partition: int) -> int | None:
        """The group's committed offset of ``partition``, or None."""

    def beginning(self, partition: int) -> int:
        """The oldest offset still in ``partition``."""

    def read_range(self, partition: int, start: int, end: int, stop: threading.Event) -> Iterator[Record]:
        """Records ``start <= offset < end`` of ``partition`` (fewer where the log lost some), outside the group."""

    def commit(self, offsets: Offsets) -> bool:
        """Commit ``offsets``; False if the group refused (it moved on, the broker is gone)."""

    def lag(self) -> int | None:
        """Records not yet read, over the assigned partitions; None while unknown."""

    def assigned(self) -> bool:
        """Partitions are assigned and the group still counts this member in."""

    def close(self) -> None: ...


class Ownership:
    """The bookkeeping behind :meth:`Source.take_changes` for a member of a consumer group, whichever the client.

    The group's revocation callback adds to ``revoked`` (in place: the callback
    may hold the set). ``regained`` partitions were revoked and assigned back:
    their state is still ours only if nothing was re-read, which the caller
    checks against the committed offset.
    """

    def __init__(self) -> None:
        self.owned: set[int] = set()
        self.revoked: set[int] = set()

    def changes(self, owned: set[int]) -> tuple[set[int], set[int], set[int]]:
        """``(lost, gained, regained)`` from the last call's assignment to ``owned``."""
        revoked = set(self.revoked)
        self.revoked.clear()
        lost, gained = self.owned - owned, owned - self.owned
        self.owned = owned
        return lost, gained, (revoked & owned) - gained


def first_offsets(records: Iterable[Record]) -> dict[int, int]:
    """Each partition's lowest offset among ``records``: where a rewind seeks to."""
    first: dict[int, int] = {}
    for r in records:
        first[r.partition] = min(first.get(r.partition, r.offset), r.offset)
    return first


class Sink(Protocol):
    """Where forecasts and dead letters go."""

    def queue(self, records: Sequence[OutRecord]) -> None:
        """Start sending ``records``; the next :meth:`publish` waits for their acknowledgements."""

    def publish(self, records: Sequence[OutRecord] = (), stop: threading.Event | None = None) -> bool:
        """Send ``records`` and return once they and every record queued since the last publish are acknowledged
        (or refused for themselves); False only when ``stop`` was set first, and then the caller must not commit
        their input."""

    def close(self) -> None: ...


class Forecaster(Protocol):
    """A model serving one-step-ahead forecasts (:class:`stream_forecaster.model.Forecaster`)."""

    version: str | None
    metadata: ModelMetadata
    features: tuple[str, ...]
    targets: tuple[str, ...]
    sequence_length: int
    prediction_interval: AdaptiveInterval | None
    anomaly_band: AnomalyBand | None

    def forecast_scaled(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(predictions, scale)``, both ``[n, targets]``, for windows ``[n, sequence_length - 1, features]``."""

    def bounds(self, predictions: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Lower and upper bounds of the prediction interval, or None if the model has none."""

    def calls(self, n: int) -> list[int]:
        """How ``n`` windows are cut into calls of the model (the inference runner shares them out)."""

    def warm_up(self, largest: int = 1) -> None:
        """Prepare every call shape up to ``largest`` windows, so no real batch waits for it."""


class Checkpoints(Protocol):
    """Where each input partition's latest checkpoint and windows' snapshot are kept (the state topic)."""

    def write(self, checkpoints: dict[int, str], stop: threading.Event) -> bool:
        """Write one checkpoint per partition; False if ``stop`` was set before they were acknowledged."""

    def read(self, partition: int) -> str | None:
        """The latest checkpoint of ``partition``, or None."""

    def write_snapshot(self, partition: int, at: int, data: bytes) -> dict | None:
        """Store a snapshot of ``partition``'s windows taken at offset ``at``; where it lies, or None if not kept."""

    def read_snapshot(self, partition: int, ref: dict) -> bytes | None:
        """The snapshot ``ref`` names, or None if it is gone."""
