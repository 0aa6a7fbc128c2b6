"""Produce a UCI file into the input topic: for demos, load tests and backfills."""

from __future__ import annotations

import itertools
import logging
import sys
import threading
import time
from pathlib import Path

from . import logs
from .config import KafkaConfig
from .errors import UserError
from .files import open_text
from .kafka_io import KafkaSink
from .messages import OutRecord, UciLineParser

__all__ = ["replay_file", "replay_lines"]


def replay_file(config: KafkaConfig, path: Path, sensor: str, *, rate: float | None = None, skip: int = 0,
                limit: int | None = None, stop: threading.Event | None = None, progress: bool = True) -> int:
    """Send the data lines of ``path`` (after ``skip``, at most ``limit``) keyed by ``sensor``."""
    if not Path(path).exists():
        raise UserError(f"{path}: no such file")
    with open_text(path) as f:
        total = sum(1 for line in f if _is_data(line))
    total = max(0, min(total - skip, limit if limit is not None else total))
    with open_text(path) as f:
        lines = (line.rstrip("\n") for line in f if _is_data(line))
        return replay_lines(config, itertools.islice(lines, skip, skip + total), sensor,
                            rate=rate, total=total, stop=stop, progress=progress)


def _is_data(line: str) -> bool:
    return not (UciLineParser.is_header(line) or line.isspace())


def replay_lines(config: KafkaConfig, lines, sensor: str, *, rate: float | None = None, total: int | None = None,
                 stop: threading.Event | None = None, progress: bool = True) -> int:
    stop = stop or threading.Event()
    sink = _sink(config)
    failures: list[Exception] = []
    key = sensor.encode()
    started = last_shown = time.monotonic()
    sent = 0
    try:
        for sent, line in enumerate(lines, 1):
            sink.send(OutRecord(config.input_topic, key, line.encode())).add_errback(failures.append)
            now = time.monotonic()
            if rate:
                ahead = started + sent / rate - now
                if ahead > 0 and stop.wait(ahead):  # pacing to the requested rate
                    break
            if stop.is_set():  # also when behind the rate, with no wait to notice it in
                break
            if progress and now - last_shown >= 0.2:
                _show(sent, total, now - started)
                last_shown = now
        sink.flush()
    finally:
        sink.close()
    if progress:
        _show(sent, total, time.monotonic() - started, end="\n")
    if failures:
        raise UserError(f"{len(failures)} of {sent} messages were not acknowledged: {failures[0]}")
    return sent


def _sink(config: KafkaConfig) -> KafkaSink:
    """The replay's producer; kafka-python's retry lines while it bootstraps are held back.

    The command fails in one line instead, the first error kafka-python logged
    (refused, timed out, a TLS or SASL failure) in it as the cause.
    """
    with logs.held("kafka") as records:
        try:
            return KafkaSink(config, client_id="stream-forecaster-replay")
        except UserError as exc:
            errors = [r for r in records if r.levelno >= logging.ERROR]
            cause = f" (kafka-python: {errors[0].getMessage()})" if errors else ""
            raise type(exc)(f"{exc}{cause}") from None  # the same kind: BrokerUnavailable stays one


def _show(sent: int, total: int | None, seconds: float, end: str = "") -> None:
    rate = sent / seconds if seconds > 0 else 0.0
    if total:
        filled = int(30 * sent / total)
        bar = f"[{'#' * filled}{'.' * (30 - filled)}] {sent:,}/{total:,}"
    else:
        bar = f"{sent:,}"
    print(f"\rreplay {bar} messages, {rate:,.0f}/s   ", end=end, file=sys.stderr, flush=True)
