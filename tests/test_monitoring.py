"""The monitoring path end to end: a real Prometheus scrapes the daemon during a replay and answers PromQL."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import threading
import urllib.parse
import urllib.request

import pytest
from conftest import daemon_setup, sample_lines
from daemon import DaemonProcess, wait_for

from stream_forecaster import __version__
from stream_forecaster.devbroker import free_port
from stream_forecaster.kafka_io import KafkaSink
from stream_forecaster.messages import OutRecord

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
pytestmark = pytest.mark.skipif((PROMETHEUS is None or PROMTOOL is None) and not os.environ.get("CI"),
                                reason="prometheus is not installed "
                                       "(./dev test installs it: apt-get install prometheus)")


@pytest.fixture
def daemon(broker, kafka_names, tmp_path):
    config, overrides, _ = daemon_setup(broker.address, kafka_names, tmp_path, partitions=3)
    process = DaemonProcess([*overrides, "logging.format=json", "kafka.sasl_password=hunter2"], tmp_path / "daemon.log")
    try:
        process.wait_ready()
        yield process, config
    finally:
        process.close()


class Replay(threading.Thread):
    """Readings from three sensors, about 100 a second, until stopped: a live stream for rates."""

    def __init__(self, config):
        super().__init__(daemon=True)
        self.config, self.stop = config, threading.Event()

    def run(self):
        sink = KafkaSink(self.config.kafka, client_id="replay")
        lines = sample_lines(1000)
        try:
            for i in range(3 * len(lines)):  # each house reads every minute (a forecast is scored by the next one)
                if self.stop.wait(0.03 if i % 3 == 0 else 0):
                    break
                sink.send(OutRecord(self.config.kafka.input_topic, f"house-{i % 3}".encode(), lines[i // 3].encode()))
        finally:
            sink.close()


def query(port: int, promql: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
    except OSError:
        return []  # not up yet
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_the_daemon_and_answers_for_error_and_prediction_rate(daemon, tmp_path):
    process, config = daemon
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: stream-forecaster\n    static_configs: [{{targets: ['127.0.0.1:{process.port}']}}]\n")
    prometheus = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{port}"],
                                  stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))
    replay = Replay(config)
    replay.start()
    try:
        def error_series():
            found = query(port, 'stream_forecaster_rolling_rmse{forecaster="model", target="Global_active_power"}')
            return found if found and math.isfinite(float(found[0]["value"][1])) else None

        def predicting():
            found = query(port, "sum(rate(stream_forecaster_predictions_total[5s]))")
            return found if found and float(found[0]["value"][1]) > 0 else None

        rmse = wait_for(error_series, 90, "Prometheus to hold the model's rolling RMSE", interval=0.5)
        assert rmse[0]["metric"]["job"] == "stream-forecaster" and float(rmse[0]["value"][1]) > 0
        rate = wait_for(predicting, 90, "Prometheus to see predictions being published", interval=0.5)
        assert 0 < float(rate[0]["value"][1]) < 1000
        up = query(port, 'up{job="stream-forecaster"}')
        assert [float(s["value"][1]) for s in up] == [1.0]
    finally:
        replay.stop.set()
        replay.join(30)
        prometheus.terminate()
        prometheus.wait(30)


def test_live_endpoint_passes_promtool_check_metrics(daemon):
    process, _ = daemon
    with urllib.request.urlopen(process.url + "/metrics", timeout=5) as r:
        exposition = r.read()
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=exposition, capture_output=True)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert b"stream_forecaster_model_created_timestamp_seconds" in exposition


def test_json_logs_start_with_version_model_broker_and_topics_and_no_secret(daemon):
    process, config = daemon
    lines = [json.loads(line) for line in process.output().splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    start = next(line["message"] for line in lines if "running" in line["message"])
    for fact in (__version__, "model version 1", config.kafka.bootstrap_servers[0], config.kafka.input_topic,
                 config.kafka.output_topic):
        assert fact in start
    effective = next(line["message"] for line in lines if line["message"].startswith("effective configuration"))
    assert '"sasl_password": "***"' in effective and "hunter2" not in process.output()
    # the password was given with PLAINTEXT, which sends none: the log says it is ignored
    assert any(line["level"] == "WARNING" and "kafka.sasl_password is set" in line["message"]
               and "ignored" in line["message"] for line in lines)
