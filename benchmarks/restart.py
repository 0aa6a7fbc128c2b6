"""Benchmark: restart-to-ready at fleet size, and the first forecasts after it.

    python benchmarks/restart.py [--sensors 1000 10000 100000] [--partitions 4] [--snapshot-age 5]

For each fleet size a topic of ``--partitions`` partitions holds one full window
(``sequence_length - 1`` minutes) of every sensor, committed for the daemon's
group with the checkpoint a running daemon writes. With ``--snapshot-age N`` the
checkpoint also names a snapshot of every window taken N minutes before the
end, as the daemon writes every ``window.snapshot_interval``; with 0 there is
none and the refill replays every window's readings. The snapshot is made with
the daemon's own code (``Pipeline.refill`` over the topic's readings, then
``StateTopic.write_snapshot``) rather than by a first daemon, so that the
100,000 sensor case does not first spend many minutes forecasting the windows
it then refills; the tests check that a daemon's own checkpoints refill the same
way. A daemon process (default configuration and model shape) is then started,
as after kill -9 or a deploy, and timed:

- ready: from the process start to ``/readyz`` answering 200 (TensorFlow's import
  and the model's load and warm-up included), and the refill itself (its log lines);
- continued: one more reading of every sensor is produced and timed until every
  sensor's forecast is published: after a refill no sensor waits for a window.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kafka import KafkaConsumer, TopicPartition  # noqa: E402
from kafka.structs import OffsetAndMetadata  # noqa: E402
from throughput import default_forecaster  # noqa: E402

from stream_forecaster.config import load_config  # noqa: E402
from stream_forecaster.devbroker import DevBroker, free_port  # noqa: E402
from stream_forecaster.files import SAMPLE_PATH, open_text  # noqa: E402
from stream_forecaster.kafka_compat import client_settings  # noqa: E402
from stream_forecaster.kafka_io import KafkaSink, KafkaSource, kafka_checkpoints  # noqa: E402
from stream_forecaster.messages import OutRecord  # noqa: E402
from stream_forecaster.metrics import Metrics, scrape  # noqa: E402
from stream_forecaster.pipeline import Pipeline  # noqa: E402
from stream_forecaster.recovery import Checkpoint  # noqa: E402
from stream_forecaster.store import ModelStore  # noqa: E402
from stream_forecaster.topics import ensure_topics  # noqa: E402


def produce(config, keys, lines, minutes: range, ends: dict[int, int]) -> float:
    """Every sensor's readings for ``minutes``, minute by minute as a fleet reports; returns seconds taken.

    ``ends`` is kept at each partition's next offset, from the acknowledgements: the development broker's
    end offsets can lag the last records written.
    """
    started = time.monotonic()
    sink = KafkaSink(config.kafka, client_id="benchmark")
    # each sensor reads consecutive minutes of the sample from its own start, never wrapping back in time
    starts = [(s * 7) % (len(lines) - 100) for s in range(len(keys))]
    records = (OutRecord(config.kafka.input_topic, key, lines[start + minute])
               for minute in minutes for start, key in zip(starts, keys))
    while True:
        futures = [sink.send(record) for record in itertools.islice(records, 100_000)]
        if not futures:
            break
        sink.flush()
        for future in futures:
            written = future.get(timeout=60)
            ends[written.partition] = max(ends.get(written.partition, 0), written.offset + 1)
    sink.close()
    return time.monotonic() - started


def snapshot_as_a_daemon_would(config, forecaster, upto: dict[int, int]) -> tuple[dict[int, dict], float]:
    """Each partition's windows up to ``upto``, built by the pipeline's refill and saved as the daemon saves them;
    where they lie, and the seconds taken to save them all."""
    pipeline = Pipeline(config, forecaster, None, Metrics(forecaster.targets))
    source, sink = KafkaSource(config.kafka, group_id="benchmark-snapshot"), KafkaSink(config.kafka)
    try:
        store = kafka_checkpoints(config.kafka, sink)
        refs, seconds = {}, 0.0
        for partition, offset in upto.items():
            pipeline.refill(partition, source.read_range(partition, 0, offset, threading.Event()))
            started = time.monotonic()  # what the daemon's loop spends on it every window.snapshot_interval
            refs[partition] = store.write_snapshot(partition, offset, pipeline.snapshot(partition))
            seconds += time.monotonic() - started
            pipeline.drop_partitions({partition})
        return refs, seconds
    finally:
        source.close()
        sink.close()


def commit_as_a_daemon_would(config, ends: dict[int, int], snapshots: dict[int, dict]) -> None:
    """Checkpoint and commit each partition's end for the daemon's group, its refill starting at the partition's
    first reading, or at its snapshot."""
    consumer = KafkaConsumer(group_id=config.kafka.group_id, enable_auto_commit=False,
                             **client_settings(config.kafka, "benchmark-commit"))
    sink = KafkaSink(config.kafka, client_id="benchmark")
    try:
        kafka_checkpoints(config.kafka, sink).write(
            {p: Checkpoint(end, 0, (), snapshots.get(p)).encode(None) for p, end in ends.items()}, threading.Event())
        consumer.commit({TopicPartition(config.kafka.input_topic, p): OffsetAndMetadata(end, "", -1)
                         for p, end in ends.items()})
    finally:
        sink.close()
        consumer.close(autocommit=False)


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def run(broker, store_path: Path, sensors: int, partitions: int, snapshot_age: int, workdir: Path) -> dict:
    tag = f"s{sensors}-{time.monotonic_ns()}"
    port = free_port()
    overrides = [f"kafka.bootstrap_servers={broker.address}", f"kafka.input_topic=in-{tag}",
                 f"kafka.output_topic=out-{tag}", f"kafka.group_id=g-{tag}", "kafka.session_timeout_ms=6000",
                 f"model_store.path={store_path}", f"metrics.port={port}"]
    config = load_config(None, overrides, environ={})
    ensure_topics(config.kafka, [config.kafka.input_topic, config.kafka.output_topic], partitions=partitions)
    with open_text(SAMPLE_PATH) as f:
        next(f)
        lines = [line.rstrip("\n").encode() for line in f if "?" not in line]
    keys = [f"sensor-{i}".encode() for i in range(sensors)]
    window = config.model.sequence_length - 1
    taken, ends = max(0, window - snapshot_age), {}
    produce_s = produce(config, keys, lines, range(taken), ends)
    snapshots, snapshot_s = {}, None
    if snapshot_age:
        snapshots, snapshot_s = snapshot_as_a_daemon_would(config, default_forecaster(config), dict(ends))
    produce_s += produce(config, keys, lines, range(taken, window), ends)
    commit_as_a_daemon_would(config, ends, snapshots)

    args = [sys.executable, "-m", "stream_forecaster.cli", "run"]
    for o in overrides:
        args += ["--set", o]
    log_path = workdir / f"daemon-{sensors}.log"
    with open(log_path, "wb") as log:
        started = time.monotonic()
        daemon = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            while not ready(port):
                if daemon.poll() is not None or time.monotonic() - started > 1800:
                    raise SystemExit(f"the daemon did not get ready; see {log_path}")
                time.sleep(0.1)
            ready_s = time.monotonic() - started
            m = scrape(f"http://127.0.0.1:{port}/metrics")
            refilled, active = m["stream_forecaster_rebuilt_readings_total"], m["stream_forecaster_active_sensors"]
            produced = time.monotonic()
            produce(config, keys, lines, range(window, window + 1), {})
            while scrape(f"http://127.0.0.1:{port}/metrics").get("stream_forecaster_predictions_total", 0) < sensors:
                if daemon.poll() is not None or time.monotonic() - produced > 1800:
                    raise SystemExit(f"the daemon did not forecast every sensor; see {log_path}")
                time.sleep(0.2)
            continued_s = time.monotonic() - produced
        finally:
            daemon.terminate()
            daemon.wait(120)
    text = log_path.read_text(errors="replace")
    refill_s = sum(float(s) for s in re.findall(r"windows refilled from .* in ([\d.]+) s", text))
    return {"sensors": sensors, "partitions": partitions, "snapshot_age_minutes": snapshot_age,
            "readings_in_windows": sum(ends.values()), "snapshot_write_s": snapshot_s,
            "snapshot_bytes": sum(r["bytes"] for r in snapshots.values() if r),
            "produce_s": produce_s, "ready_s": ready_s, "refill_s": refill_s, "refilled": refilled,
            "refill_per_s": refilled / refill_s if refill_s else None, "active_sensors": active,
            "all_forecast_s": continued_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sensors", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--snapshot-age", type=int, nargs="+", default=[0, 5],
                        help="minutes between the snapshot and the restart; 0: no snapshot")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp, DevBroker() as broker:
        store = ModelStore(Path(tmp) / "models")
        store.publish(default_forecaster(load_config(None, environ={})).save)
        for sensors, age in itertools.product(args.sensors, args.snapshot_age):
            result = run(broker, store.path, sensors, args.partitions, age, Path(tmp))
            results.append(result)
            if not args.json:
                how = (f"snapshot {age} min old ({result['snapshot_bytes'] / 1e6:.0f} MB, written in "
                       f"{result['snapshot_write_s']:.1f} s)") if age else "no snapshot"
                print(f"{sensors:>7} sensors, {how}: {result['readings_in_windows']:,} readings in windows; ready "
                      f"{result['ready_s']:.1f} s after start (refill {result['refill_s']:.1f} s, "
                      f"{(result['refill_per_s'] or 0):,.0f} readings/s, {result['active_sensors']:,.0f} sensors); "
                      f"every sensor forecast {result['all_forecast_s']:.1f} s after its next reading was sent",
                      flush=True)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
