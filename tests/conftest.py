"""Shared fixtures (small UCI files written on the fly, tiny model configs) and the two test tiers.

The unit tier (``./dev test -m unit``) is the modules in :data:`UNIT_MODULES`,
less any test marked ``integration``: no TensorFlow, no broker, no process
started, which :func:`unit_tier_stays_light` enforces. Everything else is
marked ``integration``. Under pytest-xdist the tests that drive a broker all
run on one worker (:func:`pytest_xdist_make_scheduler`).
"""

from __future__ import annotations

import gc
import gzip
import itertools
import multiprocessing.process
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from stream_forecaster.config import load_config
from stream_forecaster.files import SAMPLE_PATH

HEADER = ("Date;Time;Global_active_power;Global_reactive_power;Voltage;Global_intensity;"
          "Sub_metering_1;Sub_metering_2;Sub_metering_3")


UNIT_MODULES = {"test_config", "test_daemon_fakes", "test_first_minutes", "test_fleet_events", "test_inference",
                "test_intervals", "test_messages", "test_metrics", "test_readers", "test_retrain_trigger", "test_store",
                "test_window"}


def pytest_ignore_collect(collection_path, config):
    """With ``-m unit`` the other test modules are not even imported: several import TensorFlow at the top."""
    if config.getoption("markexpr") == "unit" and collection_path.suffix == ".py":
        return collection_path.stem.startswith("test_") and collection_path.stem not in UNIT_MODULES
    return None


# Modules whose tests start development brokers of their own; others reach the session's through ``broker``.
OWN_BROKER_MODULES = {"test_broker_faults", "test_kcat_interop", "test_tools"}


def drives_a_broker(item) -> bool:
    return "broker" in getattr(item, "fixturenames", ()) or item.module.__name__ in OWN_BROKER_MODULES


def pytest_collection_modifyitems(config, items):
    for item in items:
        unit = item.module.__name__ in UNIT_MODULES and item.get_closest_marker("integration") is None
        item.add_marker("unit" if unit else "integration")
    handoff = getattr(config, "workerinput", {}).get("broker_tests")
    if handoff:  # a pytest-xdist worker: tell OneBrokerWorker which tests drive a broker
        Path(handoff).write_text("".join(f"{item.nodeid}\n" for item in items if drives_a_broker(item)))


# Under pytest-xdist (``./dev test`` runs two workers) every test that drives a broker runs on one worker, in
# collection order, as in a serial run; only the other tests are shared out. With brokers driven from two workers at
# once, the development broker lost committed offsets during rebalances.
BROKER_TESTS_DIR = pytest.StashKey[Path]()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """Where each worker writes the ids of its tests that drive a broker, read back by :class:`OneBrokerWorker`."""
    config = node.config
    if BROKER_TESTS_DIR not in config.stash:
        directory = config.stash[BROKER_TESTS_DIR] = Path(tempfile.mkdtemp(prefix="stream-forecaster-xdist-"))
        config.add_cleanup(lambda: shutil.rmtree(directory, ignore_errors=True))
    node.workerinput["broker_tests"] = str(config.stash[BROKER_TESTS_DIR] / node.gateway.id)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's load scheduling, with the tests that drive a broker as one unit of work.

    (``--dist loadgroup`` does that for tests marked ``xdist_group``, but not on pytest 9.2, which ignores the
    node ids it rewrites to that end: pytest-xdist issue 1386.)
    """
    if config.getvalue("dist") == "each":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class OneBrokerWorker(LoadScopeScheduling):
        broker_tests: set[str] = set()

        def schedule(self):
            if self.collection is None:  # the first call, once every worker has collected
                self.broker_tests = set()
                for node in self.nodes:
                    self.broker_tests |= set(Path(node.workerinput["broker_tests"]).read_text().splitlines())
            super().schedule()

        def _split_scope(self, nodeid: str) -> str:
            return "broker" if nodeid in self.broker_tests else nodeid

    return OneBrokerWorker(config, log)


@pytest.fixture(autouse=True)
def unit_tier_stays_light(request, monkeypatch):
    """A unit test that starts a process, or imports TensorFlow, fails: it belongs in the integration tier."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return

    def refuse(*args, **kwargs):
        raise AssertionError("a unit test started a process: mark it integration")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
    had_tensorflow = "tensorflow" in sys.modules
    yield
    assert had_tensorflow or "tensorflow" not in sys.modules, "a unit test imported TensorFlow: mark it integration"


@pytest.fixture(autouse=True)
def heap_thawed_after():
    """A daemon run in the test's own thread freezes the heap, as in production; the next test starts thawed."""
    yield
    gc.unfreeze()


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
    from stream_forecaster.store import ModelMetadata

    spec = load_config(None, [f"data.features={list(features)}", f"data.targets={list(targets)}",
                              f"model.layers={[len(features), *hidden, len(targets)]}",
                              f"model.sequence_length={sequence_length}", f"model.seed={seed}",
                              "model.predict=level", "data.normalization=standardize"], environ={}).model
    meta = {
        "features": list(features), "targets": list(targets), "sequence_length": sequence_length,
        "normalization": {
            "features": Scaler(np.full(len(features), 1.0, np.float32),
                               np.full(len(features), 0.5, np.float32)).to_dict(),
            "targets": Scaler(np.full(len(targets), target_mean, np.float32),
                              np.full(len(targets), 0.8, np.float32)).to_dict(),
        },
    }
    return Forecaster(build_model(spec), ModelMetadata.from_dict(meta), version)


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


def level_model(level: float, series, sequence_length: int = 6):
    """An untrained model shifted so that its forecasts average ``level`` on the readings of ``series`` (a list
    of arrays): readings scattered around that level are forecast better than persistence does, which chases the
    noise."""
    import numpy as np

    probe = make_forecaster(sequence_length=sequence_length, target_mean=0.0)
    windows = np.stack([v[t:t + sequence_length - 1] for v in series for t in range(len(v) - sequence_length + 1)])
    offset = float(probe.forecast(windows[:, :, None].astype(np.float32)).mean())
    return make_forecaster(sequence_length=sequence_length, target_mean=level - offset)


def offline_forecasts(forecaster, lines: list[str]):
    """The values of UCI ``lines`` and the forecaster's prediction after each full window, computed offline."""
    import numpy as np

    from stream_forecaster.messages import UciLineParser

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
    from stream_forecaster.store import ModelStore
    from stream_forecaster.topics import ensure_topics

    store = ModelStore(tmp_path / "models")
    store.publish(make_forecaster(sequence_length=6).save)
    overrides = daemon_overrides(address, names, store.path, **extra)
    config = load_config(None, overrides, environ={})
    k = config.kafka
    ensure_topics(k, [k.input_topic, k.output_topic, k.dead_letter_topic], partitions=partitions)
    return config, overrides, store
