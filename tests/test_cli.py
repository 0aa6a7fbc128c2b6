"""The commands end to end, in process, on slices of the real bundled data."""

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import sample_lines, write_uci

from stream_forecaster.cli import main
from stream_forecaster.files import read_uci
from stream_forecaster.model import Forecaster
from stream_forecaster.store import ModelStore
from stream_forecaster.training import backtest

TINY = ["--set", "model.sequence_length=10", "--set", "data.features=[Global_active_power]",
        "--set", "model.layers=[1, 8, 1]", "--set", "model.batch_size=64", "--set", "model.epochs=1"]


@pytest.fixture
def data_file(tmp_path):
    lines = sample_lines(3000)
    lines[100] = "16/12/2006;19:04:00;?;?;?;?;?;?;"
    return write_uci(tmp_path / "slice.txt", lines)


def store_args(tmp_path):
    return ["--set", f"model_store.path={tmp_path / 'models'}"]


def test_train_then_evaluate(tmp_path, data_file, capsys):
    code = main(["train", "--data", str(data_file), "--quiet", *TINY, *store_args(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "model version 1 written" in out and "persistence" in out
    store = ModelStore(tmp_path / "models")
    assert store.current() == "1"
    meta = store.metadata("1").to_dict()
    assert meta["data"]["missing"] == 1 and meta["data"]["rows"] == 2999
    assert meta["data"]["test_windows"] == 2990 - int(2990 * 0.9)
    assert meta["test"]["n"] == meta["data"]["test_windows"]
    assert set(meta["libraries"]) >= {"tensorflow", "keras", "numpy"}

    plot, csv_dir = tmp_path / "p.png", tmp_path / "csv"
    code = main(["evaluate", "--data", str(data_file), "--json", "--plot", str(plot), "--csv-dir", str(csv_dir),
                 *store_args(tmp_path)])
    assert code == 0
    report = json.loads(capsys.readouterr().out)  # exactly one JSON object
    assert {"n", "rmse", "mae", "persistence_rmse", "persistence_mae", "per_target", "model_version"} <= set(report)
    assert report["n"] == 2999 - 9 and report["model_version"] == "1"

    # The persistence baseline is recomputed here from the file itself.
    series = read_uci(data_file, ["Global_active_power"])
    truth, last = series.values[9:, 0].astype(np.float64), series.values[8:-1, 0].astype(np.float64)
    assert report["persistence_mae"] == pytest.approx(np.abs(truth - last).mean(), rel=1e-9)
    assert report["persistence_rmse"] == pytest.approx(np.sqrt(np.square(truth - last).mean()), rel=1e-9)

    # The model's score matches the loaded model run over the same windows.
    result = backtest(Forecaster.load(store.directory("1"), "1"), series)
    assert report["rmse"] == pytest.approx(result.model.rmse, rel=1e-6)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    predicted = (csv_dir / "predicted.csv").read_text().splitlines()
    assert predicted[0] == "timestamp,Global_active_power" and len(predicted) == report["n"] + 1
    assert len((csv_dir / "test_data.csv").read_text().splitlines()) == report["n"] + 1


def test_multi_feature_multi_target(tmp_path, data_file, capsys):
    args = ["--set", "data.features=[Global_active_power, Voltage, Global_intensity]",
            "--set", "data.targets=[Global_active_power, Sub_metering_3]", "--set", "model.layers=[3, 6, 6, 2]",
            "--set", "model.predict=level", "--set", "data.normalization=standardize",
            "--set", "data.normalization=standardize"]
    assert main(["train", "--data", str(data_file), "--quiet", *TINY[:2], *TINY[4:], *args, *store_args(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--data", str(data_file), "--json", *store_args(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["per_target"]) == {"Global_active_power", "Sub_metering_3"}


def test_user_errors_exit_2_with_one_line(tmp_path, data_file, capsys):
    assert main(["train", "--set", "model.epochs=0"]) == 2
    assert "model.epochs: must be >= 1" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(data_file), *store_args(tmp_path)]) == 2
    assert "no model in" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "absent.txt"), *store_args(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    short = write_uci(tmp_path / "short.txt", sample_lines(10))
    assert main(["train", "--data", str(short), *TINY, *store_args(tmp_path)]) == 2
    assert "too few to train" in capsys.readouterr().err
    assert main(["train", "--data", str(data_file), "--set", "data.features=Volts", "--set", "data.targets=Volts",
                 "--set", "model.layers=[1, 8, 1]",
                 *store_args(tmp_path)]) == 2
    assert "Volts not in the data" in capsys.readouterr().err
    damaged = tmp_path / "damaged.gz"
    damaged.write_bytes(b"not gzip")
    assert main(["train", "--data", str(damaged), *store_args(tmp_path)]) == 2
    assert "damaged.gz: cannot read it" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    for output, says in ((["--plot", str(tmp_path / "no" / "p.png")], "is not a writable directory"),
                         (["--csv-dir", str(tmp_path / "file")], "not a directory"),
                         (["--csv-dir", str(tmp_path / "file" / "csv")], "is not a writable directory")):
        assert main(["evaluate", "--data", str(data_file), *output, "--model", str(tmp_path)]) == 2
        assert says in capsys.readouterr().err
    assert main(["train", "--data", str(data_file), *TINY, "--set", f"model_store.path={tmp_path / 'file' / 'm'}"]) == 2
    assert "is not writable" in capsys.readouterr().err  # said before training, not after


@pytest.mark.parametrize("args, says", [(["replay", "--skip", "-1"], "0 or more"),
                                        (["replay", "--limit", "-1"], "0 or more"),
                                        (["replay", "--rate", "0"], "more than 0"),
                                        (["replay", "--rate", "fast"], "not a number"),
                                        (["demo", "--rate", "-5"], "more than 0"),
                                        (["demo", "--duration", "0"], "more than 0")])
def test_replay_and_demo_refuse_counts_below_zero_and_rates_not_above(args, says, capsys):
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2 and says in capsys.readouterr().err


def test_replay_without_a_broker_is_a_one_line_error(data_file, capsys):
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    assert main(["replay", "--data", str(data_file), "--max",
                 "--set", f"kafka.bootstrap_servers=127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}: is a broker running there?" in err and "Traceback" not in err


def test_ctrl_c_during_training_exits_130_and_writes_nothing(tmp_path):
    store = tmp_path / "models"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_forecaster.cli", "train", "--set", "model.epochs=1000",
         "--set", f"model_store.path={store}", *TINY],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
    )
    for line in proc.stdout:  # wait until Keras reports progress, then interrupt
        if "loss:" in line or "Epoch 1/" in line:
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 130, rest
    assert "interrupted" in rest and "Traceback" not in rest
    assert not store.exists() or list(store.iterdir()) == []


def test_ctrl_c_after_the_last_epoch_still_writes_nothing(tmp_path, data_file, monkeypatch, capsys):
    import stream_forecaster.training as training

    calibrate = training._calibrate_min_step
    monkeypatch.setattr(training, "_calibrate_min_step",
                        lambda v: (signal.raise_signal(signal.SIGINT), calibrate(v))[1])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = main(["train", "--data", str(data_file), "--quiet", *TINY, "--set", "model.min_step=null",
                     *store_args(tmp_path)])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert ModelStore(tmp_path / "models").versions() == []


def test_a_diverged_training_writes_nothing_and_says_what_to_change(tmp_path, data_file, capsys):
    code = main(["train", "--data", str(data_file), "--quiet", *TINY, "--set", "model.optimizer=sgd",
                 "--set", "model.learning_rate=10", "--set", "model.loss=mse", "--set", "model.predict=level",
                 "--set", "data.normalization=standardize", "--set", "data.normalization=center",
                 *store_args(tmp_path)])
    assert code == 2 and "the training loss is not finite" in capsys.readouterr().err
    assert ModelStore(tmp_path / "models").versions() == []


def test_a_date_with_a_zone_is_refused_rather_than_ignored(tmp_path, data_file, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data", str(data_file), "--until", "2006-12-17T20:00+02:00", *store_args(tmp_path)])
    assert exit_.value.code == 2 and "without a zone" in capsys.readouterr().err


def test_without_a_validation_slice_a_given_min_step_still_holds_and_the_lack_of_intervals_is_said(
        tmp_path, data_file, capsys):
    assert main(["train", "--data", str(data_file), "--quiet", *TINY, "--set", "model.validation_split=0",
                 "--set", "model.min_step=5", "--set", "model.intervals=[0.1, 0.9]", *store_args(tmp_path)]) == 0
    meta = ModelStore(tmp_path / "models").metadata("1").to_dict()
    assert meta["min_step"] == [5.0] and "intervals" not in meta and "anomaly" not in meta
    assert "the model publishes no interval and no anomaly events" in capsys.readouterr().err


def test_change_model_with_intervals_trained_before_a_date_and_scored_after_it(tmp_path, capsys):
    lines = sample_lines(4000)  # from 16/12/2006 17:24 on: the cut below leaves about a day after it
    data = write_uci(tmp_path / "slice.txt", lines)
    series = read_uci(data, ["Global_active_power"])
    cut = "2006-12-18T12:00:00"
    args = ["--set", "model.predict=change", "--set", "model.intervals=[0.1, 0.9]", "--set", "model.patience=1",
            *TINY, "--set", "model.epochs=2", *store_args(tmp_path)]
    assert main(["train", "--data", str(data), "--quiet", "--until", cut, *args]) == 0
    capsys.readouterr()
    meta = ModelStore(tmp_path / "models").metadata("1").to_dict()
    assert meta["predict"] == "change"
    assert len(meta["min_step"]) == 1 and meta["min_step"][0] >= 0  # chosen on the validation slice (null)
    assert meta["data"]["last"] < cut  # nothing at or after the cut was read
    low, high = meta["intervals"]["lower"][0], meta["intervals"]["upper"][0]
    assert low <= 0 <= high
    # the anomaly band: wider quantiles of the same residuals, with their robust spread for the scores
    anomaly = meta["anomaly"]
    assert anomaly["quantiles"] == [0.005, 0.995] and anomaly["from_windows"] == meta["intervals"]["from_windows"]
    assert anomaly["lower"][0] <= low and high <= anomaly["upper"][0] and anomaly["sigma"][0] > 0

    assert main(["evaluate", "--data", str(data), "--json", "--since", cut, *store_args(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    after = int(np.sum(series.timestamps >= np.datetime64(cut, "s").astype(np.int64)))
    assert report["n"] == after  # windows may reach back before the cut; only their targets are after it
    assert 0 <= report["coverage"] <= 1 and report["interval"] == [0.1, 0.9]
    assert report["skill_rmse"] == pytest.approx(1 - report["rmse"] / report["persistence_rmse"])
    # the seasonal baseline: the same minute a day earlier, wherever the file has it
    assert 0 < report["seasonal_n"] <= report["n"] and report["seasonal_rmse"] > 0

    assert main(["evaluate", "--data", str(data), "--since", "2031-01-01", *store_args(tmp_path)]) == 2


def test_the_json_summary_is_strict_with_undefined_figures_as_null():
    from stream_forecaster.report import to_json

    text = to_json({"seasonal_n": 0, "seasonal_rmse": float("nan"), "per_target": {"x": {"skill": float("-inf")}}},
                   coverage=[0.8, float("nan")])

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    assert json.loads(text, parse_constant=refuse) == {"seasonal_n": 0, "seasonal_rmse": None,
                                                       "per_target": {"x": {"skill": None}}, "coverage": [0.8, None]}


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"stream-forecaster {command}: error: ") and err.count("\n") == 1, err
    return err


HOSTILE_YAML = {
    "file": "c.yaml: nested too deeply to read as YAML",
    "--set": "--set model.units: model.units: nested too deeply to read as YAML",
    "env": "environment variable STREAM_FORECASTER__MODEL__UNITS: model.units: nested too deeply to read as YAML",
    "malformed": "c.yaml line 3, column 1: could not parse YAML: expected ',' or ']', but got '<stream end>' "
                 "(while parsing a flow sequence from line 2)",
}


@pytest.mark.parametrize("source, says", HOSTILE_YAML.items(), ids=HOSTILE_YAML)
def test_hostile_yaml_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, source, says):
    deep = "[" * 100_000  # past Python's recursion limit as PyYAML nests
    config = tmp_path / "c.yaml"
    config.write_text({"file": f"model:\n  units: {deep}\n", "malformed": "model:\n  units: [1, 2\n"}.get(source, ""))
    args = ["models", "list", "--config", str(config), *store_args(tmp_path)]
    if source == "--set":
        args += ["--set", f"model.units={deep}"]
    if source == "env":
        monkeypatch.setenv("STREAM_FORECASTER__MODEL__UNITS", deep)
    assert main(args) == 2
    assert says in one_line_error(capsys, "models")


@pytest.mark.parametrize("args, says", [(["models", "list"], "not a directory"),
                                        (["models", "rollback"], "not a directory"),
                                        (["evaluate"], "not a directory"), (["train", "--quiet"], "not writable")])
def test_a_store_path_that_is_a_file_is_one_line_and_exit_2(tmp_path, capsys, args, says):
    (tmp_path / "models").write_text("not a directory")
    assert main([*args, *store_args(tmp_path)]) == 2
    assert f"models is {says} (a file is in the way): set model_store.path to a" in one_line_error(capsys, args[0])


@pytest.mark.parametrize("args", [["models", "list"], ["models", "rollback"], ["models", "promote", "1"], ["evaluate"],
                                  ["train", "--quiet"]])
def test_a_pointer_that_is_a_directory_is_one_line_and_exit_2(tmp_path, capsys, args):
    store = ModelStore(tmp_path / "models")
    store.publish(lambda directory: (directory / "model.keras").write_text("a model"))
    (store.path / "CURRENT").unlink()
    (store.path / "CURRENT").mkdir()
    assert main([*args, *store_args(tmp_path)]) == 2
    assert "CURRENT is a directory" in one_line_error(capsys, args[0])


def test_the_daemon_with_a_pointer_that_is_a_directory_exits_2_with_one_error_line(tmp_path):
    (tmp_path / "models" / "CURRENT").mkdir(parents=True)
    result = subprocess.run([sys.executable, "-m", "stream_forecaster.cli", "run", "--set", "metrics.port=0",
                             *store_args(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("stream-forecaster run: error: ")]
    assert len(errors) == 1 and "CURRENT is a directory" in errors[0]
