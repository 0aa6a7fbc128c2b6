"""Readings in, predictions out: the one parser of readings, the one format of predictions.

The same :class:`UciLineParser` reads training files line by line and, in the
daemon, UCI-formatted Kafka messages, so a reading means the same thing offline
and online. :class:`MessageParser` also takes JSON and bare numbers and returns
errors as data (:class:`Invalid`), so the daemon never needs a try block per
message. A missing value (``?`` or an empty field) in a used column
makes the whole reading *missing*: it is skipped and counted, never filled in.
Anything else that does not parse is *malformed* and raises :class:`RecordError`
with the reason.
"""

from __future__ import annotations

import array
import csv
import dataclasses
import datetime as dt
import contextlib
import functools
import json
import gzip
import io
import math
import os
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Sequence

import numpy as np

from .errors import UserError

__all__ = [
    "DEFAULT_SENSOR",
    "HEADER",
    "MAX_KEY_BYTES",
    "MISSING",
    "Invalid",
    "MessageParser",
    "OutRecord",
    "Reading",
    "encode_prediction",
    "format_time",
    "SAMPLE_PATH",
    "UCI_COLUMNS",
    "RecordError",
    "Series",
    "UciLineParser",
    "iso_time",
    "open_text",
    "read_series",
    "read_uci",
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

# Four weeks of the real data set, 16/12/2006 17:24 onward (see data/README.md).
SAMPLE_PATH = Path(__file__).with_name("data") / "household_power_sample.txt.gz"

class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


MISSING = _Marker("MISSING")  # a reading with a missing value: skipped, counted
HEADER = _Marker("HEADER")  # a UCI header line: not a reading at all
_EPOCH = dt.date(1970, 1, 1)
_CACHE_LIMIT = 100_000  # distinct dates/times remembered; bounds memory on hostile input
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
            if len(cache) >= _CACHE_LIMIT:
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


@dataclass(frozen=True)
class Series:
    """Accepted readings of a file: in file order (UCI), or by sensor, then time (:func:`read_series`)."""

    columns: tuple[str, ...]
    timestamps: np.ndarray  # int64 seconds, shape [n]
    values: np.ndarray  # float32, shape [n, len(columns)]
    source: str
    lines: int  # data lines looked at (after the ratio cut)
    missing: int  # skipped: a used column was '?' or empty
    malformed: int  # skipped: did not parse (only with on_error="skip")
    errors: tuple[str, ...] = field(default=())  # the first few malformed-line messages
    segments: tuple[int, ...] = (0,)  # first row of each sensor's readings; windows never span two
    sensors: tuple[str, ...] = ()  # the sensor of each segment, when known; () when there are no rows
    duplicates: int = 0  # skipped: a sensor's time again (read_series; the daemon skips repeats too)

    def __len__(self) -> int:
        return len(self.timestamps)

    def select(self, keep: np.ndarray) -> "Series":
        """The rows where ``keep`` (a boolean mask) is true; sensors keep their own segments."""
        kept_before = np.concatenate([[0], np.cumsum(keep)])
        kept = kept_before[[*self.segments, len(self)]]  # rows kept before each segment, and in all
        alive = [i for i in range(len(self.segments)) if kept[i + 1] > kept[i]]  # an emptied sensor goes, name and all
        segments = tuple(int(kept[i]) for i in alive) or (0,)
        sensors = tuple(self.sensors[i] for i in alive) if len(self.sensors) == len(self.segments) else ()
        return dataclasses.replace(self, timestamps=self.timestamps[keep], values=self.values[keep],
                                   segments=segments, sensors=sensors)

    def summary(self) -> dict:
        return {
            "source": self.source,
            "rows": len(self),
            "lines": self.lines,
            "missing": self.missing,
            "malformed": self.malformed,
            "duplicates": self.duplicates,
            "first": iso_time(self.timestamps.min()) if len(self) else None,  # sensors one after another
            "last": iso_time(self.timestamps.max()) if len(self) else None,
        }


def strict_json(value, **dumps_options) -> str:
    """JSON that every reader takes: a figure that is not finite (no seasonal pair, a diverged model) is null."""
    return json.dumps(_nulls(value), allow_nan=False, **dumps_options)


def _nulls(value):
    if isinstance(value, dict):
        return {k: _nulls(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nulls(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def iso_time(seconds) -> str:
    """ISO-8601 of a timestamp as written in the data (no zone)."""
    return dt.datetime.fromtimestamp(int(seconds), dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


@contextlib.contextmanager
def open_text(path: str | os.PathLike) -> Iterator[IO[str]]:
    """Open a data file as text: plain, gzip (``.gz``) or the data file inside a ``.zip``.

    A file that cannot be read as such (a damaged archive, a directory) raises
    :class:`RecordError` naming it, while opening or while reading.
    """
    try:
        with _open_text(Path(path)) as f:
            yield f
    except (EOFError, zipfile.BadZipFile, zlib.error, gzip.BadGzipFile, IsADirectoryError, PermissionError) as exc:
        raise RecordError(f"{path}: cannot read it ({type(exc).__name__}: {exc})") from None


def _open_text(path: Path) -> IO[str]:
    # surrogateescape: a stray non-UTF-8 byte fails its own line, not the whole file
    text = dict(encoding="utf-8-sig", errors="surrogateescape", newline=None)  # -sig: spreadsheets write a BOM
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), **text)
    if path.suffix == ".zip":
        archive = zipfile.ZipFile(path)
        # __MACOSX/ holds the Finder's resource forks, named like the data files
        members = [m for m in archive.namelist()
                   if m.lower().endswith(_DATA_SUFFIXES) and not m.startswith("__MACOSX/")] or archive.namelist()
        if not members:
            raise RecordError(f"{path}: the zip archive is empty")
        return io.TextIOWrapper(archive.open(members[0]), **text)
    return open(path, **text)


_DATA_SUFFIXES = (".txt", ".csv", ".jsonl", ".json", ".ndjson")


def _count_lines(path: Path) -> int:
    with open_text(path) as f:
        return sum(1 for _ in f)


def read_uci(
    path: str | os.PathLike,
    columns: Sequence[str],
    *,
    ratio: float = 1.0,
    on_error: str = "raise",
) -> Series:
    """Read the accepted readings of ``columns`` from a UCI household power file.

    ``ratio`` keeps only the first fraction of the data lines. With
    ``on_error="raise"`` a malformed line raises :class:`RecordError` naming
    the file and line number; with ``"skip"`` it is counted and skipped.
    """
    path = Path(path)
    if not path.exists():
        raise RecordError(f"{path}: no such file")
    limit = None
    if ratio < 1.0:
        limit = int((_count_lines(path) - 1) * ratio)
    stamps = array.array("q")
    values = array.array("f")  # float32 straight away: the array is what dominates memory
    missing = malformed = lines = 0
    errors: list[str] = []
    with open_text(path) as f:
        first = next(f, "")
        if UciLineParser.is_header(first):
            parser = UciLineParser.from_header(first, columns)
            body: Iterator[str] = f
            lineno = 1
        else:
            parser = UciLineParser(columns)
            body = _chain(first, f)
            lineno = 0
        parse, add_stamp, add_values = parser.parse, stamps.append, values.extend
        for line in body:
            lineno += 1
            if limit is not None and lines >= limit:
                break
            if line.isspace() or line.startswith("Date;") and line.strip().split(";") == parser.header:
                continue  # a trailing blank line; the header again where files were concatenated
            lines += 1
            try:
                reading = parse(line)
            except RecordError as exc:
                message = f"{path}:{lineno}: {exc}"
                if on_error == "raise":
                    raise RecordError(message + " (set data.on_error: skip to skip such lines)") from None
                malformed += 1
                if len(errors) < 5:
                    errors.append(message)
                continue
            if reading is MISSING:
                missing += 1
                continue
            add_stamp(reading[0])
            add_values(reading[1])
    return Series(
        columns=parser.columns,
        timestamps=np.frombuffer(stamps, dtype=np.int64),
        values=np.frombuffer(values, dtype=np.float32).reshape(-1, len(parser.columns)),
        source=str(path),
        lines=lines,
        missing=missing,
        malformed=malformed,
        errors=tuple(errors),
        sensors=(DEFAULT_SENSOR,),
    )


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    if first:
        yield first
    yield from rest


_UCI_LINE = re.compile(r"\s*\d{1,2}/\d{1,2}/\d{4};")  # a headerless UCI file's first line
_TIME_NAMES = ("timestamp", "time", "datetime", "date", "ts")
_NO_VALUE = frozenset({"?", "", "nan", "null", "na"})  # lower-cased: a missing value, as '?' in UCI files


def read_series(
    path: str | os.PathLike,
    columns: Sequence[str],
    *,
    ratio: float = 1.0,
    on_error: str = "raise",
    time_column: str | None = None,
    sensor_column: str | None = None,
) -> Series:
    """Read the accepted readings of ``columns`` from a UCI, CSV or JSON lines file.

    The format is told by the first non-blank line: ``Date;Time;...`` or a UCI
    data line (:func:`read_uci`, whose rules hold unchanged), ``{`` (JSON lines,
    one daemon-shaped message each, with an optional ``"sensor"``), else a CSV
    header (``,`` or ``;``). CSV and JSON rows come out by sensor (by name),
    then time; a sensor's time again is dropped and counted in ``duplicates``.
    ``time_column`` and ``sensor_column`` apply to CSV only. ``ratio`` and
    ``on_error`` are as for :func:`read_uci`.
    """
    path = Path(path)
    if not path.exists():
        raise RecordError(f"{path}: no such file")
    with open_text(path) as f:
        lineno, first = 0, ""
        for line in f:
            lineno += 1
            if not line.isspace():
                first = line
                break
        uci = not first or UciLineParser.is_header(first) or _UCI_LINE.match(first)
        if not uci:
            json_lines = first.lstrip().startswith("{")
            limit = None
            if ratio < 1.0:
                limit = int((_count_data_lines(path) - (not json_lines)) * ratio)  # less the CSV header
            errors = _Malformed(path, on_error)
            if json_lines:
                return _read_json_lines(path, columns, _chain(first, f), lineno - 1, limit, errors)
            return _read_csv(path, columns, first, f, lineno, limit, errors, time_column, sensor_column)
    return read_uci(path, columns, ratio=ratio, on_error=on_error)  # reads it afresh, blank lines and all


def _count_data_lines(path: Path) -> int:
    with open_text(path) as f:
        return sum(1 for line in f if not line.isspace())


class _Malformed:
    """Malformed lines: raised, or (on_error="skip") counted with the first few messages kept."""

    def __init__(self, path: Path, on_error: str):
        self.path, self.raise_ = path, on_error == "raise"
        self.count = 0
        self.messages: list[str] = []

    def add(self, lineno: int, reason: str) -> None:
        message = f"{self.path}:{lineno}: {reason}"
        if self.raise_:
            raise RecordError(message + " (set data.on_error: skip to skip such lines)")
        self.count += 1
        if len(self.messages) < 5:
            self.messages.append(message)


class _Rows:
    """Accepted readings of many sensors as they come, in compact buffers (not lists of Python floats)."""

    def __init__(self, n_columns: int):
        self.n_columns = n_columns
        self.sensor = array.array("i")
        self.stamps = array.array("q")
        self.values = array.array("f")  # float32 straight away: the array is what dominates memory
        self.ids: dict[str, int] = {}

    def sensor_id(self, name: str) -> int:
        """The small int of sensor ``name``, checked as the daemon checks a key when first seen."""
        ident = self.ids.get(name)
        if ident is None:
            try:
                size = len(name.encode("utf-8"))
            except UnicodeEncodeError:
                raise RecordError("the sensor name is not UTF-8") from None
            if size > MAX_KEY_BYTES:
                raise RecordError(f"sensor name of {size} bytes: sensor ids take at most {MAX_KEY_BYTES}")
            ident = self.ids[name] = len(self.ids)
        return ident

    def series(self, columns: Sequence[str], path: Path, lines: int, missing: int, errors: _Malformed) -> Series:
        """The readings by sensor (sensors by name), then time; a sensor's time again is dropped."""
        names = sorted(self.ids)
        rank = np.zeros(len(self.ids), dtype=np.int32)
        rank[[self.ids[n] for n in names]] = np.arange(len(names), dtype=np.int32)
        sensor = rank[np.frombuffer(self.sensor, dtype=np.int32)]
        stamps = np.frombuffer(self.stamps, dtype=np.int64)
        values = np.frombuffer(self.values, dtype=np.float32).reshape(-1, self.n_columns)
        same = sensor[1:] == sensor[:-1]
        # a file already in order (one sensor, in time) is spared the sort's copies
        if not np.all((sensor[1:] > sensor[:-1]) | same & (stamps[1:] >= stamps[:-1])):
            order = np.lexsort((stamps, sensor))  # stable: of equal times the first in the file stays
            sensor, stamps, values = sensor[order], stamps[order], values[order]
            same = sensor[1:] == sensor[:-1]
        repeat = same & (stamps[1:] == stamps[:-1])
        if repeat.any():
            keep = np.concatenate([[True], ~repeat])
            sensor, stamps, values = sensor[keep], stamps[keep], values[keep]
        starts = np.flatnonzero(np.concatenate([[True], sensor[1:] != sensor[:-1]])) if len(sensor) else []
        return Series(
            columns=tuple(columns),
            timestamps=stamps,
            values=values,
            source=str(path),
            lines=lines,
            missing=missing,
            malformed=errors.count,
            errors=tuple(errors.messages),
            segments=tuple(int(s) for s in starts) or (0,),
            sensors=tuple(names[sensor[s]] for s in starts),
            duplicates=int(repeat.sum()),
        )


def _read_json_lines(path: Path, columns: Sequence[str], body: Iterator[str], lineno: int, limit: int | None,
                     errors: _Malformed) -> Series:
    # the daemon's parser: a reading means the same offline and online
    parser = MessageParser(columns)
    rows = _Rows(len(parser.columns))
    add_sensor, add_stamp, add_values = rows.sensor.append, rows.stamps.append, rows.values.extend
    parse, parse_object, sensor_id = parser.parse, parser.parse_object, rows.sensor_id
    lines = missing = 0
    for line in body:
        lineno += 1
        if line.isspace():
            continue
        if limit is not None and lines >= limit:
            break
        lines += 1
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            obj = None
        if isinstance(obj, dict):
            sensor = obj.get("sensor")
            if sensor is None or sensor == "":
                sensor = DEFAULT_SENSOR  # as a message without a key
            elif not isinstance(sensor, str):
                errors.add(lineno, f'"sensor" must be a string, got {str(sensor)[:40]!r}')
                continue
            reading = parse_object(sensor, obj)
        else:  # not a JSON object: the daemon says what it is ('?' is missing, bad JSON is invalid)
            reading = parse(None, line.encode("utf-8", "surrogateescape"))
        if reading is MISSING:
            missing += 1
        elif isinstance(reading, Invalid):
            errors.add(lineno, reading.reason)
        elif not isinstance(reading, Reading):
            errors.add(lineno, "a UCI header line is not a reading")
        elif reading.timestamp is None:
            errors.add(lineno, "no timestamp: offline readings need one")
        else:
            try:
                ident = sensor_id(reading.sensor)
            except RecordError as exc:
                errors.add(lineno, str(exc))
                continue
            add_sensor(ident)
            add_stamp(int(reading.timestamp))
            add_values(reading.values)
    return rows.series(parser.columns, path, lines, missing, errors)


def _read_csv(path: Path, columns: Sequence[str], first: str, body: Iterator[str], lineno: int, limit: int | None,
              errors: _Malformed, time_column: str | None, sensor_column: str | None) -> Series:
    delimiter = ";" if first.count(";") > first.count(",") else ","
    names = [n.strip().strip('"') for n in next(csv.reader([first], delimiter=delimiter, skipinitialspace=True))]
    has = f"the file has: {', '.join(names)}"
    if time_column is None:
        time_column = next((n for n in names if n.lower() in _TIME_NAMES), None)
        if time_column is None:
            raise RecordError(f"{path}: no time column (named {', '.join(_TIME_NAMES[:-1])} or {_TIME_NAMES[-1]}); "
                              f"{has} (set data.time_column)")
    elif time_column not in names:
        raise RecordError(f"{path}: no time column {time_column!r}; {has}")
    if sensor_column is None:
        sensor_column = next((n for n in names if n.lower() == "sensor"), None)
    elif sensor_column not in names:
        raise RecordError(f"{path}: no sensor column {sensor_column!r}; {has}")
    unknown = [c for c in columns if c not in names]
    if unknown:
        raise RecordError(f"{path}: no column(s) {', '.join(unknown)}; {has}")
    used = [(names.index(c), c) for c in columns]
    t = names.index(time_column)
    s = None if sensor_column is None else names.index(sensor_column)
    n_fields = len(names)
    rows = _Rows(len(columns))
    add_sensor, add_stamp, add_values = rows.sensor.append, rows.stamps.append, rows.values.extend
    sensor_id = rows.sensor_id
    default = sensor_id(DEFAULT_SENSOR) if s is None else None
    times: dict[str, int] = {}  # a fleet's sensors share their times
    reader = csv.reader(body, delimiter=delimiter, skipinitialspace=True)
    lines = missing = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:  # a field over csv's size limit, say
            row = exc
        here = lineno + reader.line_num
        if not row or len(row) == 1 and not row[0].strip():
            continue  # a blank line
        if limit is not None and lines >= limit:
            break
        lines += 1
        try:
            if isinstance(row, csv.Error):
                raise RecordError(f"unreadable CSV ({row})")
            if len(row) != n_fields:
                raise RecordError(f"expected {n_fields} fields separated by {delimiter!r}, got {len(row)}")
            values = []
            for i, name in used:
                try:
                    values.append(_finite(row[i]))  # float() takes surrounding blanks
                except RecordError as exc:
                    if row[i].strip().lower() in _NO_VALUE:
                        break
                    raise RecordError(f"{exc} in column {name}") from None
            else:
                text = row[t].strip()
                stamp = times.get(text)
                if stamp is None:
                    stamp = _csv_time(text, time_column)
                    if len(text) <= 40:  # a padded field must not pin memory
                        if len(times) >= _CACHE_LIMIT:
                            times.clear()
                        times[text] = stamp
                ident = default if s is None else sensor_id(row[s].strip() or DEFAULT_SENSOR)
                add_sensor(ident)
                add_stamp(stamp)
                add_values(values)
                continue
            missing += 1
        except RecordError as exc:
            if isinstance(row, list) and [f.strip() for f in row] == names:
                lines -= 1  # the header again, where files were concatenated
                continue
            errors.add(here, str(exc))
    if default is not None and not rows.stamps:
        rows.ids.clear()  # no readings, no sensor
    return rows.series(columns, path, lines, missing, errors)


def _csv_time(text: str, column: str) -> int:
    """Seconds since 1970 of an ISO-8601 time (UTC if it has a zone, else wall clock) or of epoch seconds."""
    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = _json_time(text)[0]
        except RecordError:
            raise RecordError(f"bad time {text[:40]!r} in column {column} "
                              "(expected ISO-8601 or epoch seconds)") from None
    if not _EARLIEST <= seconds <= _LATEST:  # NaN too; epoch milliseconds land here
        raise RecordError(f"time {text[:40]!r} in column {column} is out of range: only years "
                          f"{_EARLIEST_YEAR} to {_LATEST_YEAR} (epoch times are in seconds)")
    return int(seconds)


DEFAULT_SENSOR = "default"  # the sensor of a message without a key
MAX_KEY_BYTES = 1024  # a longer key is refused: a forecast carries its sensor's id four times


@dataclass(frozen=True, slots=True)
class OutRecord:
    """A message to publish: a prediction, a dead letter or a refill checkpoint."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    partition: int | None = None  # None: chosen from the key


@dataclass(frozen=True, slots=True)
class Reading:
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

    def parse(self, key: bytes | None, value: bytes | None):
        sensor = key.decode("utf-8", "backslashreplace") if key else DEFAULT_SENSOR
        if len(key or b"") > MAX_KEY_BYTES:
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
                reading = self._number(sensor, text)
        except RecordError as exc:
            return Invalid(sensor, str(exc))
        except Exception as exc:  # noqa: BLE001 (whatever a message does, it must not stop the daemon)
            return Invalid(sensor, f"unreadable message ({type(exc).__name__}: {str(exc)[:80]})")
        if isinstance(reading, Reading) and reading.timestamp is not None \
                and not _EARLIEST <= reading.timestamp <= _LATEST:
            # its forecast's time (a minute or a day later) must still be a date
            return Invalid(sensor, f"timestamp out of range: only years {_EARLIEST_YEAR} to {_LATEST_YEAR}")
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
                and not _EARLIEST <= reading.timestamp <= _LATEST:
            return Invalid(sensor, f"timestamp out of range: only years {_EARLIEST_YEAR} to {_LATEST_YEAR}")
        return reading

    def _line(self, sensor: str, text: str):
        if UciLineParser.is_header(text):
            return HEADER
        if self._uci is None:
            raise RecordError(f"UCI lines carry only the columns {', '.join(UCI_COLUMNS)}")
        reading = self._uci.parse(text)
        if reading is MISSING:
            return MISSING
        return Reading(sensor, reading[1], float(reading[0]))

    def _number(self, sensor: str, text: str):
        if len(self.columns) != 1:
            raise RecordError(f"a bare number is one value, but {len(self.columns)} columns are configured")
        return Reading(sensor, [_finite(text)], None)

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
            parsed.append(_finite(v))
        timestamp, aware = _json_time(obj.get("timestamp"))
        return Reading(sensor, parsed, timestamp, aware)


def _finite(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise RecordError(f"bad number {str(value)[:40]!r}") from None
    if not math.isfinite(number):
        raise RecordError(f"non-finite number {str(value)[:40]!r}")
    if abs(number) > _LARGEST:
        raise RecordError(f"number {str(value)[:40]!r} is out of range")
    return number


def _json_time(value) -> tuple[float | None, bool]:
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


_EARLIEST_YEAR, _LATEST_YEAR = 1000, 9000  # room on both sides for any forecast interval and time zone
_EARLIEST = (dt.datetime(_EARLIEST_YEAR, 1, 1) - dt.datetime(1970, 1, 1)).total_seconds()
_LATEST = (dt.datetime(_LATEST_YEAR + 1, 1, 1) - dt.datetime(1970, 1, 1)).total_seconds() - 1


@functools.lru_cache(maxsize=4096)  # a fleet's sensors share the minutes they report
def format_time(seconds: float, aware: bool) -> str:
    """ISO-8601 of a reading's time: with a zone (UTC) if the input had one."""
    stamp = dt.datetime.fromtimestamp(seconds, dt.timezone.utc)
    text = stamp.strftime("%Y-%m-%dT%H:%M:%S")
    return text + "Z" if aware else text


_quote = json.encoder.encode_basestring_ascii  # what json.dumps uses for strings (in C)


def encode_prediction(
    ident: str,
    sensor: str,
    timestamp: str | None,
    prediction: Sequence[float],
    targets: Sequence[str],
    model_version: str | None,
    partition: int,
    offset: int,
    bounds: tuple[Sequence[float], Sequence[float]] | None = None,
) -> bytes:
    """The JSON value of a prediction message, in the data's own units (null where not finite).

    With ``bounds`` (lower, upper) the prediction interval goes along as
    ``lower`` and ``upper``. Byte for byte what ``json.dumps(...,
    separators=(",", ":"))`` writes, at a third of the cost: it runs once per
    forecast.
    """
    interval = ""
    if bounds is not None:
        interval = f',"lower":{_number(bounds[0], targets)},"upper":{_number(bounds[1], targets)}'
    return (f'{{"id":{_quote(ident)},"sensor":{_quote(sensor)},'
            f'"timestamp":{"null" if timestamp is None else _quote(timestamp)},'
            f'"prediction":{_number(prediction, targets)}{interval},'
            f'"model_version":{"null" if model_version is None else _quote(model_version)},'
            f'"source":{{"partition":{int(partition)},"offset":{int(offset)}}}}}').encode()


def _number(values: Sequence[float], targets: Sequence[str]) -> str:
    """One target: the number; several: an object per target; null where not finite."""
    numbers = [float(v) if math.isfinite(v) else None for v in values]
    if len(targets) == 1:
        return "null" if numbers[0] is None else repr(numbers[0])
    return json.dumps(dict(zip(targets, numbers)), separators=(",", ":"))
