"""Benchmark: reading-to-published latency before, during and after a hot model swap.

    python benchmarks/swap.py [--rate 1000] [--sensors 100] [--seconds 30]

A daemon (a real process, default model) serves a steady load from this script;
a third of the way in a new model version is published to the store. Latency of
each prediction = its Kafka timestamp (set when the daemon published it) minus
its reading's Kafka timestamp. "During" runs from the publish to one second
after the first prediction made by the new version; the swap time is from the
publish to that first prediction.

``steady_load(..., serve="echo")`` runs, instead of the daemon, a bare relay
through the same broker with the daemon's Kafka settings: poll, republish each
reading at once, wait for the acknowledgements, commit. Its latency is the floor
that the broker and kafka-python set, before any window or model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from throughput import default_forecaster  # noqa: E402

from stream_forecaster.config import load_config  # noqa: E402
from stream_forecaster.devbroker import DevBroker, free_port  # noqa: E402
from stream_forecaster.files import SAMPLE_PATH, open_text  # noqa: E402
from stream_forecaster.kafka_io import KafkaSink, KafkaSource  # noqa: E402
from stream_forecaster.messages import OutRecord  # noqa: E402
from stream_forecaster.metrics import scrape  # noqa: E402
from stream_forecaster.store import ModelStore  # noqa: E402
from stream_forecaster.topics import ensure_topics, read_topic  # noqa: E402


def echo(overrides: list[str]) -> None:
    """The relay of ``steady_load(serve="echo")``: the daemon's loop without windows or model."""
    config = load_config(None, overrides, environ={})
    source, sink = KafkaSource(config.kafka), KafkaSink(config.kafka, client_id="echo")
    while True:
        records = source.poll(0.5, config.kafka.max_poll_records)
        if source.take_changes()[1]:
            print("ready", flush=True)
        sink.publish(OutRecord(config.kafka.output_topic, r.key, json.dumps(
            {"source": {"partition": r.partition, "offset": r.offset}, "model_version": "echo"}).encode())
            for r in records)
        offsets: dict[tuple[str, int], int] = {}
        for r in records:
            offsets[(r.topic, r.partition)] = max(offsets.get((r.topic, r.partition), 0), r.offset + 1)
        source.commit(offsets)


def steady_load(rate: float, sensors: int, seconds: float, swap_at: float | None = None, serve: str = "daemon",
                client: str = "kafka-python"):
    """Serve a paced load through a daemon process on ``client`` (or the bare relay, ``serve="echo"``); returns
    [(publish ms, latency ms, version)] and the time (s since the epoch) a new version was published,
    if ``swap_at`` (a fraction of the run)."""
    with tempfile.TemporaryDirectory() as tmp, DevBroker() as broker:
        store = ModelStore(Path(tmp) / "models")
        base = load_config(None, environ={})
        store.publish(default_forecaster(base).save)
        port = free_port()
        overrides = [f"kafka.bootstrap_servers={broker.address}", "kafka.session_timeout_ms=6000",
                     f"model_store.path={store.path}", "model_store.poll_interval=1s", f"metrics.port={port}",
                     f"kafka.client={client}"]
        config = load_config(None, overrides, environ={})
        ensure_topics(config.kafka, [config.kafka.input_topic, config.kafka.output_topic], partitions=3)
        cmd = ([sys.executable, "-m", "stream_forecaster.cli", "run"] + sum((["--set", o] for o in overrides), [])
               if serve == "daemon" else [sys.executable, __file__, "--echo", *overrides])
        log = Path(tmp) / "daemon.log"
        daemon = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            while not _ready(serve, port, log):
                if daemon.poll() is not None:
                    raise SystemExit(f"the {serve} process exited: {log.read_text()[-2000:]}")
                time.sleep(0.1)  # polling for readiness
            with open_text(SAMPLE_PATH) as f:
                next(f)
                lines = [line.rstrip("\n").encode() for line in f if "?" not in line]
            sink = KafkaSink(config.kafka, client_id="latency-benchmark")
            futures, publish_at = [], None
            keys = [f"sensor-{i}".encode() for i in range(sensors)]
            total = int(rate * seconds)
            start = time.monotonic()
            for i in range(total):
                record = OutRecord(config.kafka.input_topic, keys[i % sensors], lines[(i // sensors) % len(lines)])
                futures.append(sink.send(record))
                if swap_at is not None and publish_at is None and i >= total * swap_at:
                    publish_at = time.time()
                    new = default_forecaster(base.replace("model", seed=99))
                    threading.Thread(target=store.publish, args=(new.save,)).start()
                ahead = start + (i + 1) / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)  # pacing the offered load
            sink.flush()
            sent = {}
            for f in futures:
                m = f.get(timeout=30)
                sent[(m.partition, m.offset)] = m.timestamp
            sink.close()
            expected = total - (sensors * (base.model.sequence_length - 2) if serve == "daemon" else 0)
            got = []
            for record in read_topic(config.kafka, config.kafka.output_topic, threading.Event(), idle_s=30):
                p = json.loads(record.value)
                got.append((record.timestamp,
                            record.timestamp - sent[(p["source"]["partition"], p["source"]["offset"])],
                            p["model_version"]))
                if len(got) >= expected:
                    break
        finally:
            daemon.terminate()
            daemon.wait(60)
    got.sort()
    return got, publish_at


def _ready(serve: str, port: int, log: Path) -> bool:
    if serve == "echo":
        return "ready" in log.read_text()
    try:
        return scrape(f"http://127.0.0.1:{port}/metrics").get("stream_forecaster_ready") == 1
    except OSError:
        return False


def main() -> None:
    if sys.argv[1:2] == ["--echo"]:
        return echo(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--sensors", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    got, publish_at = steady_load(args.rate, args.sensors, args.seconds, swap_at=1 / 3)
    first_new = next(t for t, _, v in got if v == "2")
    publish_ms = publish_at * 1000
    phases = {"before": [l for t, l, _ in got if t < publish_ms],
              "during": [l for t, l, _ in got if publish_ms <= t < first_new + 1000],
              "after": [l for t, l, _ in got if t >= first_new + 1000]}
    print(f"{args.rate:.0f} readings/s over {args.sensors} sensors for {args.seconds:.0f} s; {len(got):,} predictions")
    print(f"swap: first prediction by the new version {(first_new - publish_ms) / 1000:.2f} s after the publish")
    print(f"{'phase':<8} {'n':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, values in phases.items():
        v = np.array(values)
        print(f"{name:<8} {len(v):>7,} {np.percentile(v, 50):>8.1f} {np.percentile(v, 99):>8.1f} {v.max():>8.1f}")


if __name__ == "__main__":
    main()
