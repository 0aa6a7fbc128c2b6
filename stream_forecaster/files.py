"""Offline data files: UCI, CSV and JSON lines, plain, ``.gz`` or ``.zip``, read into a :class:`Series`.

The readings are parsed by the daemon's own parsers
(:mod:`stream_forecaster.messages`), so a reading means the same thing in a
training file and on the topic. Anything that does not parse is *malformed*
and raises :class:`~stream_forecaster.messages.RecordError` with the file,
line and reason (or is counted and skipped with ``on_error="skip"``).
"""

from __future__ import annotations

import array
import contextlib
import csv
import dataclasses
import datetime as dt
import gzip
import io
import json
import math
import os
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Sequence

import numpy as np

from .messages import (
    CACHE_LIMIT,
    DEFAULT_SENSOR,
    EARLIEST,
    EARLIEST_YEAR,
    LATEST,
    LATEST_YEAR,
    MAX_KEY_BYTES,
    MISSING,
    Invalid,
    MessageParser,
    Reading,
    RecordError,
    UciLineParser,
    parse_iso_time,
    parse_number,
)

__all__ = ["SAMPLE_PATH", "Series", "iso_time", "open_text", "read_series", "read_uci", "strict_json"]

# Four weeks of the real data set, 16/12/2006 17:24 onward (see data/README.md).
SAMPLE_PATH = Path(__file__).with_name("data") / "household_power_sample.txt.gz"

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
    text: dict = dict(encoding="utf-8-sig", errors="surrogateescape", newline=None)  # -sig: spreadsheets write a BOM
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
            if not isinstance(reading, tuple):  # MISSING
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
        starts = np.flatnonzero(np.concatenate([[True], sensor[1:] != sensor[:-1]])) if len(sensor) else np.empty(0)
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
    default = sensor_id(DEFAULT_SENSOR) if s is None else -1  # -1: every row names its sensor
    times: dict[str, int] = {}  # a fleet's sensors share their times
    reader = csv.reader(body, delimiter=delimiter, skipinitialspace=True)
    lines = missing = 0
    while True:
        unreadable: csv.Error | None = None
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:  # a field over csv's size limit, say
            row, unreadable = [], exc
        here = lineno + reader.line_num
        if unreadable is None and (not row or len(row) == 1 and not row[0].strip()):
            continue  # a blank line
        if limit is not None and lines >= limit:
            break
        lines += 1
        try:
            if unreadable is not None:
                raise RecordError(f"unreadable CSV ({unreadable})")
            if len(row) != n_fields:
                raise RecordError(f"expected {n_fields} fields separated by {delimiter!r}, got {len(row)}")
            values = []
            for i, name in used:
                try:
                    values.append(parse_number(row[i]))  # float() takes surrounding blanks
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
                        if len(times) >= CACHE_LIMIT:
                            times.clear()
                        times[text] = stamp
                ident = default if s is None else sensor_id(row[s].strip() or DEFAULT_SENSOR)
                add_sensor(ident)
                add_stamp(stamp)
                add_values(values)
                continue
            missing += 1
        except RecordError as exc:
            if [f.strip() for f in row] == names:
                lines -= 1  # the header again, where files were concatenated
                continue
            errors.add(here, str(exc))
    if s is None and not rows.stamps:
        rows.ids.clear()  # no readings, no sensor
    return rows.series(columns, path, lines, missing, errors)


def _csv_time(text: str, column: str) -> int:
    """Seconds since 1970 of an ISO-8601 time (UTC if it has a zone, else wall clock) or of epoch seconds."""
    try:
        seconds: float | None = float(text)
    except ValueError:
        try:
            seconds = parse_iso_time(text)[0]
        except RecordError:
            raise RecordError(f"bad time {text[:40]!r} in column {column} "
                              "(expected ISO-8601 or epoch seconds)") from None
    if seconds is None or not EARLIEST <= seconds <= LATEST:  # NaN too; epoch milliseconds land here
        raise RecordError(f"time {text[:40]!r} in column {column} is out of range: only years "
                          f"{EARLIEST_YEAR} to {LATEST_YEAR} (epoch times are in seconds)")
    return int(seconds)
