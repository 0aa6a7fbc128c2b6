"""The wire format: readings in, forecasts out.

:class:`MessageParser` turns a Kafka message (key, value) into a
:class:`Reading`, :data:`MISSING` or :class:`Invalid`, errors as data, so the
daemon never needs a try block per message. It reads JSON, bare numbers and
UCI lines; the same :class:`UciLineParser` reads the training files
(:mod:`stream_forecaster.files`), so a reading means the same thing offline and
online. A missing value (``?`` or an empty field) in a used column makes the
whole reading *missing*: it is skipped and counted, never filled in.
:func:`encode_predictions` writes the one format of a forecast.
"""

from __future__ import annotations

import datetime as dt
import enum
import functools
import json
import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from .errors import UserError

__all__ = [
    "DEFAULT_SENSOR",
    "HEADER",
    "MAX_KEY_BYTES",
    "MISSING",
    "UCI_COLUMNS",
    "Invalid",
    "Kind",
    "MessageParser",
    "OutRecord",
    "ParsedBatch",
    "Reading",
    "RecordError",
    "UciLineParser",
    "encode_anomalies",
    "encode_gaps",
    "encode_predictions",
    "format_time",
    "format_times",
    "parse_iso_time",
    "parse_number",
    "prediction_id",
]

UCI_COLUMNS = (
    "Global_active_power",
    "Global_reactive_power",
    "Voltage",
    "Global_intensity",
    "Sub_metering_1",
    "Sub_metering_2",
    "Sub_metering_3",
)

class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


MISSING = _Marker("MISSING")  # a reading with a missing value: skipped, counted
HEADER = _Marker("HEADER")  # a UCI header line: not a reading at all
_EPOCH = dt.date(1970, 1, 1)
CACHE_LIMIT = 100_000  # distinct dates/times remembered; bounds memory on hostile input
_LARGEST = 3.4028234663852886e38  # float32's largest: windows are float32, so larger values cannot be held


class RecordError(UserError, ValueError):
    """A reading that cannot be parsed; the message says why."""


