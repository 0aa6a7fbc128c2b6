"""An independent Kafka client (Debian's kcat, librdkafka) produces the readings and reads the predictions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from conftest import make_forecaster, offline_forecasts, sample_lines
from daemon import DaemonProcess
from kafka_shim import KafkaShim

from stream_forecaster.config import load_config
from stream_forecaster.devbroker import DevBroker, free_port
from stream_forecaster.model import Forecaster
from stream_forecaster.store import ModelStore
from stream_forecaster.topics import ensure_topics

L = 6
KCAT = shutil.which("kcat") or shutil.which("kafkacat")
pytestmark = pytest.mark.skipif(KCAT is None and not os.environ.get("CI"),
                                reason="kcat is not installed (./dev test installs it: apt-get install kcat)")


@pytest.fixture
def shimmed_broker(tmp_path):
    port = free_port()
    with DevBroker(advertised=f"127.0.0.1:{port}") as broker:
        shim = KafkaShim((broker.host, broker.port), port)
        yield f"127.0.0.1:{port}"
        shim.close()


def kcat(*args, input=None, timeout=60):
    assert KCAT, "kcat is required in CI: apt-get install kcat"
    result = subprocess.run([KCAT, *args], input=input, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout


# Java and librdkafka producers often compress; without the codecs kafka-python's fetcher spins on such a batch
CODECS = ("none", "snappy", "lz4", "zstd")


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_kcat_produces_readings_in_every_codec_and_reads_predictions(shimmed_broker, tmp_path, client):
    store = ModelStore(tmp_path / "models")
    store.publish(make_forecaster(sequence_length=L).save)
    overrides = [f"kafka.bootstrap_servers={shimmed_broker}", "kafka.input_topic=readings",
                 "kafka.output_topic=predictions", "kafka.group_id=kcat-test", "kafka.session_timeout_ms=6000",
                 f"model_store.path={store.path}", "model.sequence_length=6", "data.features=[Global_active_power]",
                 "model.layers=[1, 8, 1]", f"kafka.client={client}"]
    config = load_config(None, overrides, environ={})
    ensure_topics(config.kafka, ["readings", "predictions"], partitions=2)
    lines = {}
    for codec in CODECS:  # each codec's batches carry their own sensors
        here = {f"{codec}-meter-1": sample_lines(12), f"{codec}-meter-2": sample_lines(9, start=3000)}
        payload = "".join(f"{sensor}#{line}\n" for sensor, ls in here.items() for line in ls)
        kcat("-P", "-b", shimmed_broker, "-t", "readings", "-K", "#", "-z", codec, input=payload)
        lines.update(here)

    daemon = DaemonProcess(overrides, tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        expected = sum(len(ls) - (L - 1) + 1 for ls in lines.values())
        out = kcat("-C", "-b", shimmed_broker, "-t", "predictions", "-c", str(expected), "-f", "%k\t%s\n",
                   timeout=120)
    finally:
        assert daemon.terminate() == 0
        daemon.close()
    received = [line.split("\t", 1) for line in out.splitlines()]
    assert len(received) == expected
    forecaster = Forecaster.load(store.directory("1"), "1")
    for sensor, ls in lines.items():
        got = sorted((json.loads(v) for k, v in received if k == sensor), key=lambda p: p["source"]["offset"])
        _, expected = offline_forecasts(forecaster, ls)
        np.testing.assert_allclose([p["prediction"] for p in got], expected[:, 0], rtol=1e-5)
        assert all(p["sensor"] == sensor for p in got)
