"""Operations monitoring: the ops rules pass `promtool check rules` and their unit tests, every dashboard query
parses as PromQL, and every metric the dashboards and rules use is one the code exports (so a renamed metric
cannot silently leave a panel or an alert empty)."""

from __future__ import annotations

import ast
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_checks import REPO

PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"
OPS_DASHBOARD = DASHBOARDS / "selaras-operations.json"
OPS_RULES = [PROMETHEUS_DIR / "rules" / "selaras-ops.yml", PROMETHEUS_DIR / "rules" / "selaras-ops-alerts.yml"]
# Series Prometheus itself provides.
BUILTIN = {"up", "ALERTS"}
# What issue 17 asks the operations view to cover: 5xx, latency by route, fallback, aggregator backlog and lag,
# feature write lag, model age, item cache age.
SERVICE_METRICS = {
    "selaras_http_requests_total",
    "selaras_http_request_duration_seconds_bucket",
    "selaras_recommendations_total",
    "selaras_aggregator_backlog_events",
    "selaras_feature_write_lag_seconds_bucket",
    "selaras_model_loaded_timestamp_seconds",
    "selaras_item_cache_built_timestamp_seconds",
}
# Grafana variables of the experiments dashboard, replaced by a value before parsing.
VARIABLES = {"$experiment": "home", "$metric": "ctr"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60, check=False)


# Helpers that declare a metric of one kind from its name (the first argument), like the constructors.
METRIC_HELPERS = {"_result_gauge": "Gauge"}  # services/experiments/runtime.py


def exported_metrics() -> set[str]:
    """Sample names of every Counter, Gauge, Histogram and Summary declared under services/ (read from the
    source, so no module has to be imported), with the suffixes prometheus_client adds."""
    suffixes = {
        "Counter": ["_total", "_created"],
        "Gauge": [""],
        "Histogram": ["_bucket", "_sum", "_count", "_created"],
        "Summary": ["", "_sum", "_count", "_created"],
    }
    names: set[str] = set()
    for path in (REPO / "services").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            kind = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            kind = METRIC_HELPERS.get(kind, kind) if isinstance(kind, str) else kind
            first = node.args[0]
            if kind in suffixes and isinstance(first, ast.Constant) and isinstance(first.value, str):
                base = first.value.removesuffix("_total") if kind == "Counter" else first.value
                names.update(base + suffix for suffix in suffixes[kind])
    return names


def rule_files() -> list[Path]:
    return sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))


def rules() -> list[dict[str, Any]]:
    return [
        rule for path in rule_files() for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]
    ]