class UciLineParser:
    """Parses ``d/m/yyyy;hh:mm:ss;v1;...`` lines into (timestamp, values).

    ``columns`` are the value columns wanted, in order; ``header`` names the
    value columns as they stand in the line (the standard UCI order by
    default). Timestamps are seconds since 1970-01-01 of the wall-clock time
    written in the line (no time zone is implied by the data set).
    """

    def __init__(self, columns: Sequence[str], header: Sequence[str] = UCI_COLUMNS):
        unknown = [c for c in columns if c not in header]
        if unknown:
            raise RecordError(
                f"column(s) {', '.join(unknown)} not in the data; available: {', '.join(header)}"
            )
        self.columns = tuple(columns)
        self.header = ["Date", "Time", *header]
        self.n_fields = 2 + len(header)
        self._indices = [2 + list(header).index(c) for c in columns]
        self._dates: dict[str, int] = {}
        self._times: dict[str, int] = {}

    @classmethod
    def from_header(cls, line: str, columns: Sequence[str]) -> "UciLineParser":
        fields = line.strip().split(";")
        if fields[:2] != ["Date", "Time"]:
            raise RecordError(f"not a UCI header line (expected 'Date;Time;...'): {line[:80]!r}")
        return cls(columns, fields[2:])

    @staticmethod
    def is_header(line: str) -> bool:
        return line.startswith("Date;Time;")

    def parse(self, line: str) -> "tuple[int, list[float]] | _Marker":
        """``(timestamp, values)``, or :data:`MISSING`; raises :class:`RecordError`."""
        fields = line.strip().split(";")
        if len(fields) != self.n_fields:
            raise RecordError(f"expected {self.n_fields} fields separated by ';', got {len(fields)}")
        values = []
        for i in self._indices:
            text = fields[i]
            if text == "?" or text == "":
                return MISSING
            try:
                value = float(text)
            except ValueError:
                raise RecordError(f"bad number {text[:40]!r} in column {i + 1}") from None
            if not math.isfinite(value):
                raise RecordError(f"non-finite number {text[:40]!r} in column {i + 1}")
            if abs(value) > _LARGEST:
                raise RecordError(f"number {text[:40]!r} in column {i + 1} is out of range")
            values.append(value)
        return self._timestamp(fields[0], fields[1]), values

    def read_fields(self, fields: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Read the fields of whole lines (``n_fields`` per line, in order): each line's numbers, its timestamp
        (NaN where its date or time cannot be read) and whether its numbers are all good (not ``?``, finite, in
        range). One conversion per column, so a batch of lines costs little more than one."""
        n_lines = len(fields) // self.n_fields
        good = np.ones(n_lines, dtype=bool)
        numbers = np.zeros((n_lines, len(self._indices)))
        for c, at in enumerate(self._indices):
            column = fields[at::self.n_fields]
            try:
                numbers[:, c] = list(map(float, column))
            except ValueError:  # a '?' or a bad number in some line
                for row, text in enumerate(column):
                    try:
                        numbers[row, c] = float(text)
                    except ValueError:
                        good[row] = False
        with np.errstate(invalid="ignore"):
            good &= (np.abs(numbers) <= _LARGEST).all(axis=1)  # NaN compares False
        return numbers, self._timestamps(fields[0::self.n_fields], fields[1::self.n_fields]), good

    def _timestamps(self, dates: list[str], times: list[str]) -> np.ndarray:
        """:meth:`_timestamp` of each (date, time); NaN where either cannot be read."""
        days: list = list(map(self._dates.get, dates))
        seconds: list = list(map(self._times.get, times))
        for parts, texts, cache, parse in ((days, dates, self._dates, _parse_date),
                                           (seconds, times, self._times, _parse_time)):
            if None in parts:
                for i, text in enumerate(texts):
                    if parts[i] is None:
                        try:
                            parts[i] = self._remember(cache, text, parse(text))
                        except RecordError:
                            parts[i] = math.nan
        return np.array(days, dtype=np.float64) + np.array(seconds, dtype=np.float64)

    def _timestamp(self, date: str, time: str) -> int:
        day = self._dates.get(date)
        if day is None:
            day = self._remember(self._dates, date, _parse_date(date))
        seconds = self._times.get(time)
        if seconds is None:
            seconds = self._remember(self._times, time, _parse_time(time))
        return day + seconds

    @staticmethod
    def _remember(cache: dict, key: str, value: int) -> int:
        if len(key) <= 10:  # dd/mm/yyyy, hh:mm:ss; int() takes padded fields too, and they must not pin memory
            if len(cache) >= CACHE_LIMIT:
                cache.clear()
            cache[key] = value
        return value


def _parse_date(text: str) -> int:
    try:
        day, month, year = (int(p) for p in text.split("/"))
        return (dt.date(year, month, day) - _EPOCH).days * 86400
    except ValueError:
        raise RecordError(f"bad date {text[:40]!r} (expected d/m/yyyy)") from None


def _parse_time(text: str) -> int:
    parts = text.split(":")
    try:
        hour, minute, second = (int(p) for p in parts)
    except ValueError:
        raise RecordError(f"bad time {text[:40]!r} (expected hh:mm:ss)") from None
    if not (0 <= hour < 24 and 0 <= minute < 60 and 0 <= second < 60):
        raise RecordError(f"bad time {text[:40]!r} (expected hh:mm:ss)")
    return hour * 3600 + minute * 60 + second


DEFAULT_SENSOR = "default"  # the sensor of a message without a key
MAX_KEY_BYTES = 1024  # a longer key is refused: a forecast carries its sensor's id four times


class OutRecord(NamedTuple):  # a tuple: made for every forecast, at a fifth of a frozen dataclass's cost
    """A message to publish: a prediction, a dead letter or a refill checkpoint."""

    topic: str
    key: bytes | None
    value: bytes | None  # None: a tombstone, which removes the key from a compacted topic
    headers: Sequence[tuple[str, bytes]] = ()
    partition: int | None = None  # None: chosen from the key


class Reading(NamedTuple):  # a tuple: made for every message read
    """One accepted reading: values of the configured columns, in order."""

    sensor: str
    values: list[float]
    timestamp: float | None  # seconds since 1970 of the time in the reading, if it carried one
    aware: bool = False  # the timestamp carried a zone (it is UTC seconds); else wall clock


@dataclass(frozen=True, slots=True)
class Invalid:
    """A message that is not a reading; ``reason`` says why."""

    sensor: str
    reason: str


class Kind(enum.IntEnum):
    """What a message is, in :class:`ParsedBatch`' ``kinds``."""

    READING = 0
    MISSING = 1  # parse() says MISSING
    HEADER = 2
    INVALID = 3


class ParsedBatch(NamedTuple):
    """Messages parsed together (:meth:`MessageParser.parse_batch`), a column per field: ``kinds`` says what
    each message is (a :class:`Kind`; why it is invalid: ``invalid[i]``); rows of ``values``, ``timestamps``
    and ``aware`` hold the readings' fields, and 0, NaN and False for other messages."""

    kinds: np.ndarray  # int8
    sensors: list[str]
    values: np.ndarray  # float64 [messages, columns]
    timestamps: np.ndarray  # float64; NaN: no time
    aware: np.ndarray  # bool
    invalid: dict[int, Invalid]


class MessageParser:
    """Parses a Kafka message (key, value) into a :class:`Reading`, :data:`MISSING` or :class:`Invalid`.

    Values may be a UCI line ``d/m/yyyy;hh:mm:ss;v1;...;v7``, a JSON object
    ``{"timestamp": "...", "values": {"column": 4.2, ...}}`` (or ``"value": 4.2``
    when one column is used), a bare number (one column), or ``?``. A UCI
    header line returns :data:`HEADER`.
    """

    def __init__(self, columns: Sequence[str], max_bytes: int = 65536):
        self.columns = tuple(columns)
        self.max_bytes = max_bytes
        self._uci = UciLineParser(self.columns) if set(self.columns) <= set(UCI_COLUMNS) else None

    def parse_batch(self, keys: Sequence[bytes | None], values: Sequence[bytes | None]) -> ParsedBatch:
        """Parse messages ``(keys[i], values[i])``, each exactly as :meth:`parse` would.

        Plain UCI lines (ASCII, no spaces, every field in place) are read
        together: one split of the joined lines and one conversion per column.
        Every other message, and every line that turns out not to be a plain
        reading (a ``?``, a bad number or date), goes through :meth:`parse`.
        """
        n = len(values)
        sensors = [key.decode("utf-8", "backslashreplace") if key else DEFAULT_SENSOR for key in keys]
        batch = ParsedBatch(np.full(n, Kind.READING, dtype=np.int8), sensors,
                            np.zeros((n, len(self.columns))), np.full(n, np.nan), np.zeros(n, dtype=bool), {})
        plain = np.empty(0, dtype=np.int64)
        if self._uci is not None and n:
            plain = self._plain_lines(keys, values)
            if len(plain):
                plain = self._read_lines(plain, values, batch)
        rest = np.ones(n, dtype=bool)
        rest[plain] = False
        for i in np.flatnonzero(rest).tolist():
            reading = self.parse(keys[i], values[i])
            if isinstance(reading, Reading):
                batch.values[i], batch.aware[i] = reading.values, reading.aware
                if reading.timestamp is not None:
                    batch.timestamps[i] = reading.timestamp
            elif isinstance(reading, Invalid):
                batch.kinds[i] = Kind.INVALID
                batch.invalid[i] = reading
            else:
                batch.kinds[i] = Kind.MISSING if reading is MISSING else Kind.HEADER
        return batch

    def _plain_lines(self, keys: Sequence[bytes | None], values: Sequence[bytes | None]) -> np.ndarray:
        """The indices of messages that are plain UCI data lines as far as their bytes show: ASCII, no
        whitespace or control bytes, exactly the fields of a line, a key parse() takes."""
        assert self._uci is not None
        try:
            lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))  # type: ignore[arg-type]
            key_lengths = np.fromiter((0 if k is None else len(k) for k in keys), dtype=np.int64, count=len(keys))
        except TypeError:  # a value without bytes (None): parse() says what it is
            return np.empty(0, dtype=np.int64)
        candidates = np.flatnonzero((lengths > 0) & (lengths <= self.max_bytes) & (key_lengths <= MAX_KEY_BYTES))
        if not len(candidates):
            return candidates
        joined = b"\n".join([values[i] for i in candidates.tolist()])
        if not joined.isascii():
            return np.empty(0, dtype=np.int64)
        data = np.frombuffer(joined, dtype=np.uint8)
        starts = np.zeros(len(candidates), dtype=np.int64)
        np.cumsum(lengths[candidates][:-1] + 1, out=starts[1:])
        separators = np.add.reduceat((data == ord(";")).astype(np.int32), starts)
        blanks = np.add.reduceat((data <= ord(" ")).astype(np.int32), starts)  # the joining newline counts 1
        blanks[:-1] -= 1
        plain = (separators == self._uci.n_fields - 1) & (blanks == 0) & (data[starts] != ord("{"))
        return candidates[plain]

    def _read_lines(self, plain: np.ndarray, values: Sequence[bytes | None], batch: ParsedBatch) -> np.ndarray:
        """Read the plain lines ``values[plain]`` into ``batch``; return those that are readings (the others are
        left to parse())."""
        assert self._uci is not None
        fields = b";".join([values[i] for i in plain.tolist()]).decode("ascii").split(";")
        numbers, stamps, good = self._uci.read_fields(fields)
        good &= (EARLIEST <= stamps) & (stamps <= LATEST)
        plain = plain[good]
        batch.values[plain], batch.timestamps[plain] = numbers[good], stamps[good]
        return plain

    def parse(self, key: bytes | None, value: bytes | None):
        sensor = key.decode("utf-8", "backslashreplace") if key else DEFAULT_SENSOR
        if key is not None and len(key) > MAX_KEY_BYTES:
            return Invalid(sensor[:64] + "...", f"key of {len(key)} bytes: sensor ids take at most {MAX_KEY_BYTES}")
        if not value:
            return Invalid(sensor, "empty message")
        if len(value) > self.max_bytes:
            return Invalid(sensor, f"oversized message: {len(value)} bytes > {self.max_bytes}")
        try:
            text = value.decode("utf-8").strip()
        except UnicodeDecodeError:
            return Invalid(sensor, "not UTF-8")
        if text == "?":
            return MISSING
        try:
            if text.startswith("{"):
                reading = self._json(sensor, text)
            elif ";" in text:
                reading = self._line(sensor, text)
            else:
                reading = self._bare_number(sensor, text)
        except RecordError as exc:
            return Invalid(sensor, str(exc))
        except Exception as exc:  # noqa: BLE001 (whatever a message does, it must not stop the daemon)
            return Invalid(sensor, f"unreadable message ({type(exc).__name__}: {str(exc)[:80]})")
        if isinstance(reading, Reading) and reading.timestamp is not None \
                and not EARLIEST <= reading.timestamp <= LATEST:
            # its forecast's time (a minute or a day later) must still be a date
            return Invalid(sensor, f"timestamp out of range: only years {EARLIEST_YEAR} to {LATEST_YEAR}")
        return reading

    def parse_object(self, sensor: str, obj):
        """A JSON reading already decoded (a line of a JSON lines file), by the rules of :meth:`parse`."""
        try:
            reading = self._object(sensor, obj)
        except RecordError as exc:
            return Invalid(sensor, str(exc))
        except Exception as exc:  # noqa: BLE001 (as in parse)
            return Invalid(sensor, f"unreadable message ({type(exc).__name__}: {str(exc)[:80]})")
        if isinstance(reading, Reading) and reading.timestamp is not None \
                and not EARLIEST <= reading.timestamp <= LATEST:
            return Invalid(sensor, f"timestamp out of range: only years {EARLIEST_YEAR} to {LATEST_YEAR}")
        return reading

    def _line(self, sensor: str, text: str):
        if UciLineParser.is_header(text):
            return HEADER
        if self._uci is None:
            raise RecordError(f"UCI lines carry only the columns {', '.join(UCI_COLUMNS)}")
        reading = self._uci.parse(text)
        if not isinstance(reading, tuple):
            return MISSING
        return Reading(sensor, reading[1], float(reading[0]))

    def _bare_number(self, sensor: str, text: str):
        if len(self.columns) != 1:
            raise RecordError(f"a bare number is one value, but {len(self.columns)} columns are configured")
        return Reading(sensor, [parse_number(text)], None)

    def _json(self, sensor: str, text: str):
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise RecordError(f"bad JSON: {exc}") from None
        return self._object(sensor, obj)

    def _object(self, sensor: str, obj):
        if not isinstance(obj, dict):
            raise RecordError("a JSON reading must be an object")
        if "values" in obj:
            values = obj["values"]
            if not isinstance(values, dict):
                raise RecordError('"values" must be an object of column: number')
        elif "value" in obj and len(self.columns) == 1:
            values = {self.columns[0]: obj["value"]}
        else:
            raise RecordError(f'expected "values": {{{", ".join(self.columns)}}}'
                              + (' or "value"' if len(self.columns) == 1 else ""))
        parsed = []
        for column in self.columns:
            v = values.get(column)
            if v is None or v == "?":
                return MISSING
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise RecordError(f"{column} must be a number, got {str(v)[:40]!r}")
            parsed.append(parse_number(v))
        timestamp, aware = parse_iso_time(obj.get("timestamp"))
        return Reading(sensor, parsed, timestamp, aware)


