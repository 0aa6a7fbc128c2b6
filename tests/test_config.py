import re
from pathlib import Path

import pytest

from stream_forecaster.config import Config, ConfigError, load_config
from stream_forecaster.config import parse_duration as seconds_of

REPO_CONFIG = __import__("pathlib").Path(__file__).parents[1] / "config.yaml"


def test_repo_config_holds_exactly_the_defaults():
    assert load_config(REPO_CONFIG, environ={}) == Config()


def test_defaults_keep_the_seed_architecture_and_learn_the_step_from_every_column():
    config = load_config(None, environ={})
    assert config.model.sequence_length == 50
    assert config.layers() == [7, 50, 100, 1] and len(config.data.features) == 7
    assert config.data.normalization == "window"
    assert config.model.dropout == 0.2
    assert config.model.predict == "change" and config.model.loss == "huber"
    assert config.data.train_split == 0.9


def test_widths_follow_the_features_and_targets_and_the_seeds_form_is_kept_where_it_agrees():
    two = load_config(None, ["data.features=[Voltage, Global_intensity]", "data.targets=[Voltage]"], environ={})
    assert two.layers() == [2, 50, 100, 1]
    full = load_config(None, ["data.features=[Voltage]", "data.targets=[Voltage]", "model.layers=[1, 8, 4, 1]"],
                       environ={})
    assert (full.model.units, full.layers()) == ((8, 4), [1, 8, 4, 1])
    assert load_config(None, ["model.units=[16]"], environ={}).layers() == [7, 16, 1]


def test_window_normalisation_predicts_the_change_and_a_configuration_without_it_keeps_the_global_one():
    with pytest.raises(ConfigError, match="model.predict: level with data.normalization window"):
        load_config(None, ["model.predict=level", "data.normalization=window"], environ={})
    with pytest.raises(ConfigError, match="data.targets: window normalisation needs every target"):
        load_config(None, ["data.targets=[Voltage]", "data.features=[Sub_metering_1]", "data.normalization=window"],
                    environ={})
    # a file written before window normalisation: it asks for the level and names no normalisation
    assert load_config(None, ["model.predict=level"], environ={}).data.normalization == "standardize"
    assert load_config(None, ["data.targets=[Voltage]", "data.features=[Sub_metering_1]", "model.predict=level"],
                       environ={}).data.normalization == "standardize"


def test_config_is_frozen():
    config = load_config(None, environ={})
    with pytest.raises(AttributeError):
        config.model.epochs = 3


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("model:\n  epoch: 3\n", ["unknown key model.epoch", "keys of 'model' are", "epochs"]),
        ("modle:\n  epochs: 3\n", ["unknown section 'modle'", "model"]),
        ("model:\n  epochs: three\n", ["model.epochs", "whole number", "'three'"]),
        ("model:\n  epochs: 0\n", ["model.epochs", ">= 1"]),
        ("model:\n  dropout: 1.0\n", ["model.dropout", "< 1"]),
        ("model:\n  dropout: -0.1\n", ["model.dropout", ">= 0"]),
        ("model:\n  loss: hinge\n", ["model.loss", "mse, mae, huber"]),
        ("model:\n  epochs: true\n", ["model.epochs", "whole number"]),
        ("data:\n  ratio: 0\n", ["data.ratio", "> 0"]),
        ("data:\n  ratio: .nan\n", ["data.ratio", "finite"]),
        ("data:\n  features: [Voltage, Voltage]\n  \n", ["data.features", "named twice"]),
        ("data:\n  features: [Voltage, Global_intensity]\nmodel:\n  layers: [7, 50, 100, 1]\n",
         ["model.layers", "2 input(s) for data.features", "leave model.layers out"]),
        ("data:\n  targets: [Voltage, Global_intensity]\nmodel:\n  layers: [7, 50, 100, 1]\n",
         ["model.layers", "2 output(s) for data.targets"]),
        ("data:\n  targets: [Sub_metering_4]\n  normalization: window\n",
         ["data.targets", "window normalisation needs every target"]),
        ("model:\n  layers: [7, 1]\n", ["model.layers", "[inputs, LSTM sizes..., outputs]"]),
        ("model:\n  units: []\n", ["model.units", "at least one LSTM size"]),
        ("model:\n  layers: [1, 0, 1]\n", ["model.layers", ">= 1"]),
        ("model_store:\n  poll_interval: soon\n", ["model_store.poll_interval", "duration"]),
        ("kafka:\n  bootstrap_servers: 9092\n", ["kafka.bootstrap_servers", "list of str"]),
        ("- just\n- a list\n", ["top level must be a mapping"]),
        ("model: [1, 2]\n", ["section 'model' must be a mapping"]),
        ("model: {epochs: [}\n", ["line 1, column 18: could not parse YAML: expected the node content"]),
    ],
)
def test_bad_file_values_name_file_key_and_what_is_allowed(tmp_path, text, fragments):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml", environ={})


