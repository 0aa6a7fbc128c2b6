"""replay, broker and demo: the commands around the daemon, run for real."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading

from conftest import sample_lines, write_uci
from daemon import wait_for

from stream_forecaster.cli import main
from stream_forecaster.config import load_config
from stream_forecaster.devbroker import free_port
from stream_forecaster.topics import ensure_topics, read_topic


def test_replay_sends_each_data_line_keyed_by_sensor(broker, kafka_names, tmp_path):
    lines = sample_lines(50)
    path = write_uci(tmp_path / "d.txt", lines)
    sets = ["--set", f"kafka.bootstrap_servers={broker.address}", "--set", f"kafka.input_topic={kafka_names['input']}"]
    config = load_config(None, [s for s in sets if s != "--set"], environ={})
    ensure_topics(config.kafka, [config.kafka.input_topic])
    assert main(["replay", *sets, "--data", str(path), "--sensor", "meter-9", "--max",
                 "--skip", "10", "--limit", "30"]) == 0
    stop = threading.Event()
    got = []
    for record in read_topic(config.kafka, config.kafka.input_topic, stop, idle_s=3):
        got.append(record)
    assert [r.value.decode() for r in got] == lines[10:40]
    assert {r.key for r in got} == {b"meter-9"}


def test_broker_command_listens_and_stops_cleanly_on_ctrl_c(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "stream_forecaster.cli", "broker", "--set",
                             f"kafka.bootstrap_servers=127.0.0.1:{port}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        assert "listening on 127.0.0.1:" in proc.stdout.readline()
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        wait_for(lambda: _refused(port), 10, "the broker port to close")
    finally:
        if proc.poll() is None:
            proc.kill()


def _refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        return True


def test_demo_trains_streams_and_plots(tmp_path):
    args = [sys.executable, "-m", "stream_forecaster.cli", "demo", "--rate", "5000", "--out", str(tmp_path / "out"),
            "--set", "model.sequence_length=10", "--set", "data.features=[Global_active_power]",
            "--set", "model.layers=[1, 8, 1]",
            "--set", "model.epochs=1", "--set", f"model_store.path={tmp_path / 'models'}"]
    result = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "training one on the first three weeks" in result.stdout
    # the held-back week: 10,080 lines, none missing, so 10,080 - 8 forecasts of the 9-reading windows
    assert re.search(r"plot: .*demo\.png \(10,072 predictions\)", result.stdout), result.stdout
    assert (tmp_path / "out" / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert "daemon stopped (exit 0)" in result.stdout


def test_ctrl_c_while_the_demo_trains_exits_130_before_any_daemon_and_writes_no_model(tmp_path):
    args = [sys.executable, "-m", "stream_forecaster.cli", "demo", "--out", str(tmp_path / "out"),
            "--set", f"model_store.path={tmp_path / 'models'}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if "training one on" in line:
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 130, rest
    # stopped inside the training, not after it: the signal reached the epochs
    assert "interrupted (training stopped on request)" in rest, rest
    assert "daemon:" not in rest and "Traceback" not in rest
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []
