"""Secrets stay secret, model names stay in the store, bad set-ups fail fast without a traceback."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading

import pytest
from conftest import make_forecaster

from stream_forecaster.config import ConfigError, load_config
from stream_forecaster.kafka_compat import client_settings
from stream_forecaster.service import Daemon
from stream_forecaster.store import CHECKSUM_FILE, ModelStore, ModelStoreError
from stream_forecaster.testing import ListSink, ListSource

SECRET = "s3cr3t-Pa55"


def test_sasl_and_tls_settings_reach_kafka_python(tmp_path):
    password_file = tmp_path / "sasl"
    password_file.write_text(SECRET + "\n")
    config = load_config(None, ["kafka.security_protocol=SASL_SSL", "kafka.sasl_mechanism=SCRAM-SHA-512",
                                "kafka.sasl_username=svc", f"kafka.sasl_password_file={password_file}",
                                "kafka.ssl_cafile=/etc/ca.pem", "kafka.ssl_check_hostname=false"], environ={})
    settings = client_settings(config.kafka, "x")
    assert settings["security_protocol"] == "SASL_SSL"
    assert (settings["sasl_mechanism"], settings["sasl_plain_username"], settings["sasl_plain_password"]) == \
        ("SCRAM-SHA-512", "svc", SECRET)
    assert settings["ssl_cafile"] == "/etc/ca.pem" and settings["ssl_check_hostname"] is False


def test_password_from_the_environment_and_never_in_the_redacted_config():
    env = {"STREAM_FORECASTER__KAFKA__SASL_PASSWORD": SECRET,
           "STREAM_FORECASTER__KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
           "STREAM_FORECASTER__KAFKA__SASL_USERNAME": "svc"}
    config = load_config(None, environ=env)
    assert client_settings(config.kafka, "x")["sasl_plain_password"] == SECRET
    assert SECRET not in json.dumps(config.redacted())
    assert config.redacted()["kafka"]["sasl_password"] == "***"


def test_unreadable_password_file_is_a_config_error(tmp_path):
    config = load_config(None, ["kafka.security_protocol=SASL_PLAINTEXT", "kafka.sasl_username=svc",
                                f"kafka.sasl_password_file={tmp_path / 'no'}"], environ={})
    with pytest.raises(ConfigError, match="kafka.sasl_password_file: cannot read"):
        client_settings(config.kafka, "x")


def test_unknown_sasl_mechanism_is_refused():
    with pytest.raises(ConfigError, match="kafka.sasl_mechanism: must be one of"):
        load_config(None, ["kafka.sasl_mechanism=GSSAPI"], environ={})


def test_daemon_start_up_log_states_the_config_without_secrets(tmp_path, caplog):
    store = ModelStore(tmp_path / "models")
    store.publish(make_forecaster(sequence_length=6).save)
    config = load_config(None, [f"model_store.path={store.path}", "model.sequence_length=6",
                                "data.features=[Global_active_power]", "model.layers=[1, 8, 1]",
                                "metrics.port=0"], environ={"STREAM_FORECASTER__KAFKA__SASL_PASSWORD": SECRET})
    stop = threading.Event()
    daemon = Daemon(config, source=ListSource([], stop_when_done=stop), sink=ListSink(), stop=stop)
    with caplog.at_level(logging.INFO):
        assert daemon.run() == 0
    assert "effective configuration" in caplog.text and '"sasl_password": "***"' in caplog.text
    assert SECRET not in caplog.text


@pytest.mark.parametrize("name", ["../etc", "1/../../x", "", "latest", "-1"])
def test_version_names_cannot_leave_the_store(tmp_path, name):
    with pytest.raises(ModelStoreError, match="not a model version"):
        ModelStore(tmp_path).directory(name)


def test_a_damaged_pointer_is_refused(tmp_path):
    (tmp_path / "CURRENT").write_text("../../elsewhere\n")
    with pytest.raises(ModelStoreError, match="CURRENT is damaged"):
        ModelStore(tmp_path).current()


def run_daemon(tmp_path, *sets, timeout=120):
    args = [sys.executable, "-m", "stream_forecaster.cli", "run", "--set", "metrics.port=0"]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def test_unusable_model_fails_fast_with_a_clear_message(tmp_path):
    store = ModelStore(tmp_path / "models")

    def write_garbage(directory):
        make_forecaster(sequence_length=6).save(directory)
        (directory / "model.keras").write_bytes(b"this is not a keras file")  # checksummed as it is

    store.publish(write_garbage)
    result = run_daemon(tmp_path, f"model_store.path={store.path}")
    assert result.returncode == 2
    assert "cannot load the model" in result.stderr and "Traceback" not in result.stderr


def test_corrupted_current_model_fails_fast(tmp_path):
    store = ModelStore(tmp_path / "models")
    store.publish(make_forecaster(sequence_length=6).save)
    (store.directory("1") / CHECKSUM_FILE).write_text("0" * 64 + "  model.keras\n")
    result = run_daemon(tmp_path, f"model_store.path={store.path}")
    assert result.returncode == 2
    assert "checksum mismatch for model.keras" in result.stderr and "Traceback" not in result.stderr


def test_bad_configuration_fails_fast(tmp_path):
    result = run_daemon(tmp_path, "kafka.max_poll_records=0")
    assert result.returncode == 2
    assert "kafka.max_poll_records: must be >= 1" in result.stderr and "Traceback" not in result.stderr