def test_set_overrides_parse_yaml_and_beat_the_file(tmp_path):
    path = write(tmp_path, "model:\n  epochs: 2\n")
    config = load_config(path, ["model.epochs=5", "kafka.bootstrap_servers=[a:1, b:2]"], environ={})
    assert config.model.epochs == 5
    assert config.kafka.bootstrap_servers == ("a:1", "b:2")


def test_a_section_with_every_key_commented_out_still_takes_overrides_and_presets(tmp_path):
    path = write(tmp_path, "model:\n  # epochs: 3\nkafka:\ndata:\n")
    config = load_config(path, ["model.epochs=4", "model.preset=tutorial"],
                         environ={"STREAM_FORECASTER__KAFKA__GROUP_ID": "g"})
    assert (config.model.epochs, config.kafka.group_id, config.data.normalization) == (4, "g", "center")


def test_single_string_is_accepted_for_a_list_of_strings():
    config = load_config(None, ["kafka.bootstrap_servers=host:9092", "data.features=Voltage",
                                "data.targets=Voltage", "model.layers=[1, 8, 1]"], environ={})
    assert config.kafka.bootstrap_servers == ("host:9092",)
    assert config.data.features == ("Voltage",)


def test_environment_overrides_and_set_beats_environment():
    env = {"STREAM_FORECASTER__MODEL__EPOCHS": "4", "STREAM_FORECASTER__KAFKA__GROUP_ID": "g1", "OTHER": "x"}
    assert load_config(None, environ=env).model.epochs == 4
    assert load_config(None, environ=env).kafka.group_id == "g1"
    assert load_config(None, ["model.epochs=6"], environ=env).model.epochs == 6


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("model.epochs", ["--set model.epochs", "section.key=value"]),
        ("epochs=3", ["--set epochs", "section.key"]),
        ("model.nope=3", ["--set model.nope", "unknown key model.nope"]),
        ("model.epochs=-1", ["--set model.epochs", ">= 1"]),
        ("model.dropout=1.0", ["--set model.dropout", "must be < 1.0 and >= 0.0"]),
        ("kafka.bootstrap_servers=[]", ["--set kafka.bootstrap_servers", "host:port"]),
        ("kafka.bootstrap_servers=[localhost]", ["--set kafka.bootstrap_servers", "host:port"]),
        ("kafka.bootstrap_servers=a:1,b:99999", ["--set kafka.bootstrap_servers", "host:port"]),
        ("model.layers=[3, 50, 100, 1]", ["--set model.layers", "7 input(s) for data.features"]),
        ("kafka.security_protocol=SASL_SSL", ["--set kafka.security_protocol", "needs kafka.sasl_username"]),
        ("model.validation_split=1", ["--set model.validation_split", "< 1.0"]),
        ("data.train_split=1", ["--set data.train_split", "< 1.0"]),
        ("model.seed=5000000000", ["--set model.seed", "<= 4294967295"]),
    ],
)
def test_bad_overrides_name_the_override(override, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override], environ={})
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("secret", ["abc #def", "#secret", "123456", "@at", "*star", "true", "[x"])
def test_string_keys_take_the_override_as_written(secret):
    env = {"STREAM_FORECASTER__KAFKA__SASL_PASSWORD": secret}
    assert load_config(None, environ=env).kafka.sasl_password == secret
    assert load_config(None, [f"kafka.sasl_password={secret}"], environ={}).kafka.sasl_password == secret
    assert load_config(None, [f"kafka.group_id={secret}"], environ={}).kafka.group_id == secret


@pytest.mark.parametrize(
    "overrides, unused",
    [
        (["kafka.sasl_password=x", "kafka.ssl_cafile=ca.pem"], ["ssl_cafile", "sasl_password"]),
        (["kafka.security_protocol=SSL", "kafka.ssl_cafile=ca.pem", "kafka.sasl_username=u"], ["sasl_username"]),
        (["kafka.security_protocol=SASL_PLAINTEXT", "kafka.sasl_username=u", "kafka.sasl_password=p",
          "kafka.ssl_certfile=c.pem"], ["ssl_certfile"]),
        (["kafka.security_protocol=SASL_SSL", "kafka.sasl_username=u", "kafka.sasl_password=p",
          "kafka.ssl_cafile=ca.pem"], []),
    ],
)
def test_security_keys_the_protocol_ignores_are_named(overrides, unused):
    assert load_config(None, overrides, environ={}).kafka.unused_security() == unused


