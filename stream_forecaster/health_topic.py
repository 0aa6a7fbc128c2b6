"""The health topic read back: each sensor's latest health record, for ``stream-forecaster health`` and the
retrainer's skill trigger.

Written by the daemon (:meth:`stream_forecaster.pipeline.Pipeline.health_report`);
read here through the configured Kafka client, outside any consumer group.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

from .clients import kafka_client
from .config import KafkaConfig
from .errors import UserError
from .seams import Record
from .state_topic import StateLog

__all__ = ["HealthView", "fleet_median_skill", "open_log", "read_health", "recent", "skill_of", "worst"]


def open_log(config: KafkaConfig) -> StateLog:
    """A reading-only :class:`~stream_forecaster.state_topic.StateLog` of the client ``kafka.client`` names."""
    return kafka_client(config).state_log(config)


class HealthView:
    """The latest health record of every sensor in ``kafka.health_topic``; each :meth:`refresh` reads only what
    was written since the one before (records that are not health records, written by someone else, are left
    out)."""

    def __init__(self, config: KafkaConfig, log: StateLog | None = None):
        if not config.health_topic:
            raise UserError("kafka.health_topic is not set: the daemons write no health records (set it, e.g. "
                            "--set kafka.health_topic=sensor-health, for the daemons and for this command)")
        self.topic, self._config, self._log = config.health_topic, config, log
        self.records: dict[str, dict[str, Any]] = {}
        self._next: dict[int, int] = {}  # per partition, the offset to read from next

    def refresh(self) -> dict[str, dict[str, Any]]:
        log = self._log = self._log or open_log(self._config)
        partitions = log.partitions(self.topic)
        if not partitions:
            raise UserError(f"the health topic {self.topic!r} does not exist yet: a daemon with "
                            "kafka.health_topic set creates it and writes every metrics.health_interval")
        for partition in range(partitions):
            first, end = log.offsets(self.topic, partition)
            start = self._next.get(partition, first)
            if not first <= start <= end:  # compacted past what was read, or a topic made anew: read it again
                start = first
            for record in log.read(self.topic, partition, start, end):
                self._take(record)
            self._next[partition] = max(start, end)
        return self.records

    def _take(self, record: Record) -> None:
        if record.value is None:  # a tombstone: the sensor is gone
            self.records.pop((record.key or b"").decode("utf-8", "replace"), None)
            return
        try:
            value = json.loads(record.value)
        except ValueError:
            return
        if isinstance(value, dict) and isinstance(value.get("sensor"), str):
            self.records[value["sensor"]] = value


def read_health(config: KafkaConfig, log: StateLog | None = None) -> dict[str, dict[str, Any]]:
    """``{sensor: its latest health record}`` of ``kafka.health_topic``."""
    return HealthView(config, log).refresh()


def skill_of(record: dict[str, Any]) -> float:
    """A health record's skill: its worst target's (NaN when unknown)."""
    skill = record.get("skill")
    values = list(skill.values()) if isinstance(skill, dict) else [skill]
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return min(numbers) if numbers and len(numbers) == len(values) else math.nan


def worst(health: dict[str, dict[str, Any]], n: int, min_scored: int = 1) -> list[dict[str, Any]]:
    """The ``n`` records of lowest skill among sensors with at least ``min_scored`` scored forecasts; sensors whose
    skill is unknown come last."""
    counted = [r for r in health.values() if int(r.get("scored") or 0) >= min_scored]
    counted.sort(key=lambda r: (math.isnan(skill_of(r)), skill_of(r), r["sensor"]))
    return counted[:n]


def fleet_median_skill(health: dict[str, dict[str, Any]], min_scored: int) -> tuple[float, int]:
    """The median skill of the sensors with at least ``min_scored`` scored forecasts, and how many they are."""
    skills = sorted(s for s in (skill_of(r) for r in health.values() if int(r.get("scored") or 0) >= min_scored)
                    if not math.isnan(s))
    if not skills:
        return math.nan, 0
    middle = len(skills) // 2
    median = skills[middle] if len(skills) % 2 else (skills[middle - 1] + skills[middle]) / 2
    return median, len(skills)


def recent(health: dict[str, dict[str, Any]], span_s: float) -> dict[str, dict[str, Any]]:
    """The records written within ``span_s`` of the newest: the latest rounds, without sensors no daemon reports
    any more (evicted, retired) whose last record stays in the compacted topic."""
    def written(record) -> float:
        try:
            return dt.datetime.fromisoformat(str(record.get("at")).replace("Z", "+00:00")).timestamp()
        except ValueError:
            return math.nan

    at = {sensor: written(r) for sensor, r in health.items()}
    newest = max((t for t in at.values() if not math.isnan(t)), default=math.nan)
    return {sensor: r for sensor, r in health.items() if at[sensor] >= newest - span_s}
