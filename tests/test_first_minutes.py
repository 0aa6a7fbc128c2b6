"""A user's first minutes: clean stderr, fast one-line errors, help that says what a command is for."""

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import sample_lines, write_uci

from stream_forecaster import cli, kafka_io, logs
from stream_forecaster.cli import main
from stream_forecaster.config import LoggingConfig
from stream_forecaster.devbroker import free_port
from stream_forecaster.metrics import Metrics, MetricsServer, RetrainMetrics, new_registry, scrape

TINY = ["--set", "model.sequence_length=6", "--set", "data.features=[Global_active_power]", "--set", "model.units=[4]",
        "--set", "model.batch_size=64", "--set", "model.epochs=1"]


def fresh_env() -> dict:
    """This environment without a TensorFlow log level or a setting of ours: the defaults are under test."""
    return {k: v for k, v in os.environ.items() if k != logs.NATIVE_LEVEL and not k.startswith("STREAM_FORECASTER__")}


@pytest.fixture
def root_logging():
    """The root logger as it was: the commands below configure it for the whole process."""
    root = logging.getLogger()
    saved = root.level, root.handlers[:]
    yield root
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]


# 1. TensorFlow's C++ start-up lines


@pytest.mark.integration  # trains in a process of its own
def test_train_with_json_logs_writes_only_json_lines_to_stderr(tmp_path):
    data = write_uci(tmp_path / "slice.txt", sample_lines(600))
    result = subprocess.run(
        [sys.executable, "-m", "stream_forecaster.cli", "train", "--quiet", "--data", str(data), *TINY,
         "--set", f"model_store.path={tmp_path / 'models'}", "--set", "logging.format=json"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=fresh_env())
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines, "the read summary is logged at INFO"
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line on stderr: {line!r}\n{result.stderr}")
        assert isinstance(record, dict) and {"level", "logger", "message"} <= set(record), line


NATIVE = [b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
          b"I0000 00:00:1796165398.216347    6337 port.cc:153] oneDNN custom operations are on.\n",
          b"W0000 00:00:1796165398.216890    6337 some.cc:31] a warning\n",
          b"2025-09-17 14:44:05.176998: E external/local_xla/cuda_fft.cc:467] an error\n",
          b"F0000 00:00:1796165403.592958    6337 fatal.cc:52] a fatal line\n"]
NATIVE_SEVERITY = [0, 0, 1, 2, 3]  # the notice says only where the info lines go
PLAIN = b"a line of Python's own, I0000 in the middle\n"


@pytest.mark.parametrize("level", range(5))
def test_native_lines_below_the_threshold_are_dropped_and_every_other_line_kept(level):
    kept = logs.without_native_lines(b"".join(NATIVE) + PLAIN, level)
    assert kept == b"".join(line for line, s in zip(NATIVE, NATIVE_SEVERITY) if s >= level) + PLAIN


def test_a_tensorflow_log_level_the_user_set_is_kept(monkeypatch):
    monkeypatch.setenv(logs.NATIVE_LEVEL, "0")
    logs.quiet_native()
    assert os.environ[logs.NATIVE_LEVEL] == "0" and logs.native_min_level() == 0
    monkeypatch.delenv(logs.NATIVE_LEVEL)
    logs.quiet_native()
    assert logs.native_min_level() == 3  # errors too: TensorFlow logs a failed cuInit as one on every CPU host


def chatty_module(tmp_path, monkeypatch, name: str, fail: bool = False) -> str:
    """A module that writes a native log line and a plain one to file descriptor 2 as it loads, as TensorFlow does."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""
        import os
        os.write(2, {NATIVE[1]!r} + {PLAIN!r})
        if {fail}:
            raise ImportError("no such library")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(logs.NATIVE_LEVEL, "3")
    return name


def test_the_native_lines_of_an_import_are_held_back_and_the_rest_written(tmp_path, monkeypatch, capfd):
    name = chatty_module(tmp_path, monkeypatch, "chatty_ok")
    assert logs.quiet_import(name).__name__ == name
    err = capfd.readouterr().err.encode()
    assert PLAIN in err and NATIVE[1] not in err


def test_an_import_that_fails_writes_everything_it_said(tmp_path, monkeypatch, capfd):
    name = chatty_module(tmp_path, monkeypatch, "chatty_broken", fail=True)
    with pytest.raises(ImportError):
        logs.quiet_import(name)
    err = capfd.readouterr().err.encode()
    assert PLAIN in err and NATIVE[1] in err  # the native lines may say why


# 2. User errors before TensorFlow loads

IN_PROCESS = """
import io, json, sys
from stream_forecaster.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    sys.stderr = io.StringIO()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    results.append([code, sys.stderr.getvalue()])
sys.stderr = sys.__stderr__
print(json.dumps({"results": results, "tensorflow": "tensorflow" in sys.modules}))
"""


@pytest.mark.integration  # a fresh process, so that TensorFlow's absence means something
def test_user_errors_are_one_line_and_exit_2_before_tensorflow_loads(tmp_path):
    data = write_uci(tmp_path / "slice.txt", sample_lines(100))
    missing, store = tmp_path / "absent.csv", ["--set", f"model_store.path={tmp_path / 'models'}"]
    cases = [(["train", "--data", str(missing)], "no such file"),
             (["train", "--data", str(tmp_path)], "not a file"),
             (["train", "--data", str(data), "--from", "99"], "99"),
             (["evaluate", "--data", str(missing)], "no such file"),
             (["evaluate", "--data", str(data), "--model", "99"], "99"),
             (["evaluate", "--data", str(data), "--plot", str(tmp_path / "no" / "p.png")], "not a writable directory")]
    argvs = [[*argv, *store] for argv, _ in cases]
    result = subprocess.run([sys.executable, "-c", IN_PROCESS, json.dumps(argvs)], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path, env=fresh_env())
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for (argv, says), (code, err) in zip(cases, report["results"]):
        assert code == 2, (argv, err)
        assert err.startswith(f"stream-forecaster {argv[0]}: error: ") and err.count("\n") == 1, (argv, err)
        assert says in err, (argv, err)
    assert not report["tensorflow"], "a user error was found only after TensorFlow loaded"


# 3. replay without a broker


@pytest.fixture
def data_file(tmp_path):
    return write_uci(tmp_path / "slice.txt", sample_lines(50))


def test_replay_without_a_broker_says_one_line(data_file, monkeypatch, capsys, root_logging):
    settings = kafka_io.client_settings  # the same failure, sooner than after the 10 s bootstrap wait
    monkeypatch.setattr(kafka_io, "client_settings",
                        lambda *a, **k: {**settings(*a, **k), "bootstrap_timeout_ms": 1000})
    port = free_port()  # nothing listens there
    assert main(["replay", "--data", str(data_file), "--max",
                 "--set", f"kafka.bootstrap_servers=127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stream-forecaster replay: error: ") and err.count("\n") == 1, err
    assert f"127.0.0.1:{port}" in err


def test_held_records_reach_no_handler_and_pass_at_debug(root_logging, capsys):
    kafka = logging.getLogger("kafka")
    before = kafka.propagate, kafka.handlers[:]
    for level in ("INFO", "DEBUG"):
        logs.configure(LoggingConfig(level=level))
        with logs.held("kafka") as records:
            logging.getLogger("kafka.net.manager").error("Connection failed: %s", level)
        shown = capsys.readouterr().err
        assert (f"Connection failed: {level}" in shown) == (level == "DEBUG")
        assert [r.getMessage() for r in records] == ([] if level == "DEBUG" else [f"Connection failed: {level}"])
    assert (kafka.propagate, kafka.handlers) == before  # as it was once the block is left


# 4. Log levels in any case


@pytest.mark.parametrize("level", ["debug", "Info", "warning", "ERROR"])
def test_log_levels_are_read_in_any_case(level, tmp_path, capsys, root_logging):
    logs.configure(LoggingConfig(level=level))  # also as constructed in code, not loaded
    assert root_logging.level == logging.getLevelName(level.upper())
    logs.configure()
    assert main(["models", "list", "--set", f"logging.level={level}", "--set", f"model_store.path={tmp_path}"]) == 0
    assert root_logging.level == logging.getLevelName(level.upper()), capsys.readouterr().err


# 5. What each command is for


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_each_command_help_says_what_it_does_and_its_most_common_use(command, capsys):
    description = cli.DESCRIPTIONS[command]
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the text to the terminal
    assert exited.value.code == 0 and " ".join(description.split()) in out
    assert f"stream-forecaster {command}" in description  # the most common use, as typed


# 6. Process metrics


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process metrics are read from /proc")
def test_a_fresh_registry_serves_the_process_metrics():
    registry = new_registry()
    Metrics(["Global_active_power"], registry=registry)  # the daemon's metrics sit beside them
    server = MetricsServer(registry, "127.0.0.1", 0, lambda: True).start()
    try:
        samples = scrape(f"http://127.0.0.1:{server.port}/metrics")
    finally:
        server.stop()
    assert samples["process_resident_memory_bytes"] > 0 and samples["process_cpu_seconds_total"] > 0
    assert any(name.startswith("python_info{") for name in samples)
    assert "stream_forecaster_predictions_total" in samples
    # the retrainer's registry has them too, and each fresh registry its own collectors
    assert RetrainMetrics().registry.get_sample_value("process_resident_memory_bytes") > 0


def test_warnings_about_old_setting_names_come_in_the_configured_log_format(tmp_path, capsys, root_logging):
    assert main(["models", "list", "--set", "logging.format=json", "--set", "retrain.interval=1h",
                 "--set", f"model_store.path={tmp_path / 'models'}"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(json.loads(line) for line in lines)
    assert any("retrain.interval is now called retrain.every" in json.loads(line)["message"] for line in lines)


def test_a_data_path_that_is_not_a_regular_file_is_taken_unopened_and_a_directory_refused(tmp_path):
    assert cli._check_input(Path("/dev/null")) == Path("/dev/null")  # as a pipe (<(zcat ...)) would be
    with pytest.raises(cli.UserError, match="not a file"):
        cli._check_input(tmp_path)
