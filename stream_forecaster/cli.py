"""The ``stream-forecaster`` command.

User errors (configuration, data, missing model) print one line and exit 2;
Ctrl-C exits 130 without leaving anything half-written. TensorFlow is imported
only by the commands that need it, after their cheap checks (configuration,
input files, outputs, model versions), so ``--help`` and those errors are
instant; its C++ start-up lines are kept off stderr (see :mod:`.logs`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import __version__, logs
from .config import Config, load_config
from .errors import Interrupted, UserError
from .files import SAMPLE_PATH
from .store import ModelStore, open_store

if TYPE_CHECKING:
    from .model import Forecaster

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
log = logging.getLogger("stream_forecaster")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE",
        help="YAML configuration (default: ./config.yaml if it exists, else built-in defaults)",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one setting (YAML value); repeatable",
    )


# what `stream-forecaster COMMAND --help` says first: what the command does and its most common use
DESCRIPTIONS = {
    "train": "Train a model version on a data file (default: data.path, else the bundled sample) or on the input "
             "topic, test it on the end of the data it did not learn from, and make it the current version. "
             "Most common: stream-forecaster train --data readings.csv",
    "evaluate": "Backtest a stored model one step ahead over every window of a data file, next to the persistence "
                "and day-before baselines. Most common: stream-forecaster evaluate --data readings.csv (the current "
                "version; --model picks another).",
    "run": "The daemon: forecast every reading of kafka.input_topic onto kafka.output_topic, take up new model "
           "versions as they are published, and serve /metrics, /healthz and /readyz. Most common: "
           "stream-forecaster run --config config.yaml, once train has written a first version.",
    "replay": "Produce the data lines of a UCI file into kafka.input_topic as one sensor's readings, at a steady "
              "rate: for demos, load tests and backfills. Most common: stream-forecaster replay --rate 1000 "
              "(the bundled sample, to a daemon that runs).",
    "broker": "Run the embedded development broker at the first of kafka.bootstrap_servers until Ctrl-C, in memory "
              "only: to try the daemon without a Kafka cluster. Most common: stream-forecaster broker, then run "
              "and replay in other terminals.",
    "retrain": "Retrain on the recent history of the input topic on a schedule, and publish a new version only "
               "when it beats the serving one (the validation gate). Most common: stream-forecaster retrain next "
               "to the daemon, or retrain --once from cron.",
    "models": "List the model versions in model_store.path, show one's metadata, make one current, roll back "
              "to the previous one, or have the daemons forecast one in shadow beside the current one (promoted "
              "if it beats it on live readings); the daemon swaps to the current version by itself. Most common: "
              "stream-forecaster models list",
    "health": "Each sensor's live errors beside persistence's, as the daemons last wrote them to kafka.health_topic, "
              "worst skill first. Most common: stream-forecaster health --worst 20",
    "demo": "Everything on one machine: a development broker, a model (trained if the store has none), the daemon "
            "and a replay of the bundled sample's last week, with a live view and a plot at the end. Most common: "
            "stream-forecaster demo",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stream-forecaster",
                                     description="Streaming one-step-ahead LSTM forecasts for sensor fleets on Kafka.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=DESCRIPTIONS[name])
        _common(sub)
        return sub

    data_help = "CSV, JSON lines or UCI file, plain, .gz or .zip (default: data.path, else the bundled sample)"
    train = command("train", "train a model version on a data file (or the input topic) and test it")
    source = train.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="PATH", help=data_help)
    source.add_argument("--from-topic", action="store_true",
                        help="train on the last retrain.history of kafka.input_topic, read as the retrainer reads it")
    train.add_argument("--from", dest="initial", metavar="VERSION",
                       help="continue training this stored version (same features, targets and window) on the data")
    train.add_argument("--quiet", action="store_true", help="no Keras progress display")
    train.add_argument("--until", metavar="DATE", type=_date, help="use only readings before DATE (e.g. 2007-04-01)")

    evaluate = command("evaluate", "one-step-ahead backtest of a model over every window of a file")
    evaluate.add_argument("--data", metavar="PATH", help=data_help)
    evaluate.add_argument("--worst", type=_positive(int), default=5, metavar="N",
                          help="list the N sensors with the lowest skill (multi-sensor data; default 5)")
    evaluate.add_argument("--model", metavar="VERSION_OR_PATH",
                          help="model version in the store or a version directory (default: current)")
    evaluate.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    evaluate.add_argument("--since", metavar="DATE", type=_date,
                          help="score only forecasts of readings from DATE on (earlier readings still fill windows)")
    evaluate.add_argument("--until", metavar="DATE", type=_date, help="score only forecasts of readings before DATE")
    evaluate.add_argument("--plot", metavar="FILE.png", help="plot the first 100 predictions against the truth")
    evaluate.add_argument("--csv-dir", metavar="DIR", help="write predicted.csv and test_data.csv")

    command("run", "the daemon: forecast every reading of the input topic")

    replay = command("replay", "produce the lines of a UCI file into the input topic")
    replay.add_argument("--data", metavar="FILE",
                        help="UCI .txt/.zip/.gz (default: data.path, else the bundled sample)")
    replay.add_argument("--sensor", default="house-1", help="message key, the sensor id (default: house-1)")
    pace = replay.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=_positive(float), default=100.0, metavar="N",
                      help="messages per second (default 100)")
    pace.add_argument("--max", action="store_true", help="as fast as the broker takes them")
    replay.add_argument("--skip", type=_positive(int, zero=True), default=0, metavar="N",
                        help="start after the first N data lines")
    replay.add_argument("--limit", type=_positive(int, zero=True), metavar="N", help="send at most N lines")

    command("broker", "run the embedded development broker until Ctrl-C")

    retrain = command("retrain", "retrain every retrain.every; publish past the validation gate")
    retrain.add_argument("--once", action="store_true", help="run one cycle and exit (for cron); exit 1 if it failed")
    retrain.add_argument("--data", metavar="FILE",
                         help="train on this CSV, JSON lines or UCI file instead of the input topic")

    models = command("models", "list, show, promote and roll back model versions")
    models.add_argument("action", choices=("list", "show", "promote", "rollback", "shadow"))
    models.add_argument("version", nargs="?",
                        help="the version, for show, promote and shadow (shadow none: stop the shadow)")

    health = command("health", "the sensors with the worst live skill, from kafka.health_topic")
    health.add_argument("--worst", type=_positive(int), default=20, metavar="N",
                        help="list the N sensors with the lowest skill (default 20)")
    health.add_argument("--min-scored", type=_positive(int, zero=True), default=1, metavar="N",
                        help="only sensors with at least N scored forecasts (default 1)")
    health.add_argument("--json", action="store_true", help="print their health records as one JSON array")

    demo = command("demo", "broker, model, daemon and replay together, with a live view")
    demo.add_argument("--duration", type=_positive(float), metavar="SECONDS",
                      help="stop after this long (default: when the replay is done)")
    demo.add_argument("--rate", type=_positive(float), default=200.0, metavar="N",
                      help="replayed readings per second (default 200)")
    demo.add_argument("--out", default="out", metavar="DIR", help="where the plot goes (default: out)")
    return parser


def _positive(kind, zero: bool = False):
    """An argparse type: a number of ``kind`` above zero (or at least zero)."""
    def read(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < 0 or (value == 0 and not zero) or value != value:
            raise argparse.ArgumentTypeError(f"{text!r} must be {'0 or more' if zero else 'more than 0'}")
        return value
    return read


def _date(text: str) -> int:
    """Seconds of an ISO date or time, read like the data's own timestamps (no zone)."""
    try:
        stamp = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO date such as 2007-04-01") from None
    if stamp.tzinfo is not None:  # the data's times carry no zone, so one here could only be ignored
        raise argparse.ArgumentTypeError(f"{text!r}: give the time as the data writes it, without a zone")
    return int(stamp.replace(tzinfo=dt.timezone.utc).timestamp())