def parse_number(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise RecordError(f"bad number {str(value)[:40]!r}") from None
    if not math.isfinite(number):
        raise RecordError(f"non-finite number {str(value)[:40]!r}")
    if abs(number) > _LARGEST:
        raise RecordError(f"number {str(value)[:40]!r} is out of range")
    return number


def parse_iso_time(value) -> tuple[float | None, bool]:
    if value is None:
        return None, False
    if isinstance(value, bool) or not isinstance(value, str):
        raise RecordError('"timestamp" must be an ISO-8601 string')
    try:
        # Python 3.10 reads no "Z" (3.11 does)
        stamp = dt.datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value)
    except ValueError:
        raise RecordError(f"bad timestamp {value[:40]!r} (expected ISO-8601)") from None
    if stamp.tzinfo is None:
        return (stamp - dt.datetime(1970, 1, 1)).total_seconds(), False
    return stamp.timestamp(), True


EARLIEST_YEAR, LATEST_YEAR = 1000, 9000  # room on both sides for any forecast interval and time zone
EARLIEST = (dt.datetime(EARLIEST_YEAR, 1, 1) - dt.datetime(1970, 1, 1)).total_seconds()
LATEST = (dt.datetime(LATEST_YEAR + 1, 1, 1) - dt.datetime(1970, 1, 1)).total_seconds() - 1


