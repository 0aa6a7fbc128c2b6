"""Typed, frozen configuration loaded from YAML.

Every setting is one dataclass field with its default and its allowed range;
``config.yaml`` at the top of the repository shows each with a one-line comment
(a test keeps the two identical). Values come from, in increasing priority: the defaults, the YAML file,
environment variables ``STREAM_FORECASTER__SECTION__KEY=value`` and
``--set section.key=value`` overrides (both parsed as YAML). Any problem is a
:class:`ConfigError` that names where the value came from, the key and what is
allowed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "KafkaConfig",
    "LoggingConfig",
    "MetricsConfig",
    "ModelConfig",
    "ModelStoreConfig",
    "WindowConfig",
    "RetrainConfig",
    "ENV_PREFIX",
    "load_config",
    "parse_duration",
]

ENV_PREFIX = "STREAM_FORECASTER__"

log = logging.getLogger(__name__)


class ConfigError(UserError, ValueError):
    """A user error in the configuration; the CLI prints it and exits 2."""


def _spec(default, *, low=None, high=None, low_open=False, high_open=False, choices=None, comma_list=False,
          upper=False):
    """A field with a default (copied for lists) and its allowed range (``*_open``: the bound itself is out);
    ``comma_list``: a single string is a comma-separated list, as Kafka tools write broker lists; ``upper``:
    a string is read in upper case (log levels are written either way)."""
    meta = {"low": low, "high": high, "low_open": low_open, "high_open": high_open, "choices": choices,
            "comma_list": comma_list, "upper": upper}
    if isinstance(default, list):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


Duration = typing.NewType("Duration", float)  # seconds; YAML may say 90, "30s", "5m", "6h", "14d"

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_LONGEST = 100 * 365 * 86400  # seconds; longer waits overflow the clock functions


def parse_duration(value) -> float:
    """Seconds from a number or a string such as ``"30s"``, ``"5m"``, ``"14d"``."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '30s', '5m', '6h', '14d'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h|d|w)?\s*", str(value))
        if not match:
            raise ValueError("a duration is a number of seconds or a string like '30s', '5m', '6h', '14d'")
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if not abs(seconds) <= _LONGEST:  # NaN too
        raise ValueError("a duration must be finite and at most 100 years")
    return seconds


@dataclass(frozen=True)
class DataConfig:
    path: str | None = _spec(None)
    features: tuple[str, ...] = _spec(["Global_active_power", "Global_reactive_power", "Voltage", "Global_intensity",
                                       "Sub_metering_1", "Sub_metering_2", "Sub_metering_3"])
    targets: tuple[str, ...] = _spec(["Global_active_power"])
    ratio: float = _spec(1.0, low=0.0, high=1.0, low_open=True)
    train_split: float = _spec(0.9, low=0.0, high=1.0, low_open=True, high_open=True)
    on_error: str = _spec("raise", choices=("raise", "skip"))
    normalization: str = _spec("window", choices=("window", "center", "standardize"))
    period: Duration = _spec(60.0, low=0.0, high=366 * 86400.0, low_open=True)  # between a sensor's readings
    time_column: str | None = _spec(None)
    sensor_column: str | None = _spec(None)


@dataclass(frozen=True)
class ModelConfig:
    sequence_length: int = _spec(50, low=2, high=10_000)
    units: tuple[int, ...] = _spec([50, 100], low=1, high=100_000)
    layers: tuple[int, ...] | None = _spec(None, low=1)
    dropout: float = _spec(0.2, low=0.0, high=1.0, high_open=True)
    loss: str = _spec("huber", choices=("mse", "mae", "huber"))
    optimizer: str = _spec("adam", choices=("rmsprop", "adam", "sgd"))
    learning_rate: float = _spec(0.001, low=0.0, high=10.0, low_open=True)
    batch_size: int = _spec(512, low=1, high=1_000_000)
    epochs: int = _spec(15, low=1, high=100_000)
    validation_split: float = _spec(0.05, low=0.0, high=1.0, high_open=True)
    seed: int = _spec(7, low=0, high=2**32 - 1)
    predict: str = _spec("change", choices=("level", "change"))
    min_step: float | None = _spec(None, low=0.0)
    patience: int = _spec(2, low=0, high=1_000)
    intervals: tuple[float, ...] = _spec([0.1, 0.9], low=0.0, high=1.0, low_open=True)
    interval_adaptation: float = _spec(0.005, low=0.0, high=1.0)
    anomaly_quantiles: tuple[float, ...] = _spec([0.005, 0.995], low=0.0, high=1.0, low_open=True)
    sample_weight: str = _spec("spread", choices=("spread", "none"))
    max_windows: int = _spec(200_000, low=0, high=1_000_000_000)
    preset: str | None = _spec(None, choices=(None, "tutorial"))
    jit_compile: bool = _spec(True)
    inference_threads: int | None = _spec(None, low=1, high=256)