def _config(args) -> Config:
    path = args.config
    if path is None and Path("config.yaml").is_file():
        path = "config.yaml"
    with logs.held("stream_forecaster.config") as notes:  # its warnings, in the format it configures
        config = load_config(path, args.overrides)
    logs.configure(config.logging)
    for note in notes:
        logging.getLogger(note.name).handle(note)
    for key in config.kafka.unused_security():
        log.warning("kafka.%s is set, but kafka.security_protocol %s does not use it: it is ignored",
                    key, config.kafka.security_protocol)
    return config


def _data_path(args, config: Config) -> Path:
    return Path(args.data or config.data.path or SAMPLE_PATH)


def _read(path: Path, columns, config: Config):
    from .retrain import read_file

    return read_file(path, columns, config.data)


def _check_input(path: Path) -> Path:
    """Refuse a data file that cannot be read before TensorFlow loads (seconds) rather than after."""
    if not path.exists():
        raise UserError(f"{path}: no such file; give an existing file with --data, or set data.path")
    if path.is_dir():
        raise UserError(f"{path}: not a file; give a CSV, JSON lines or UCI file (plain, .gz or .zip)")
    if path.is_file():  # a pipe (<(zcat ...)) is read once, so it is not opened to try it
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise UserError(f"{path}: cannot read it ({exc.strerror}); check its permissions") from None
    return path


def _load_tensorflow() -> None:
    """Load TensorFlow once the cheap checks have passed, its C++ start-up lines held back (see logs.quiet_import)."""
    logs.quiet_import(f"{__package__}.model")