@functools.lru_cache(maxsize=4096)  # a fleet's sensors share the minutes they report
def format_time(seconds: float, aware: bool) -> str:
    """ISO-8601 of a reading's time: with a zone (UTC) if the input had one."""
    stamp = dt.datetime.fromtimestamp(seconds, dt.timezone.utc)
    text = stamp.strftime("%Y-%m-%dT%H:%M:%S")
    return text + "Z" if aware else text


def format_times(seconds: np.ndarray, aware: np.ndarray) -> list[str | None]:
    """:func:`format_time` of each time (None where NaN): whole seconds in one numpy pass."""
    whole = np.isfinite(seconds) & (seconds == np.floor(seconds))
    if not whole.all():
        return [None if t != t else format_time(t, a) for t, a in zip(seconds.tolist(), aware.tolist())]
    texts = np.datetime_as_string(seconds.astype(np.int64).astype("datetime64[s]"), unit="s").tolist()
    if aware.any():
        return [text + "Z" if a else text for text, a in zip(texts, aware.tolist())]
    return texts


_quote = json.encoder.encode_basestring_ascii  # what json.dumps uses for strings (in C)


def encode_predictions(
    idents: Sequence[str],
    sensors: Sequence[str],
    timestamps: Sequence[str | None],
    predictions,
    targets: Sequence[str],
    model_version: str | None,
    partitions: Sequence[int],
    offsets: Sequence[int],
    bounds: tuple | None = None,
) -> list[bytes]:
    """The JSON values of prediction messages, one per row of ``predictions`` (a value per target, in the data's
    own units; null where not finite).

    With ``bounds`` (lower rows, upper rows) the prediction interval goes
    along as ``lower`` and ``upper``. Byte for byte what ``json.dumps(...,
    separators=(",", ":"))`` writes, at a fraction of the cost: it runs for
    every forecast.
    """
    numbers = _json_numbers(predictions, targets)
    intervals = [""] * len(numbers)
    if bounds is not None:
        intervals = [f',"lower":{lower},"upper":{upper}'
                     for lower, upper in zip(_json_numbers(bounds[0], targets), _json_numbers(bounds[1], targets))]
    version = "null" if model_version is None else _quote(model_version)
    return [(f'{{"id":{_quote(ident)},"sensor":{_quote(sensor)},'
             f'"timestamp":{"null" if timestamp is None else _quote(timestamp)},"prediction":{number}{interval},'
             f'"model_version":{version},"source":{{"partition":{int(partition)},"offset":{int(offset)}}}}}').encode()
            for ident, sensor, timestamp, number, interval, partition, offset
            in zip(idents, sensors, timestamps, numbers, intervals, partitions, offsets)]


