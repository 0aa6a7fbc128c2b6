"""Benchmark: what the fleet features cost in CPU: anomaly judging, a shadow candidate, the health topic.

    python benchmarks/fleet_cost.py [--sensors 1000] [--per-sensor 60] [--health-sensors 1000 10000]

The pipeline alone, in process (no broker: the publishing costs are the
daemon's anyway), with the default model and untrained weights. Each variant
processes the same readings, batch by batch, after a first pass that fills the
windows; CPU is the whole process's (the forecasting threads included), so a
candidate's inference counts. Figures are CPU microseconds per reading and per
cent of one core at 1,000 readings/s; the health report, microseconds per
sensor and per cent of a core for the fleet at one report a minute.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from throughput import default_forecaster  # noqa: E402

from stream_forecaster.config import load_config  # noqa: E402
from stream_forecaster.metrics import Metrics  # noqa: E402
from stream_forecaster.model import Forecaster  # noqa: E402
from stream_forecaster.pipeline import CHUNK, Pipeline  # noqa: E402
from stream_forecaster.testing import FakeRecord  # noqa: E402

BATCH = 5000


class NullSink:
    def queue(self, records) -> None:
        pass

    def publish(self, records=(), stop=None) -> bool:
        return True

    def close(self) -> None:
        pass


def readings(sensors: int, per_sensor: int, length: int, seed: int = 0) -> list[FakeRecord]:
    """JSON readings with times, minute by minute, sensors of sizes spread over three decades."""
    rng = np.random.default_rng(seed)
    sizes = 10 ** rng.uniform(0, 3, sensors)
    out = []
    start = np.datetime64("2026-01-01T00:00:00")
    for t in range(length + per_sensor):
        stamp = str(start + np.timedelta64(t, "m"))
        values = sizes * (1 + 0.2 * np.sin(t / 30 + np.arange(sensors)) + 0.05 * rng.standard_normal(sensors))
        for s in range(sensors):
            out.append(FakeRecord("in", s % 4, len(out), f"sensor-{s}".encode(),
                                  f'{{"timestamp":"{stamp}","value":{values[s]:.4f}}}'.encode()))
    return out


def cpu_per_reading(pipeline: Pipeline, records: list, fill: int) -> float:
    """CPU µs per reading over the readings after the first ``fill`` (which only fill windows)."""
    for lo in range(0, fill, BATCH):
        pipeline.process(records[lo:min(fill, lo + BATCH)])
    started = time.process_time()
    for lo in range(fill, len(records), BATCH):
        pipeline.process(records[lo:lo + BATCH])
    return (time.process_time() - started) / (len(records) - fill) * 1e6


def build(config, forecaster: Forecaster, candidate: Forecaster | None = None) -> Pipeline:
    pipeline = Pipeline(config, forecaster, NullSink(), Metrics(forecaster.targets))
    pipeline.set_candidate(candidate)
    return pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sensors", type=int, default=1000)
    parser.add_argument("--per-sensor", type=int, default=60)
    parser.add_argument("--health-sensors", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()

    base = ["data.features=[Global_active_power]", "data.targets=[Global_active_power]", "kafka.health_topic=health"]
    config = load_config(None, base, environ={})
    forecaster = default_forecaster(config)
    band = {"quantiles": [0.005, 0.995], "lower": [-4.0], "upper": [4.0], "sigma": [1.0], "adaptation": 0.005}
    judged = forecaster.with_metadata(anomaly=band)
    candidate = default_forecaster(config).with_metadata(anomaly=band)
    for f in (forecaster, judged, candidate):
        f.warm_up(CHUNK)
    length = config.model.sequence_length - 1
    records = readings(args.sensors, args.per_sensor, length)
    fill = args.sensors * length
    results = {}
    variants = {
        "no anomaly band": (config, forecaster, None),
        "anomaly band": (config, judged, None),
        "anomaly band + anomaly topic": (config.replace("kafka", anomaly_topic="events"), judged, None),
    }
    for share in (0.1, 1.0):
        variants[f"shadow {share:.0%} of sensors"] = (config.replace("retrain", shadow_sample=share), judged,
                                                      candidate)
    for name, (cfg, serving, shadow) in variants.items():
        pipeline = build(cfg, serving, shadow)
        results[name] = cpu_per_reading(pipeline, records, fill)
        anomalies = pipeline.metrics.registry.get_sample_value("stream_forecaster_anomalies_total")
        print(f"{name:32} {results[name]:8.1f} µs CPU per reading ({anomalies / (len(records) - fill):.2%} anomalies)")
    reference = results["anomaly band"]
    for name, us in results.items():
        extra = us - reference
        print(f"{name:32} {extra:+8.1f} µs per reading against the anomaly band alone: "
              f"{extra / 10:+.1f} % of a core at 1,000 readings/s")

    health = {}
    for sensors in args.health_sensors:
        pipeline = build(config, judged)
        many = readings(sensors, 2, length, seed=1)
        for lo in range(0, len(many), BATCH):
            pipeline.process(many[lo:lo + BATCH])
        started = time.process_time()
        report = pipeline.health_report(time.time())
        us = (time.process_time() - started) / max(1, len(report)) * 1e6
        health[sensors] = us
        print(f"health report of {len(report):6d} sensors: {us:6.1f} µs CPU per sensor, "
              f"{us * sensors / 60 / 1e4:.2f} % of a core at one report a minute")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu_us_per_reading": results, "health_us_per_sensor": health},
                                              indent=2))


if __name__ == "__main__":
    main()
