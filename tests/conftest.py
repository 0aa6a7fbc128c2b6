"""Shared fixtures: small UCI files written on the fly, tiny model configs."""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import pytest

from stream_forecaster.config import load_config
from stream_forecaster.records import SAMPLE_PATH

HEADER = "Date;Time;Global_active_power;Global_reactive_power;Voltage;Global_intensity;Sub_metering_1;Sub_metering_2;Sub_metering_3"


def sample_lines(n: int, start: int = 0) -> list[str]:
    """``n`` data lines of the real bundled sample, from data line ``start``."""
    with gzip.open(SAMPLE_PATH, "rt") as f:
        next(f)
        return [line.rstrip("\n") for line in itertools.islice(f, start, start + n)]


def write_uci(path: Path, lines: list[str], header: str | None = HEADER) -> Path:
    path.write_text("\n".join(([header] if header else []) + lines) + "\n")
    return path


@pytest.fixture
def tiny_config(tmp_path):
    """A model small enough to train in seconds, and a store in tmp_path."""

    def make(*overrides: str):
        return load_config(
            None,
            [
                "model.sequence_length=6",
                "data.features=[Global_active_power]", "model.layers=[1, 8, 1]",
                "model.epochs=1",
                "model.batch_size=64",
                f"model_store.path={tmp_path / 'models'}",
                *overrides,
            ],
            environ={},
        )

    return make


def make_forecaster(features=("Global_active_power",), targets=("Global_active_power",), sequence_length=6,
                    hidden=(8,), version="1", seed=3, target_mean=1.2):
    """An untrained but deterministic forecaster with a real normalisation."""
    import numpy as np

    from stream_forecaster.model import Forecaster, Scaler, build_model

    spec = load_config(None, [f"data.features={list(features)}", f"data.targets={list(targets)}",
                              f"model.layers={[len(features), *hidden, len(targets)]}",
                              f"model.sequence_length={sequence_length}", f"model.seed={seed}",
                              "model.predict=level", "data.normalization=standardize"], environ={}).model
    meta = {
        "features": list(features), "targets": list(targets), "sequence_length": sequence_length,
        "normalization": {
            "features": Scaler(np.full(len(features), 1.0, np.float32), np.full(len(features), 0.5, np.float32)).to_dict(),
            "targets": Scaler(np.full(len(targets), target_mean, np.float32),
                              np.full(len(targets), 0.8, np.float32)).to_dict(),
        },
    }
    return Forecaster(build_model(spec), meta, version)


@pytest.fixture(scope="session")
def broker():
    """One embedded development broker for the test session, on a free port."""
    from stream_forecaster.devbroker import DevBroker

    with DevBroker() as b:
        yield b


@pytest.fixture
def kafka_names(request):
    """Topic and group names of this test alone, so tests share the broker without meeting."""
    import re
    import uuid

    tag = re.sub(r"[^a-zA-Z0-9]", "-", request.node.name)[:40] + "-" + uuid.uuid4().hex[:6]
    return {"input": f"in-{tag}", "output": f"out-{tag}", "dead": f"dead-{tag}", "group": f"g-{tag}"}


def offline_forecasts(forecaster, lines: list[str]):
    """The values of UCI ``lines`` and the forecaster's prediction after each full window, computed offline."""
    import numpy as np

    from stream_forecaster.records import UciLineParser

    parser = UciLineParser(list(forecaster.features))
    values = np.array([parser.parse(line)[1] for line in lines], dtype=np.float32)
    size = forecaster.sequence_length - 1
    windows = np.stack([values[i:i + size] for i in range(len(values) - size + 1)])
    return values, forecaster.forecast(windows)


def daemon_overrides(address: str, names: dict, store_path, **extra: str) -> list[str]:
    """``--set`` values of a daemon with this test's topics and group and the tiny model in ``store_path``."""
    values = {
        "kafka.bootstrap_servers": address, "kafka.input_topic": names["input"],
        "kafka.output_topic": names["output"], "kafka.group_id": names["group"], "kafka.session_timeout_ms": "6000",
        "model_store.path": str(store_path), "model.sequence_length": "6", "model.layers": "[1, 8, 1]",
        "data.features": "[Global_active_power]",
        **{k.replace("__", "."): v for k, v in extra.items()},
    }
    return [f"{k}={v}" for k, v in values.items()]


def daemon_setup(address: str, names: dict, tmp_path: Path, partitions: int, **extra: str):
    """A tiny model published in a fresh store and this test's topics created: ``(config, overrides, store)``."""
    from stream_forecaster.kafka_io import ensure_topics
    from stream_forecaster.registry import ModelStore

    store = ModelStore(tmp_path / "models")
    store.publish(make_forecaster(sequence_length=6).save)
    overrides = daemon_overrides(address, names, store.path, **extra)
    config = load_config(None, overrides, environ={})
    k = config.kafka
    ensure_topics(k, [k.input_topic, k.output_topic, k.dead_letter_topic], partitions=partitions)
    return config, overrides, store