def prediction_id(sensor: str, timestamp: str | None, partition: int, offset: int) -> str:
    """A forecast's id: its sensor and time, else (no time) the input record it was made from. The same reading
    always gets the same id, so at-least-once repeats are recognisable downstream."""
    return f"{sensor}@{timestamp}" if timestamp else f"{sensor}@{partition}/{offset}"


def encode_anomalies(idents: Sequence[str], sensors: Sequence[str], timestamps: Sequence[str | None],
                     readings, forecasts, lower, upper, scores, targets: Sequence[str],
                     model_version: str | None, partitions: Sequence[int], offsets: Sequence[int]) -> list[bytes]:
    """The JSON values of anomaly events: a reading outside its forecast's anomaly band (``lower``, ``upper``),
    with its standardised ``score``; the id is its forecast's. Numbers per target as in predictions."""
    version = "null" if model_version is None else _quote(model_version)
    columns = [_json_numbers(rows, targets) for rows in (readings, forecasts, lower, upper, scores)]
    return [(f'{{"type":"anomaly","id":{_quote(ident)},"sensor":{_quote(sensor)},'
             f'"timestamp":{"null" if timestamp is None else _quote(timestamp)},"reading":{reading},'
             f'"forecast":{forecast},"lower":{low},"upper":{high},"score":{score},"model_version":{version},'
             f'"source":{{"partition":{int(partition)},"offset":{int(offset)}}}}}').encode()
            for ident, sensor, timestamp, reading, forecast, low, high, score, partition, offset
            in zip(idents, sensors, timestamps, *columns, partitions, offsets)]