def test_an_override_of_null_clears_an_optional_string():
    assert load_config(None, ["kafka.dead_letter_topic=null"], environ={}).kafka.dead_letter_topic is None


def test_a_refused_password_is_not_repeated_in_the_error():
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={"STREAM_FORECASTER__KAFKA__SASL_PASSWORD": "  "})
    assert "environment variable STREAM_FORECASTER__KAFKA__SASL_PASSWORD" in str(info.value)
    assert "***" in str(info.value)


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match="environment variable STREAM_FORECASTER__MODEL__DROPOUT"):
        load_config(None, environ={"STREAM_FORECASTER__MODEL__DROPOUT": "2"})


@pytest.mark.parametrize("text, expected", [(90, 90.0), ("30s", 30.0), ("5m", 300.0), ("6h", 21600.0),
                                           ("14d", 1209600.0), ("1.5h", 5400.0), ("250ms", 0.25)])
def test_durations(text, expected):
    assert seconds_of(text) == expected


def test_durations_in_config():
    config = load_config(None, ["retrain.every=2h", "retrain.history=3d"], environ={})
    assert config.retrain.every == 7200.0 and config.retrain.history == 3 * 86400.0


def test_replace_checks_values():
    config = load_config(None, environ={})
    assert config.replace("data", path="x.txt").data.path == "x.txt"
    with pytest.raises(ConfigError, match="data.ratio"):
        config.replace("data", ratio=2)


def all_keys():
    import dataclasses
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(Config)
            for f in dataclasses.fields(getattr(Config(), s.name))]


def test_every_key_is_commented_in_config_yaml_and_documented_in_readme():
    import yaml
    reference = (REPO_CONFIG.parent / "docs" / "configuration.md").read_text()
    raw = yaml.safe_load(REPO_CONFIG.read_text())
    lines = REPO_CONFIG.read_text().splitlines()
    for dotted in all_keys():
        section, key = dotted.split(".")
        assert key in raw[section], f"{dotted} missing from config.yaml"
        line = next(l for l in lines if l.strip().startswith(f"{key}:"))
        assert "#" in line, f"{dotted} has no comment in config.yaml"
        row = re.search(rf"^\| `{re.escape(dotted)}` \| `([^`]*)` \|", reference, re.MULTILINE)
        assert row, f"{dotted} missing from docs/configuration.md's table (| `key` | `default` | meaning |)"
        assert yaml.safe_load(row.group(1)) == raw[section][key], \
            f"{dotted}: docs/configuration.md's default is not config.yaml's"


def test_exponent_without_a_dot_is_a_number():
    assert load_config(None, ["model.learning_rate=1e-4"], environ={}).model.learning_rate == 1e-4


def test_seed_preset_replaces_the_keys_it_names_and_set_still_wins():
    shipped = Path(__file__).resolve().parents[1] / "config.yaml"
    seed = load_config(shipped, ["model.preset=tutorial"], environ={})
    assert (seed.model.layers, seed.model.loss, seed.model.optimizer, seed.model.predict) == \
        ((1, 50, 100, 1), "mse", "rmsprop", "level")
    assert (seed.data.features, seed.data.normalization, seed.model.epochs) == (("Global_active_power",), "center", 3)
    assert seed.model_store == load_config(shipped, environ={}).model_store  # other sections untouched
    tuned = load_config(shipped, ["model.preset=tutorial", "model.epochs=5"], environ={})
    assert tuned.model.epochs == 5
    with pytest.raises(ConfigError, match="model.preset: must be one of None, tutorial"):
        load_config(shipped, ["model.preset=tutorials"], environ={})


def test_an_earlier_releases_names_are_read_as_todays_with_a_warning(tmp_path, caplog):
    path = tmp_path / "old.yaml"
    path.write_text("data:\n  interval: 5m\nmodel:\n  preset: seed\n")
    config = load_config(path, ["retrain.interval=2h"], environ={})
    assert (config.data.period, config.retrain.every, config.model.predict) == (300.0, 7200.0, "level")
    assert config == load_config(None, ["data.period=5m", "model.preset=tutorial", "retrain.every=2h"], environ={})
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert ("data.interval is now called data.period" in warned
            and "retrain.interval is now called retrain.every" in warned)
    assert "model.preset seed is now called tutorial" in warned
    assert load_config(path, ["data.period=1m"], environ={}).data.period == 60.0  # --set still wins over the file
    path.write_text("data:\n  interval: 5m\n  period: 1m\n")
    with pytest.raises(ConfigError, match="data.interval and data.period are both set"):
        load_config(path, environ={})