@dataclass(frozen=True)
class ModelStoreConfig:
    path: str = _spec("models")
    keep: int = _spec(5, low=1, high=10_000)
    poll_interval: Duration = _spec(5.0, low=0.1)
    topic: str | None = _spec(None)  # a compacted Kafka topic holding the versions; path then caches them


@dataclass(frozen=True)
class KafkaConfig:
    client: str = _spec("kafka-python", choices=("kafka-python", "confluent"))
    bootstrap_servers: tuple[str, ...] = _spec(["127.0.0.1:9092"], comma_list=True)
    input_topic: str = _spec("sensor-readings")
    output_topic: str = _spec("sensor-predictions")
    dead_letter_topic: str | None = _spec(None)
    group_id: str = _spec("stream-forecaster")
    state_topic: str | None = _spec(None)
    anomaly_topic: str | None = _spec(None)
    health_topic: str | None = _spec(None)
    auto_offset_reset: str = _spec("earliest", choices=("earliest", "latest"))
    session_timeout_ms: int = _spec(10_000, low=1_000, high=3_600_000)
    max_poll_records: int = _spec(20_000, low=1, high=1_000_000)
    max_poll_interval_ms: int = _spec(300_000, low=1_000, high=86_400_000)
    fetch_max_wait_ms: int = _spec(50, low=0, high=60_000)
    security_protocol: str = _spec("PLAINTEXT", choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"))
    max_message_bytes: int = _spec(65536, low=16, high=100_000_000)
    ssl_cafile: str | None = _spec(None)
    ssl_certfile: str | None = _spec(None)
    ssl_keyfile: str | None = _spec(None)
    ssl_password_file: str | None = _spec(None)
    ssl_check_hostname: bool = _spec(True)
    sasl_mechanism: str | None = _spec(None, choices=(None, "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"))
    sasl_username: str | None = _spec(None)
    sasl_password: str | None = _spec(None)
    sasl_password_file: str | None = _spec(None)

    def secret(self, name: str) -> str | None:
        """``sasl_password`` or ``ssl_password``: the value itself, else the first line of its ``_file``."""
        value = getattr(self, name, None)
        path = getattr(self, f"{name}_file")
        if value is None and path is not None:
            try:
                value = Path(path).read_text(encoding="utf-8").splitlines()[0] if Path(path).stat().st_size else ""
            except OSError as exc:
                raise ConfigError(f"kafka.{name}_file: cannot read {path}: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise ConfigError(f"kafka.{name}_file: {path} is not UTF-8 text") from None
        return value

    def unused_security(self) -> list[str]:
        """TLS and SASL keys that are set but that ``security_protocol`` does not use (worth a warning)."""
        unused = []
        if self.security_protocol not in ("SSL", "SASL_SSL"):
            unused += [k for k in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password_file")
                       if getattr(self, k)]
        if not self.security_protocol.startswith("SASL_"):
            unused += [k for k in ("sasl_mechanism", "sasl_username", "sasl_password", "sasl_password_file")
                       if getattr(self, k)]
        return unused


@dataclass(frozen=True)
class WindowConfig:
    idle_ttl: Duration = _spec(86400.0, low=1.0)
    snapshot_interval: Duration = _spec(300.0, low=0.0)
    rebuild_messages: int = _spec(100_000, low=0, high=100_000_000)
    min_gap: int = _spec(2, low=0, high=1_000_000)


@dataclass(frozen=True)
class MetricsConfig:
    host: str = _spec("127.0.0.1")
    port: int = _spec(9464, low=0, high=65535)
    rolling_window: int = _spec(1000, low=1, high=10_000_000)
    labelled_sensors: tuple[str, ...] = _spec([])
    health_interval: Duration = _spec(60.0, low=1.0)
    health_span: int = _spec(1000, low=1, high=10_000_000)


@dataclass(frozen=True)
class RetrainConfig:
    every: Duration = _spec(21600.0, low=1.0)
    history: Duration = _spec(14 * 86400.0, low=60.0)
    max_readings: int = _spec(20_000_000, low=0, high=10_000_000_000)
    warm_start: bool = _spec(True)
    min_improvement: float = _spec(0.0, low=0.0, high=1.0)
    group_id: str = _spec("stream-forecaster-retrain")
    metric: str = _spec("rmse", choices=("rmse", "mae"))
    metrics_port: int = _spec(9465, low=0, high=65535)
    trigger_skill: float | None = _spec(None, low=-1e9, high=1.0)
    trigger_for: Duration = _spec(1800.0, low=0.0)
    min_interval: Duration = _spec(3600.0, low=0.0)
    shadow: bool = _spec(False)
    shadow_for: int = _spec(1000, low=1, high=1_000_000_000)
    shadow_sample: float = _spec(0.1, low=0.0, high=1.0, low_open=True)


@dataclass(frozen=True)
class LoggingConfig:
    level: str = _spec("INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), upper=True)
    format: str = _spec("plain", choices=("plain", "json"))


@dataclass(frozen=True)
class Config:
    """The whole configuration; :meth:`layers` gives the network's widths, which follow the data."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    model_store: ModelStoreConfig = field(default_factory=ModelStoreConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def layers(self) -> list[int]:
        """``[inputs, LSTM sizes..., outputs]``: the input and output widths follow data.features and data.targets."""
        return [len(self.data.features), *self.model.units, len(self.data.targets)]

    def redacted(self) -> dict:
        """The effective configuration as plain data, every password replaced by ``***``."""
        plain = _as_plain(self)
        for section in plain.values():
            for key, value in section.items():
                if "password" in key and value is not None and not key.endswith("_file"):
                    section[key] = "***"
        return plain

    def replace(self, section: str, **changes) -> "Config":
        """A copy with some keys of one section changed (checked like loaded values)."""
        current = dataclasses.asdict(getattr(self, section))
        current.update(changes)
        origins = {(section, key): "replace()" for key in changes}
        return _build({**_as_plain(self), section: current}, origins, "replace()")


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Load ``path`` (or only defaults), then apply environment and ``--set`` overrides."""
    source = str(path) if path is not None else "defaults"
    raw: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the configuration file: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 (byte {exc.start}): save the configuration file as UTF-8") from None
        try:
            raw = yaml.safe_load(text)
            raw = {} if raw is None else raw
        except yaml.YAMLError as exc:
            where, problem = _yaml_problem(exc)
            raise ConfigError(f"{path}{' ' + where if where else ''}: could not parse YAML: {problem}") from None
        except RecursionError:
            raise ConfigError(f"{path}: {_TOO_DEEP}: a configuration is sections of keys with plain values "
                              "or flat lists; fix the brackets or indentation") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    origins: dict[tuple[str, str], str] = {}
    given: dict = {}  # environment and --set, applied last
    environ = os.environ if environ is None else environ
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX):
            dotted = name[len(ENV_PREFIX):].lower().replace("__", ".")
            _apply_override(given, origins, dotted, environ[name], f"environment variable {name}")
    for item in overrides:
        dotted, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item}: expected section.key=value, e.g. --set model.epochs=3")
        _apply_override(given, origins, dotted.strip(), value, f"--set {dotted.strip()}")
    _rename_old_keys(raw, origins, source)
    _rename_old_keys(given, origins, source)
    in_file = raw["model"] if isinstance(raw.get("model"), dict) else {}
    preset = given.get("model", {}).get("preset", in_file.get("preset"))
    if isinstance(preset, str) and preset in PRESETS:  # an unknown name is reported by the model section's check
        _merge(raw, PRESETS[preset], origins, f"preset {preset}")
    _merge(raw, given, origins, None)
    return _build(raw, origins, source)


# Keys and values of earlier releases, still read: (section, old key) -> new key; old preset -> new preset
RENAMED_KEYS = {("data", "interval"): "period", ("retrain", "interval"): "every"}
RENAMED_PRESETS = {"seed": "tutorial"}


def _rename_old_keys(raw: dict, origins: dict, source: str) -> None:
    """Read an earlier release's names as today's, with a warning saying what to write instead."""
    for (section, old), new in RENAMED_KEYS.items():
        values = raw.get(section)
        if not isinstance(values, dict) or old not in values:
            continue
        where = origins.get((section, old), source)
        if new in values:
            raise ConfigError(f"{where}: {section}.{old} and {section}.{new} are both set; "
                              f"{section}.{old} is the old name of {section}.{new}: keep only {section}.{new}")
        values[new] = values.pop(old)
        if (section, old) in origins:
            origins[(section, new)] = origins.pop((section, old))
        log.warning("%s: %s.%s is now called %s.%s; please rename it", where, section, old, section, new)
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("preset"), str) and model["preset"] in RENAMED_PRESETS:
        new = RENAMED_PRESETS[model["preset"]]
        log.warning("%s: model.preset %s is now called %s; please rename it",
                    origins.get(("model", "preset"), source), model["preset"], new)
        model["preset"] = type(model["preset"])(new)  # an --set value stays an override


# A preset replaces the keys it names (whatever the file says); environment and --set still win.
PRESETS = {
    # the two tutorials' model, kept for comparison: the level from one centred column, MSE, 3 epochs
    "tutorial": {
        "data": {"features": ["Global_active_power"], "targets": ["Global_active_power"], "normalization": "center"},
        "model": {"sequence_length": 50, "layers": [1, 50, 100, 1], "dropout": 0.2, "loss": "mse",
                  "optimizer": "rmsprop", "learning_rate": 0.001, "batch_size": 512, "epochs": 3,
                  "predict": "level", "patience": 0, "min_step": 0.0},
    },
}


def _merge(raw: dict, layer: Mapping, origins: dict, origin: str | None) -> None:
    for section, values in layer.items():
        target = _section(raw, section, origin or "the configuration file")
        target.update(values)
        if origin is not None:
            for key in values:
                origins[(section, key)] = origin


def _section(raw: dict, section: str, origin: str) -> dict:
    """``raw[section]``, created if absent or empty (a section whose keys are all commented out reads as null)."""
    if raw.get(section) is None:
        raw[section] = {}
    if not isinstance(raw[section], dict):
        raise ConfigError(f"{origin}: section {section!r} in the file is not a mapping")
    return raw[section]


def _apply_override(raw: dict, origins: dict, dotted: str, value: str, origin: str) -> None:
    section, sep, key = dotted.partition(".")
    if not sep or not key or "." in key:
        raise ConfigError(f"{origin}: expected section.key, e.g. model.epochs")
    _section(raw, section, origin)[key] = _Override(value)
    origins[(section, key)] = origin


class _Override(str):
    """The text of an environment variable or ``--set``, read once its key's type is known.

    A string key takes the text as written (a password may hold ``#`` or be all
    digits); other keys read it as YAML (``[a, b]``, ``true``, ``1e-3``).
    """

    def resolve(self, hint):
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
        base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
        if base is str and not (optional and self.strip() in ("", "null", "~")):
            return str(self)
        try:
            return yaml.safe_load(self) if self.strip() else ""
        except yaml.YAMLError as exc:
            where, problem = _yaml_problem(exc)
            raise ValueError(f"could not parse YAML{' at ' + where if where else ''}: {problem}") from None
        except RecursionError:
            raise ValueError(f"{_TOO_DEEP}: give a plain value or a flat list such as [1, 2]") from None


# PyYAML composes nested collections recursively, so a few hundred levels exhaust Python's stack
_TOO_DEEP = "nested too deeply to read as YAML"


def _yaml_problem(exc: yaml.YAMLError) -> tuple[str, str]:
    """Where (``line 3, column 5``, or empty) and what of a YAML error, for a one-line message
    (PyYAML's own text quotes the input over several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if not problem:  # a ReaderError (a control character) has no mark: its first line says it all
        return "", str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    context, started = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and started and mark and started.line != mark.line:  # e.g. the bracket that was never closed
        problem += f" ({context} from line {started.line + 1})"
    return where, problem


def _build(raw: Mapping, origins: Mapping, source: str) -> Config:
    sections = {}
    hints = typing.get_type_hints(Config)
    for name in raw:
        if name not in hints:
            raise ConfigError(f"{source}: unknown section {name!r}; sections are: {', '.join(hints)}")
    for name, cls in hints.items():
        values = raw.get(name) or {}
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: section {name!r} must be a mapping of keys")
        sections[name] = _build_section(name, cls, values, origins, source)
    config = Config(**sections)
    data, model = config.data, config.model
    if "normalization" not in (raw.get("data") or {}) and data.normalization == "window" and (
            model.predict != "change" or not set(data.targets) <= set(data.features)):
        # a configuration written for the global normalisation (the level, or targets not read) keeps it
        config = dataclasses.replace(config, data=dataclasses.replace(data, normalization="standardize"))
    _check_consistency(config, origins, source)
    if config.model.layers is not None:  # the seeds' full form: its middle entries are the LSTM sizes
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, units=config.model.layers[1:-1]))
    return config


def _build_section(section: str, cls, values: Mapping, origins: Mapping, source: str):
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            where = origins.get((section, key), source)
            raise ConfigError(
                f"{where}: unknown key {section}.{key}; keys of {section!r} are: {', '.join(known)}"
            )
    kwargs = {}
    for key, value in values.items():
        where = origins.get((section, key), source)
        try:
            if isinstance(value, _Override):
                value = value.resolve(hints[key])
            kwargs[key] = _coerce(value, hints[key], known[key].metadata)
        except ValueError as exc:
            got = "***" if "password" in key else _shown(value)
            raise ConfigError(f"{where}: {section}.{key}: {exc} (got {got})") from None
    return cls(**kwargs)


def _shown(value, limit: int = 60) -> str:
    """``repr(value)``, cut short: an error message stays one readable line whatever was given."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _coerce(value, hint, meta):
    if hint is Duration:
        value = parse_duration(value)
        _check_range(value, meta)
        return value
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        item = args[0]
        if isinstance(value, str) and item is str:  # a single string where a list of strings is expected
            value = [v.strip() for v in value.split(",")] if meta.get("comma_list") else [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"must be a list of {item.__name__}")
        return tuple(_coerce(v, item, meta) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be a whole number")
    elif hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("must be a number")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("must be a finite number")
    elif hint is str:
        if not isinstance(value, str) or not value:
            raise ValueError("must be a non-empty string")
        if meta.get("upper"):
            value = value.upper()
    _check_range(value, meta)
    return value


def _check_range(value, meta) -> None:
    low, high, choices = meta.get("low"), meta.get("high"), meta.get("choices")
    if choices is not None and value not in choices:
        raise ValueError(f"must be one of {', '.join(map(str, choices))}")
    above = f"{'>' if meta.get('low_open') else '>='} {low}"
    below = f"{'<' if meta.get('high_open') else '<='} {high}"
    if low is not None and (value <= low if meta.get("low_open") else value < low):
        raise ValueError(f"must be {above}" + (f" and {below}" if high is not None else ""))
    if high is not None and (value >= high if meta.get("high_open") else value > high):
        raise ValueError(f"must be {below}" + (f" and {above}" if low is not None else ""))


def _check_consistency(config: Config, origins: Mapping, source: str) -> None:
    def where(dotted: str) -> str:  # the variable or --set that gave the key, else the file
        return origins.get(tuple(dotted.split(".")), source)

    data, model = config.data, config.model
    servers = config.kafka.bootstrap_servers
    for server in servers or ("",):
        host, _, port = server.rpartition(":")
        if not host or "," in host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise ConfigError(f"{where('kafka.bootstrap_servers')}: kafka.bootstrap_servers: each must be "
                              f"host:port, e.g. broker:9092 (got {list(servers)})")
    k = config.kafka
    if k.security_protocol.startswith("SASL_") and not (k.sasl_username and (k.sasl_password or k.sasl_password_file)):
        raise ConfigError(f"{where('kafka.security_protocol')}: kafka.security_protocol: {k.security_protocol} needs "
                          "kafka.sasl_username and kafka.sasl_password (or kafka.sasl_password_file)")
    for name in ("features", "targets"):
        columns = getattr(data, name)
        if not columns:
            raise ConfigError(f"{where('data.' + name)}: data.{name}: must name at least one column")
        if len(set(columns)) != len(columns):
            raise ConfigError(f"{where('data.' + name)}: data.{name}: a column is named twice ({', '.join(columns)})")
    if not model.units:
        raise ConfigError(f"{where('model.units')}: model.units: needs at least one LSTM size, e.g. [50, 100]")
    if model.layers is not None:
        middle = ", ".join(map(str, model.layers[1:-1] or model.units))
        widths = f"[{len(data.features)}, {middle}, {len(data.targets)}]"
        if len(model.layers) < 3 or (model.layers[0], model.layers[-1]) != (len(data.features), len(data.targets)):
            raise ConfigError(
                f"{where('model.layers')}: model.layers: {list(model.layers)} must read [inputs, LSTM sizes..., "
                f"outputs] with {len(data.features)} input(s) for data.features and {len(data.targets)} output(s) "
                f"for data.targets, e.g. {widths}; or leave model.layers out: the widths follow data.features and "
                f"data.targets, and model.units gives the LSTM sizes"
            )
    if data.normalization == "window" and not set(data.targets) <= set(data.features):
        raise ConfigError(f"{where('data.targets')}: data.targets: window normalisation needs every target among "
                          "data.features (each window is scaled by its own readings); "
                          f"targets {', '.join(data.targets)}")
    if model.predict == "change" and not set(data.targets) <= set(data.features):
        raise ConfigError(f"{where('model.predict')}: model.predict: change needs every target among data.features "
                          f"(the change is added to the last reading); targets {', '.join(data.targets)}")
    if data.normalization == "window" and model.predict != "change":
        raise ConfigError(f"{where('model.predict')}: model.predict: {model.predict} with data.normalization window; "
                          "a window-normalised model predicts the change (or set data.normalization: standardize)")
    if model.intervals and (len(model.intervals) != 2 or not model.intervals[0] < model.intervals[1] < 1.0):
        raise ConfigError(f"{where('model.intervals')}: model.intervals: two quantiles, lower then upper, each "
                          f"between 0 and 1, e.g. [0.1, 0.9], or [] for none (got {list(model.intervals)})")
    if config.retrain.trigger_skill is not None and not k.health_topic:
        raise ConfigError(f"{where('retrain.trigger_skill')}: retrain.trigger_skill: the fleet's skill is read from "
                          "kafka.health_topic, which is not set: set it, for the daemons and the retrainer alike")
    band = model.anomaly_quantiles
    if band and (len(band) != 2 or not band[0] < band[1] < 1.0):
        raise ConfigError(f"{where('model.anomaly_quantiles')}: model.anomaly_quantiles: two quantiles, lower then "
                          f"upper, each between 0 and 1, e.g. [0.005, 0.995], or [] for no anomaly events "
                          f"(got {list(band)})")
    if band and model.intervals and not (band[0] <= model.intervals[0] and model.intervals[1] <= band[1]):
        raise ConfigError(f"{where('model.anomaly_quantiles')}: model.anomaly_quantiles: {list(band)} must be at "
                          f"least as wide as model.intervals {list(model.intervals)} (a reading inside the published "
                          "interval is never an anomaly)")


def _as_plain(config: Config) -> dict:
    return {f.name: dataclasses.asdict(getattr(config, f.name)) for f in dataclasses.fields(config)}