def encode_gaps(sensors: Sequence[str], starts: Sequence[str], ends: Sequence[str], missing: Sequence[int],
                partitions: Sequence[int], offsets: Sequence[int]) -> list[bytes]:
    """The JSON values of gap events: ``missing`` readings of a sensor after its reading at ``start``, up to the
    one at ``end`` that came next."""
    return [(f'{{"type":"gap","id":{_quote(f"{sensor}@{start}/{end}")},"sensor":{_quote(sensor)},'
             f'"from":{_quote(start)},"to":{_quote(end)},"missing":{int(n)},'
             f'"source":{{"partition":{int(partition)},"offset":{int(offset)}}}}}').encode()
            for sensor, start, end, n, partition, offset in zip(sensors, starts, ends, missing, partitions, offsets)]


def _json_numbers(rows, targets: Sequence[str]) -> list[str]:
    """Per row (of an array or of lists): one target, the number; several, an object per target; null where
    not finite."""
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, len(targets))
    if len(targets) == 1:
        texts = list(map(repr, rows[:, 0].tolist()))
        for i in np.flatnonzero(~np.isfinite(rows[:, 0])).tolist():
            texts[i] = "null"
        return texts
    return [json.dumps(dict(zip(targets, [v if v - v == 0 else None for v in row])), separators=(",", ":"))
            for row in rows.tolist()]