def dashboard_exprs(path: Path) -> list[str]:
    exprs = []
    for panel in json.loads(path.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in VARIABLES.items():
                expr = expr.replace(variable, value)
            exprs.append(expr)
    return exprs


def series_names(expr: str) -> set[str]:
    """Metric and recording-rule names an expression reads (label values, strings and keywords left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values and other strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?=\s*(?:\[|\)|$|\s|[-+*/^<>=!,]))", expr))
    return {n for n in names if n.startswith("selaras_") or ":" in n or n in BUILTIN}


def test_ops_rules_pass_promtool_and_their_unit_tests() -> None:
    checked = promtool("check", "rules", *map(str, OPS_RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 7 rules found" in checked.stdout and "SUCCESS: 12 rules found" in checked.stdout
    tested = promtool("test", "rules", str(PROMETHEUS_DIR / "tests" / "selaras-ops.test.yml"))
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    # Every ops alert has a unit test that expects it to fire.
    alerts = {rule["alert"] for rule in rules() if "alert" in rule and rule["alert"].startswith("Selaras")}
    tests = yaml.safe_load((PROMETHEUS_DIR / "tests" / "selaras-ops.test.yml").read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test.get("alert_rule_test", []) if case["exp_alerts"]}
    ops_alerts = {
        rule["alert"] for group in yaml.safe_load(OPS_RULES[1].read_text())["groups"] for rule in group["rules"]
    }
    assert ops_alerts <= alerts and ops_alerts == fired


def test_the_ops_rule_test_fails_on_a_broken_rule(tmp_path: Path) -> None:
    """The unit tests can fail: with the error-rate threshold raised above the test's 9%, promtool reports it."""
    for rule_file in OPS_RULES:
        text = rule_file.read_text()
        if rule_file.name == "selaras-ops-alerts.yml":
            text = text.replace(
                "service:selaras_http_requests_5xx:ratio_rate5m > 0.02",
                "service:selaras_http_requests_5xx:ratio_rate5m > 0.2",
            )
        (tmp_path / "rules").mkdir(exist_ok=True)
        (tmp_path / "rules" / rule_file.name).write_text(text)
    (tmp_path / "tests").mkdir()
    test_file = tmp_path / "tests" / "selaras-ops.test.yml"
    test_file.write_text((PROMETHEUS_DIR / "tests" / "selaras-ops.test.yml").read_text())
    tested = promtool("test", "rules", str(test_file))
    assert tested.returncode != 0 and "SelarasHighErrorRate" in tested.stdout + tested.stderr


@pytest.mark.parametrize("dashboard", sorted(DASHBOARDS.glob("*.json")), ids=lambda p: p.name)
def test_every_dashboard_query_is_valid_promql(dashboard: Path, tmp_path: Path) -> None:
    exprs = dashboard_exprs(dashboard)
    assert exprs
    # promtool parses the expression of every recording rule: each query becomes one.
    group = {
        "name": "dashboard",
        "rules": [{"record": f"dashboard:query_{i}:check", "expr": e} for i, e in enumerate(exprs)],
    }
    (tmp_path / "queries.yml").write_text(yaml.safe_dump({"groups": [group]}))
    checked = promtool("check", "rules", str(tmp_path / "queries.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_metric_in_dashboards_and_rules_exists_in_the_code() -> None:
    exported = exported_metrics()
    assert {"selaras_http_requests_total", "selaras_feature_write_lag_seconds_bucket"} <= exported
    assert "selaras_experiment_uplift" in exported  # declared through a helper (METRIC_HELPERS)
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    known = exported | recorded | BUILTIN
    used: dict[str, set[str]] = {}
    for path in sorted(DASHBOARDS.glob("*.json")):
        used[path.name] = {n for expr in dashboard_exprs(path) for n in series_names(expr)}
    for path in rule_files():
        groups = yaml.safe_load(path.read_text())["groups"]
        used[path.name] = {name for group in groups for rule in group["rules"] for name in series_names(rule["expr"])}
    for name, names in used.items():
        assert names, f"{name}: no metric found (the parser is broken)"
        assert names <= known, f"{name} uses metrics no code exports: {sorted(names - known)}"


def test_series_names_finds_what_an_expression_reads() -> None:
    expr = 'histogram_quantile(0.99, sum by (service, le) (rate(selaras_x_bucket{route="/v1/a:b"}[5m]))) / a:b:c'
    assert series_names(expr) == {"selaras_x_bucket", "a:b:c"}
    assert series_names('up{service=~"profile"} == 0') == {"up"}


def expanded(expr: str, recorded: dict[str, str]) -> set[str]:
    """The exported metrics an expression reads, through the recording rules it uses."""
    names: set[str] = set()
    for name in series_names(expr):
        names |= expanded(recorded[name], recorded) if name in recorded else {name}
    return names


def test_ops_dashboard_and_alerts_cover_the_service_metrics() -> None:
    recorded = {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}
    dashboard = set().union(*(expanded(e, recorded) for e in dashboard_exprs(OPS_DASHBOARD)))
    assert dashboard >= SERVICE_METRICS, sorted(SERVICE_METRICS - dashboard)
    alert_exprs = [r["expr"] for g in yaml.safe_load(OPS_RULES[1].read_text())["groups"] for r in g["rules"]]
    alerted = set().union(*(expanded(e, recorded) for e in alert_exprs))
    assert alerted >= SERVICE_METRICS, sorted(SERVICE_METRICS - alerted)


def test_ops_dashboard_is_provisioned_like_the_others() -> None:
    provider = yaml.safe_load((REPO / "deploy" / "grafana" / "provisioning" / "dashboards" / "selaras.yml").read_text())
    datasource = yaml.safe_load(
        (REPO / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uid = datasource["datasources"][0]["uid"]
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS.glob("*.json")]
    assert len(uids) == len(set(uids)) and "selaras-operations" in uids
    dashboard = json.loads(OPS_DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == uid, panel["title"]
