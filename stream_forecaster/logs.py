"""Log lines, plain or JSON (one object per line, for log shippers), at the configured level.

Also keeps other libraries' start-up noise off stderr: TensorFlow's C++ lines
(:func:`quiet_native`, :func:`quiet_import`) and kafka-python's retry lines
while a one-shot command sets up a client (:func:`held`).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import sys
import tempfile
from typing import Iterator

from .config import LoggingConfig

__all__ = ["NATIVE_LEVEL", "JsonFormatter", "configure", "held", "native_min_level", "quiet_import", "quiet_native",
           "without_native_lines"]

PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# TensorFlow's C++ log threshold: 0 everything, 1 no info, 2 no warnings, 3 fatal lines only
NATIVE_LEVEL = "TF_CPP_MIN_LOG_LEVEL"
# 3, not 2: on every machine without a GPU TensorFlow logs a failed cuInit as an error; real failures
# reach us as Python exceptions, which the CLI reports in one line
_QUIET = "3"
# absl's format ("I0000 00:00:1796165398.216347    6337 port.cc:153] ...": before absl is set up the
# seconds are Unix time) and TensorFlow's older one ("2025-09-17 14:44:05.157831: I .../cudart_stub.cc:32] ...")
_NATIVE_LINE = re.compile(rb"(?:([IWEF])\d{4} [\d:.]+ +\d+ |\d{4}-\d\d-\d\d [\d:.]+: ([IWEF]) )\S+:\d+\] ")
_ABSL_NOTICE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_SEVERITIES = b"IWEF"


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message"}``, plus ``exception`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
                "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(config: LoggingConfig | None = None) -> None:
    """Send logs to stderr per ``config`` (defaults: INFO, plain; the level in any case).

    kafka-python's chatter only from WARNING: it logs every connection at INFO.
    Its warnings stay on in the daemon and the retrainer, which retry by
    themselves: they are the only record of why a broker was lost or a TLS or
    SASL handshake failed. One-shot commands hold them back with :func:`held`.
    """
    config = config or LoggingConfig()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if config.format == "json" else logging.Formatter(PLAIN))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))
    logging.captureWarnings(True)  # a library's warnings.warn() in the configured format, not as a bare line


@contextlib.contextmanager
def held(name: str) -> Iterator[list[logging.LogRecord]]:
    """The records of logger ``name`` (and its children) kept from every handler while the block runs.

    Yields the list they are collected in, for a one-shot command to fold the
    cause into its one-line error. At DEBUG they pass as usual: who debugs
    wants every line.
    """
    records: list[logging.LogRecord] = []
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        yield records
        return
    logger, keep = logging.getLogger(name), _Keep(records)
    propagate = logger.propagate
    logger.addHandler(keep)
    logger.propagate = False
    try:
        yield records
    finally:
        logger.removeHandler(keep)
        logger.propagate = propagate


class _Keep(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]):
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def quiet_native() -> None:
    """Ask TensorFlow's C++ logging for fatal lines only, unless the environment already sets a level.

    Call it before TensorFlow loads: TensorFlow reads the variable once.
    ``TF_CPP_MIN_LOG_LEVEL=0`` shows everything again.
    """
    os.environ.setdefault(NATIVE_LEVEL, _QUIET)


def native_min_level() -> int:
    """The TensorFlow log threshold the environment asks for (0, everything, when unset or unreadable)."""
    try:
        return max(0, int(os.environ.get(NATIVE_LEVEL, "0")))
    except ValueError:
        return 0


def without_native_lines(text: bytes, min_level: int) -> bytes:
    """``text`` less the native log lines below ``min_level``, as TensorFlow filters them once it is set up.

    Any other line (Python's own output, a message that is not a log line) is kept.
    """
    kept = []
    for line in text.splitlines(keepends=True):
        match = _NATIVE_LINE.match(line)
        if match:
            severity = _SEVERITIES.index(match.group(1) or match.group(2))
        elif line.startswith(_ABSL_NOTICE):
            severity = 0  # it only says where the info lines after it go
        else:
            severity = len(_SEVERITIES)
        if severity >= min_level:
            kept.append(line)
    return b"".join(kept)


def quiet_import(name: str):
    """Import ``name`` (a module that loads TensorFlow), writing its native lines only as the threshold says.

    TensorFlow's shared libraries log from their start-up code, before
    TensorFlow reads TF_CPP_MIN_LOG_LEVEL and straight to file descriptor 2;
    two of them (libtensorflow_framework and the profiler plugin) carry a
    copy of that code each, so every line comes twice. stderr is held in a
    temporary file meanwhile and written back without the lines the
    threshold drops; all of it if the import fails. Call it from the main
    thread before other threads start: another thread's stderr is held too.
    """
    level = native_min_level()
    if name in sys.modules or level == 0:
        return importlib.import_module(name)
    try:
        hold = tempfile.TemporaryFile()
    except OSError:  # no writable temporary directory: the lines stay as they come
        return importlib.import_module(name)
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to keep clean
        hold.close()
        return importlib.import_module(name)
    with hold:
        _flush_stderr()
        os.dup2(hold.fileno(), 2)
        failed = False
        try:
            module = importlib.import_module(name)
        except Exception:  # not on Ctrl-C: an interrupted import has nothing to explain
            failed = True
            raise
        finally:
            _flush_stderr()
            os.dup2(saved, 2)
            os.close(saved)
            hold.seek(0)
            text = hold.read()
            _write_stderr(text if failed else without_native_lines(text, level))
    return module


def _flush_stderr() -> None:
    with contextlib.suppress(AttributeError, OSError, ValueError):  # absent or closed
        sys.stderr.flush()


def _write_stderr(data: bytes) -> None:
    view = memoryview(data)
    with contextlib.suppress(OSError):
        while view:
            view = view[os.write(2, view):]