def _check_output(path: Path, parent: Path, directory: bool = False) -> None:
    """Refuse an output path that cannot be written before a long backtest rather than after it."""
    if path.exists() and path.is_dir() != directory:
        raise UserError(f"{path}: {'not ' if directory else ''}a directory")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"{path}: cannot write there ({parent} is not a writable directory)")


def _union(*groups) -> list[str]:
    return list(dict.fromkeys(name for group in groups for name in group))


def _stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM: long work stops at its next safe point instead of mid-step."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def cmd_train(args) -> int:
    config = _config(args)
    store = open_store(config)
    store.check_writable()
    path = None if args.from_topic else _check_input(_data_path(args, config))
    initial = _initial(store, args.initial, config) if args.initial else None
    _load_tensorflow()
    from .report import format_sensors, format_table
    from .training import train

    stop = _stop_on_signals()
    columns = _union(config.data.features, config.data.targets)
    if path is None:  # --from-topic
        from .retrain import read_topic

        series = read_topic(config, columns, stop)
    else:
        series = _read(path, columns, config)
    if args.until is not None:
        series = series.select(series.timestamps < args.until)
    log.info("read %s: %d readings of %d sensor(s), %d missing skipped, %d malformed skipped",
             series.source, len(series), len(series.sensors) or 1, series.missing, series.malformed)
    trained = train(config, series, initial=initial, verbose=0 if args.quiet else "auto", stop=stop)
    if stop.is_set():  # after the last epoch, during calibration and the test
        raise Interrupted("stopped after training; nothing was written")
    diverged = trained.diverged()
    if diverged:
        raise UserError(f"{diverged}: nothing was written; lower model.learning_rate, or try "
                        "model.loss=huber or model.optimizer=adam")
    version = store.publish(trained.forecaster.save)
    summary = trained.test.summary()
    first, last = trained.forecaster.metadata.data["test_range"]
    print(f"model version {version} written to {store.directory(version)} (trained in {trained.seconds:.1f} s)")
    print(f"test split: {summary['n']} windows, {first} to {last}")
    print(format_table(summary))
    if "per_sensor" in summary:
        print(format_sensors(summary["per_sensor"], 5))
    return 0


def _initial(store: ModelStore, version: str, config: Config) -> Forecaster:
    """The stored ``version`` to continue training, checked against what the configuration trains (before
    TensorFlow loads)."""
    directory, _ = store.resolve(version)
    store.verify(directory)
    meta = store.metadata(version)
    mismatch = meta.mismatch(config.data.features, config.data.targets, config.model.sequence_length)
    if mismatch:
        raise UserError(f"model {version}: {mismatch}: set data.features, data.targets and model.sequence_length "
                        "as the model has them")
    if meta.layers is not None and list(meta.layers) != config.layers():
        raise UserError(f"model {version} has layers {list(meta.layers)}, the configuration asks for "
                        f"{config.layers()}: set model.units to {list(meta.layers[1:-1])}")
    _load_tensorflow()
    return store.load(version, jit_compile=config.model.jit_compile)


def cmd_evaluate(args) -> int:
    config = _config(args)
    if args.plot:
        _check_output(Path(args.plot), Path(args.plot).parent)  # the plot's directory is not created
    if args.csv_dir:
        csv_dir = Path(args.csv_dir).absolute()  # created with its parents: the nearest existing one must be writable
        _check_output(csv_dir, next(p for p in (csv_dir, *csv_dir.parents) if p.exists()), directory=True)
    path = _check_input(_data_path(args, config))
    store = open_store(config)
    directory, version = store.resolve(args.model)
    store.verify(directory)
    _load_tensorflow()
    from .report import format_sensors, format_table, to_json, worst_sensors, write_csvs, write_plot
    from .training import backtest
    from .window import window_starts

    forecaster = store.load(str(directory), jit_compile=config.model.jit_compile)  # the version checked above
    series = _read(path, _union(forecaster.features, forecaster.targets), config)
    starts = np.concatenate(window_starts(series.segments, len(series), forecaster.sequence_length))
    predicted_at = series.timestamps[starts + forecaster.sequence_length - 1]
    if args.since is not None:
        starts, predicted_at = starts[predicted_at >= args.since], predicted_at[predicted_at >= args.since]
    if args.until is not None:
        starts = starts[predicted_at < args.until]
    if not len(starts):
        raise UserError(f"{series.source}: no window of {forecaster.sequence_length} readings ends in the range given")
    result = backtest(forecaster, series, starts)
    summary = result.summary()
    if args.plot:
        write_plot(result, args.plot)
    if args.csv_dir:
        write_csvs(result, args.csv_dir)
    if args.json:
        worst = {"worst_sensors": worst_sensors(summary["per_sensor"], args.worst)} if "per_sensor" in summary else {}
        print(to_json(summary, data=series.summary(), **worst))
    else:
        print(f"model version {version} on {series.source}: {summary['n']} windows "
              f"({series.missing} missing and {series.malformed} malformed lines skipped)")
        print(format_table(summary))
        if "per_sensor" in summary:
            print(format_sensors(summary["per_sensor"], args.worst))
    return 0


def cmd_run(args) -> int:
    from .service import Daemon

    config = _config(args)
    _load_tensorflow()
    return Daemon(config).run()


def cmd_replay(args) -> int:
    from .replay import replay_file

    config = _config(args)
    sent = replay_file(config.kafka, _data_path(args, config), args.sensor,
                       rate=None if args.max else args.rate, skip=args.skip, limit=args.limit)
    print(f"sent {sent} messages to {config.kafka.input_topic}")
    return 0


def cmd_broker(args) -> int:
    from .devbroker import DevBroker

    config = _config(args)
    host, _, port = config.kafka.bootstrap_servers[0].rpartition(":")
    stop = _stop_on_signals()  # before the first line, so a signal right after it is never missed
    with DevBroker(host or "127.0.0.1", int(port)) as broker:
        print(f"development broker listening on {broker.address} (in memory only); Ctrl-C stops it", flush=True)
        while not stop.wait(0.5):
            code = broker.exit_code()
            if code is not None:
                print(f"the development broker exited with code {code}", file=sys.stderr)
                return 1
        print("stopping the broker", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    config = _config(args)  # its logging settings; the demo adds its broker's address to the rest
    if config.model_store.topic or open_store(config).current() is None:  # a topic's broker is the demo's
        _load_tensorflow()  # the demo trains a first model
    path = args.config if args.config or not Path("config.yaml").is_file() else "config.yaml"
    return run_demo(path, args.overrides, duration=args.duration, rate=args.rate, out_dir=Path(args.out))


def cmd_retrain(args) -> int:
    from .retrain import Retrainer

    config = _config(args)
    _load_tensorflow()
    # a --data file not there yet fails its cycle, not the retrainer: a later cycle may find it
    return Retrainer(config, Path(args.data) if args.data else None).run(once=args.once)


def cmd_models(args) -> int:
    config = _config(args)
    store = open_store(config)
    if args.action in ("show", "promote", "shadow") and not args.version:
        raise UserError(f"models {args.action} needs a VERSION; versions: {', '.join(store.versions()) or 'none'}")
    if args.action == "list":
        from .report import format_versions

        print(format_versions(store))
    elif args.action == "show":
        print(json.dumps(store.metadata(args.version).to_dict(), indent=2, sort_keys=True))
    elif args.action == "promote":
        if args.version not in store.versions():
            raise UserError(f"no model version {args.version!r}; versions: {', '.join(store.versions()) or 'none'}")
        store.set_current(args.version)
        print(f"current model: version {args.version}")
    elif args.action == "shadow":
        if args.version == "none":
            store.set_shadow(None)
            print("no shadow candidate")
            return 0
        if args.version not in store.versions():
            raise UserError(f"no model version {args.version!r}; versions: {', '.join(store.versions()) or 'none'}")
        if args.version == store.current():
            raise UserError(f"version {args.version} is the current one: shadow another, to compare with it")
        store.set_shadow(args.version)
        print(f"shadow candidate: version {args.version} (the daemons forecast it beside version "
              f"{store.current()} and promote it if it wins)")
    else:
        previous, current = store.previous(), store.current()
        if current is None:
            raise UserError(f"nothing to roll back: {store.path} holds no model yet "
                            "(train one: stream-forecaster train)")
        if previous is None:
            raise UserError(f"nothing to roll back to: no version older than {current} in {store.path}")
        store.set_current(previous)
        print(f"current model: version {previous} (rolled back)")
    return 0


def cmd_health(args) -> int:
    from .health_topic import read_health, skill_of, worst
    from .report import format_health

    config = _config(args)
    health = read_health(config.kafka)
    records = worst(health, args.worst, args.min_scored)
    if args.json:
        print(json.dumps(records))
        return 0
    if not health:
        print(f"no sensor health in {config.kafka.health_topic} yet: the daemons write it every "
              "metrics.health_interval once they score forecasts")
        return 0
    losing = sum(1 for r in health.values() if skill_of(r) < 0)
    print(format_health(records, len(health), losing))
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "run": cmd_run, "replay": cmd_replay,
            "broker": cmd_broker, "demo": cmd_demo, "retrain": cmd_retrain, "models": cmd_models,
            "health": cmd_health}


def main(argv: list[str] | None = None) -> int:
    logs.quiet_native()  # before anything loads TensorFlow, which reads the setting once
    args = _parser().parse_args(argv)
    logs.configure()  # until a command has read its configuration
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"stream-forecaster {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        why = f" ({exc})" if str(exc) else ""  # an Interrupted says where it stopped
        print(f"stream-forecaster {args.command}: interrupted{why}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
