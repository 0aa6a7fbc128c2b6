"""deploy/: the files users run are valid for the tools that read them, and say what they must."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stream_forecaster.config import load_config
from stream_forecaster.metrics import Metrics, RetrainMetrics

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None and not os.environ.get("CI"),
                                    reason="promtool is not installed "
                                           "(./dev test installs it: apt-get install prometheus)")


def promtool(*args, input=None) -> str:
    assert PROMTOOL, "promtool is required in CI: apt-get install prometheus"
    result = subprocess.run([PROMTOOL, *args], input=input, capture_output=True, text=True, cwd=DEPLOY / "prometheus")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@needs_promtool
def test_prometheus_config_and_rules_pass_promtool():
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"][0]["rules"]
    assert f"SUCCESS: {len(rules)} rules found" in promtool("check", "rules", "rules.yml")  # none skipped


@needs_promtool
def test_alerts_fire_on_the_series_that_should_trip_them():
    assert "SUCCESS" in promtool("test", "rules", "rules_test.yml")
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"][0]["rules"]
    tests = yaml.safe_load((DEPLOY / "prometheus" / "rules_test.yml").read_text())["tests"]
    firing = {t["alertname"] for case in tests for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert firing == {r["alert"] for r in rules if "alert" in r}, "every alert needs a unit test that fires it"


def test_rules_cover_the_alerts_operators_need():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"][0]["rules"]
    alerts = {r["alert"]: r["expr"] for r in rules if "alert" in r}
    assert set(alerts) == {"StreamForecasterWorseThanPersistence", "StreamForecasterNoPredictions",
                           "StreamForecasterConsumerLagGrowing", "StreamForecasterRetrainFailing",
                           "StreamForecasterModelStale", "StreamForecasterStuck", "StreamForecasterAnomalyRateHigh",
                           "StreamForecasterSensorsWorseThanPersistence"}
    assert all(r.get("annotations", {}).get("description") for r in rules if "alert" in r)
    assert "stream_forecaster_anomalies_total" in rules_expr(rules, "stream_forecaster:anomaly_ratio_15m")
    assert "stream_forecaster_scored_predictions_total" in rules_expr(rules, "stream_forecaster:anomaly_ratio_1d")
    descriptions = {r["alert"]: r["annotations"]["description"] for r in rules if "alert" in r}
    assert "stream-forecaster health --worst" in descriptions["StreamForecasterAnomalyRateHigh"]


def rules_expr(rules: list[dict], record: str) -> str:
    return next(r["expr"] for r in rules if r.get("record") == record)


def exported_names() -> set[str]:
    """Every series name the daemon and the retrainer can export, plus the recording rules."""
    names = set()
    for registry in (Metrics(["Global_active_power"]).registry, RetrainMetrics().registry):
        for family in registry.collect():
            names.add(family.name)
            names.update(s.name for s in family.samples)
            if family.type in ("counter",):
                names.add(family.name + "_total")
            if family.type == "histogram":
                names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"][0]["rules"]
    return names | {r["record"] for r in rules if "record" in r}


def series_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(stream_forecaster[:_][a-z0-9_:]+)", expr))


def test_rules_and_dashboard_query_only_series_that_exist():
    known = exported_names()
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"][0]["rules"]
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "stream-forecaster.json").read_text())
    exprs = [r["expr"] for r in rules] + [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = set().union(*map(series_names, exprs))
    assert used and used <= known, f"unknown series: {sorted(used - known)}"
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("per second", "latency", "mae", "rmse", "skill", "model version", "lag", "quantiles",
                  "worse than persistence", "sensors counted", "anomaly rate", "gaps", "shadow candidate",
                  "shadow decisions", "retraining starts", "fleet skill"):
        assert topic in titles
    panel_exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    shown = set().union(*map(series_names, panel_exprs))
    assert {"stream_forecaster_sensor_skill", "stream_forecaster_sensors_worse_than_persistence_ratio",
            "stream_forecaster_health_sensors", "stream_forecaster:anomaly_ratio_15m", "stream_forecaster_gaps_total",
            "stream_forecaster_shadow_decisions_total", "stream_forecaster_shadow_scored_predictions_total",
            "stream_forecaster_shadow_version", "stream_forecaster_retrain_starts_total",
            "stream_forecaster_retrain_fleet_skill"} <= shown
    assert any('forecaster="candidate"' in e for e in panel_exprs)


def test_dashboard_panels_have_unique_ids_and_do_not_overlap():
    panels = json.loads((DEPLOY / "grafana" / "dashboards" / "stream-forecaster.json").read_text())["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "prometheus"}
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"panel {p['id']} overlaps another"
        cells |= area
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])


@needs_promtool
def test_dashboard_queries_parse(tmp_path):
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "stream-forecaster.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"panel:query_{i}", "expr": e}
                                                        for i, e in enumerate(exprs)]}]}
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    assert f"SUCCESS: {len(exprs)} rules found" in promtool("check", "rules", str(tmp_path / "dashboard.yml"))


def test_compose_runs_kafka_in_kraft_mode_daemon_retrainer_prometheus_and_grafana():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
    assert services["forecaster"]["command"][0] == "run"
    assert services["retrainer"]["command"][0] == "retrain"
    assert any("/etc/prometheus" in v for v in services["prometheus"]["volumes"])
    assert any("provisioning" in v for v in services["grafana"]["volumes"])
    for name in ("forecaster", "retrainer", "trainer"):
        assert "models:/models" in services[name]["volumes"]
        assert services[name]["environment"]["STREAM_FORECASTER__KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"


def test_dockerfile_runs_the_daemon_as_a_non_root_user_with_a_health_check():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^USER (?!root)\S+", text, re.M)
    assert "/healthz" in re.search(r"^HEALTHCHECK .*(?:\n\s+.*)*", text, re.M).group(0)
    assert 'ENTRYPOINT ["stream-forecaster"]' in text and 'CMD ["run"' in text


def k8s(kind: str) -> dict:
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == kind:
                return doc
    raise AssertionError(f"no {kind} in deploy/k8s")


def test_kubernetes_manifests_probe_mount_and_scrape():
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert all((DEPLOY / "k8s" / r).is_file() for r in kustomization["resources"])
    pod = k8s("Deployment")["spec"]["template"]["spec"]
    daemon = pod["containers"][0]
    assert daemon["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert daemon["readinessProbe"]["httpGet"]["path"] == "/readyz"
    claim = k8s("PersistentVolumeClaim")["metadata"]["name"]
    job = k8s("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    for spec in (pod, job):
        assert any(v.get("persistentVolumeClaim", {}).get("claimName") == claim for v in spec["volumes"])
        assert any(v.get("configMap", {}).get("name") == "stream-forecaster-config" for v in spec["volumes"])
    assert "--once" in job["containers"][0]["args"]
    assert k8s("ServiceMonitor")["spec"]["endpoints"][0]["path"] == "/metrics"


def test_kubernetes_configmap_is_config_yaml_with_the_in_cluster_settings(tmp_path):
    text = k8s("ConfigMap")["data"]["config.yaml"]
    (tmp_path / "config.yaml").write_text(text)
    in_cluster = load_config(tmp_path / "config.yaml", environ={})
    shipped = load_config(DEPLOY.parent / "config.yaml", environ={})
    assert in_cluster.kafka.bootstrap_servers != shipped.kafka.bootstrap_servers
    assert (in_cluster.metrics.host, in_cluster.model_store.path) == ("0.0.0.0", "/models")
    expected = shipped.replace("kafka", bootstrap_servers=in_cluster.kafka.bootstrap_servers) \
        .replace("metrics", host="0.0.0.0").replace("model_store", path="/models")
    assert in_cluster == expected, "deploy/k8s/configmap.yaml is stale: run python deploy/k8s/configmap.py"
    shown = [{(section, key) for section, values in yaml.safe_load(t).items() for key in values}
             for t in (text, (DEPLOY.parent / "config.yaml").read_text())]
    assert shown[0] == shown[1], "deploy/k8s/configmap.yaml does not show every key: run python deploy/k8s/configmap.py"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not available here")
@pytest.mark.parametrize("unit", ["stream-forecaster.service", "stream-forecaster-retrain.service"])
def test_systemd_units_verify_and_are_hardened(unit, tmp_path):
    text = (DEPLOY / "systemd" / unit).read_text()
    for setting in ("NoNewPrivileges=yes", "ProtectSystem=strict", "Restart=on-failure", "User=stream-forecaster"):
        assert setting in text
    # verify needs the program to exist: point it at this checkout's console script
    program = Path(sys.executable).with_name("stream-forecaster")
    (tmp_path / unit).write_text(text.replace("/opt/stream-forecaster/venv/bin/stream-forecaster", str(program)))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit)], capture_output=True, text=True)
    problems = [line for line in result.stderr.splitlines() if unit in line]
    assert result.returncode == 0 and not problems, result.stderr