def test_log_levels_are_read_in_any_case():
    assert load_config(None, ["logging.level=info"], environ={}).logging.level == "INFO"
    assert load_config(None, environ={"STREAM_FORECASTER__LOGGING__LEVEL": "Debug"}).logging.level == "DEBUG"
    with pytest.raises(ConfigError, match="logging.level: must be one of"):
        load_config(None, ["logging.level=loud"], environ={})


def test_change_needs_the_targets_among_the_features():
    with pytest.raises(ConfigError, match="model.predict: change needs every target among data.features"):
        load_config(None, ["model.predict=change", "data.features=[Global_active_power]", "data.targets=[Voltage]",
                           "model.layers=[1, 8, 1]", "data.normalization=standardize"], environ={})


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "36501d", "1.0e+300"])
def test_a_duration_must_be_finite_and_at_most_a_century(value):
    with pytest.raises(ConfigError, match="retrain.every: a duration must be finite and at most 100 years"):
        load_config(None, [f"retrain.every={value}"], environ={})


def test_brokers_may_be_given_comma_separated_as_kafka_tools_write_them():
    config = load_config(None, environ={"STREAM_FORECASTER__KAFKA__BOOTSTRAP_SERVERS": "a:9092, b:9093"})
    assert config.kafka.bootstrap_servers == ("a:9092", "b:9093")
    with pytest.raises(ConfigError, match="each must be host:port"):
        load_config(None, ['kafka.bootstrap_servers=["a:9092,b:9092"]'], environ={})


@pytest.mark.parametrize("content, says", [(b"# r\xe9glage\nmodel:\n  epochs: 3\n", "not UTF-8"),
                                           (b"[]\n", "top level must be a mapping"),
                                           (b"false\n", "top level must be a mapping")])
def test_a_config_file_that_is_not_a_utf8_mapping_is_one_clear_error(tmp_path, content, says):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=says):
        load_config(path, environ={})


# PyYAML nests by recursion: these exhaust Python's stack (within the 128 KiB an environment variable may hold)
DEEP = {"list": "[" * 100_000, "mapping": "{a: " * 30_000}
SOURCES = {
    "file": lambda tmp_path, deep: load_config(write(tmp_path, f"model:\n  units: {deep}\n"), environ={}),
    "--set": lambda tmp_path, deep: load_config(None, [f"model.units={deep}"], environ={}),
    "env": lambda tmp_path, deep: load_config(None, environ={"STREAM_FORECASTER__MODEL__UNITS": deep}),
}
SAYS = {"file": "c.yaml: nested too deeply to read as YAML: a configuration is sections of keys",
        "--set": "--set model.units: model.units: nested too deeply to read as YAML: give a plain value",
        "env": "environment variable STREAM_FORECASTER__MODEL__UNITS: model.units: nested too deeply"}


@pytest.mark.parametrize("deep", DEEP.values(), ids=DEEP)
@pytest.mark.parametrize("source", SOURCES)
def test_yaml_nested_too_deeply_is_one_short_line_naming_its_source(tmp_path, source, deep):
    with pytest.raises(ConfigError) as info:
        SOURCES[source](tmp_path, deep)
    message = str(info.value)
    assert SAYS[source] in message
    assert "\n" not in message and len(message) < 300  # the value given is cut short, not repeated


@pytest.mark.parametrize("text, says", [
    ("model:\n  epochs: 3\n    x: [\n", " line 3, column 6: could not parse YAML: mapping values are not allowed here"),
    ("model:\n  epochs: 3\n units: 4\n",
     " line 3, column 2: could not parse YAML: expected <block end>, but found '<block mapping start>' "
     "(while parsing a block mapping from line 1)"),
    ("model: [1,\n 2\n", " line 3, column 1: could not parse YAML: expected ',' or ']', but got '<stream end>' "
                          "(while parsing a flow sequence from line 1)"),
    ("model: a\n\x01\n", ": could not parse YAML: unacceptable character #x0001: special characters are not allowed"),
], ids=["indented", "dedented", "unclosed", "control character"])
def test_malformed_yaml_is_one_line_with_its_place(tmp_path, text, says):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value) == f"{path}{says}"  # a control character has no line and column


def test_a_malformed_override_is_one_line_with_its_place():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.units=[1, 2"], environ={})
    assert str(info.value) == ("--set model.units: model.units: could not parse YAML at line 1, column 6: "
                               "expected ',' or ']', but got '<stream end>' (got '[1, 2')")
