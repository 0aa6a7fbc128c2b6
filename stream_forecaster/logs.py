"""Log lines, plain or JSON (one object per line, for log shippers), at the configured level."""

from __future__ import annotations

import json
import logging
import sys

from .config import LoggingConfig

__all__ = ["JsonFormatter", "configure"]

PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message"}``, plus ``exception`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
                "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(config: LoggingConfig | None = None) -> None:
    """Send logs to stderr per ``config`` (defaults: INFO, plain); kafka-python's chatter only from WARNING."""
    config = config or LoggingConfig()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if config.format == "json" else logging.Formatter(PLAIN))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level)
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))  # it logs every connection at INFO
