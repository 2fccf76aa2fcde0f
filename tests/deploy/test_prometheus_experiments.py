"""The experiment metrics as Prometheus sees them: two real recommend replicas and a profile service share one
Redis, a real Prometheus (Debian's package) scrapes them with the shipped rules, and its recording rules
must agree with the report API. Also: promtool checks and unit-tests the shipped config and rules."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RedisServer, free_port, unique_name
from tests.factories import make_item

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "selaras-experiments.json"
OPS_DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "selaras-operations.json"
EXPERIMENT = "prom-ab"
EXPERIMENTS_YAML = f"""
holdout: 0.1
report_interval_s: 1
experiments:
  - key: {EXPERIMENT}
    enabled: true
    slot_kinds: [product]
    slots: [home]
    arms:
      - {{name: control, weight: 0.5, personalized: false}}
      - {{name: treatment, weight: 0.5, personalized: true}}
    min_visitors_per_arm: 20
"""


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60, check=False)


def test_shipped_config_and_rules_pass_promtool() -> None:
    checked = promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 4 rule files found" in checked.stdout  # experiments and operations, rules and alerts
    tested = promtool("test", "rules", str(PROMETHEUS_DIR / "tests" / "selaras-experiments.test.yml"))
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def http_json(url: str, data: Any = None, method: str | None = None, timeout: float = 30) -> Any:
    body = json.dumps(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as response:
        return bool(response.status == 200)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, ValueError, KeyError):
            pass
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Stack:
    profile: str
    replicas: list[str]
    prometheus: str
    logs: Path

    def report(self) -> dict[str, Any]:
        report: dict[str, Any] = http_json(f"{self.replicas[0]}/v1/experiments/{EXPERIMENT}/report")
        return report

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        body = http_json(url)
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


def start_process(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    return subprocess.Popen(args, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("prometheus-stack")
    (directory / "experiments.yaml").write_text(EXPERIMENTS_YAML)
    namespace = unique_name("pr")
    # A private Redis: the services scan their namespaces, which is slow on a Redis shared with big test worlds.
    redis_server = RedisServer(free_port(), directory / "redis")
    redis_server.directory.mkdir()
    redis_server.start()
    env = {
        **os.environ,
        "REDIS_URL": redis_server.url,
        "SELARAS_NAMESPACE": namespace,
        "SELARAS_FEAST_PROJECT": namespace,
        "SELARAS_DATA_DIR": str(directory / "data"),
        "SELARAS_ENVIRONMENT": "test",
        "SELARAS_API_KEYS": "",
        "RECOMMEND_EXPERIMENTS_FILE": str(directory / "experiments.yaml"),
        "RECOMMEND_REFRESH_INTERVAL_S": "0.5",
        "PROFILE_AGGREGATOR_IDLE_S": "0.01",
    }
    env.pop("SELARAS_METRICS_DIR", None)
    ports = {"profile": free_port(), "r1": free_port(), "r2": free_port(), "prometheus": free_port()}
    processes: list[subprocess.Popen[bytes]] = []
    serve = [sys.executable, "-m", "services.cli", "serve"]
    try:
        processes.append(start_process([*serve, "profile", "--port", str(ports["profile"])], env, directory / "p.log"))
        for name in ("r1", "r2"):
            args = [*serve, "recommend", "--port", str(ports[name])]
            processes.append(start_process(args, env, directory / f"{name}.log"))

        config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(PROMETHEUS_DIR / "rules" / "*.yml")]
        targets = {
            "selaras-recommend": [f"127.0.0.1:{ports['r1']}", f"127.0.0.1:{ports['r2']}"],
            "selaras-profile": [f"127.0.0.1:{ports['profile']}"],
        }
        for job in config["scrape_configs"]:
            # The shipped jobs find replicas by DNS (compose); here they are two local ports.
            job.pop("dns_sd_configs", None)
            job["static_configs"] = [{"targets": targets[job["job_name"]]}]
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        processes.append(
            start_process(
                [
                    "prometheus",
                    f"--config.file={directory / 'prometheus.yml'}",
                    f"--storage.tsdb.path={directory / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{ports['prometheus']}",
                    "--log.level=warn",
                ],
                env,
                directory / "prometheus.log",
            )
        )
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        for name in ("profile", "r1", "r2"):
            wait_for(lambda n=name: http_json(f"{urls[n]}/healthz")["status"] == "alive", 180, f"{name} to start")
        wait_for(lambda: http_ok(f"{urls['prometheus']}/-/ready"), 60, "prometheus")
        yield Stack(urls["profile"], [urls["r1"], urls["r2"]], urls["prometheus"], directory)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
        redis_server.stop(kill=True)
        shutil.rmtree(directory, ignore_errors=True)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("selaras_experiment_"):
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


@pytest.mark.slow
def test_recording_rules_agree_with_the_report_across_two_replicas(stack: Stack) -> None:
    items = [make_item(item_id=f"q{i:03d}", category=f"cat-{i % 5}").model_dump(mode="json") for i in range(40)]
    http_json(f"{stack.replicas[0]}/v1/catalog/items", {"items": items}, method="PUT")
    for replica in stack.replicas:
        http_json(f"{replica}/v1/admin/reload", {}, method="POST")

    rng = random.Random(3)
    now = datetime.now(UTC)
    events: list[dict[str, Any]] = []
    clicks = buyers = 0
    for i in range(240):
        visitor = f"pv-{i}"
        body = http_json(
            f"{stack.replicas[i % 2]}/v1/recommend",
            {"visitor_id": visitor, "slots": [{"name": "home", "kind": "product", "count": 5}]},
        )
        arm = body["experiment"]["arm"]
        items_shown = body["slots"][0]["items"]
        assert items_shown
        if arm == "holdout":
            continue
        rate = 0.45 if arm == "treatment" else 0.25
        for position, item in enumerate(items_shown):
            if rng.random() < rate / (1 + position):
                clicks += 1
                events.append(
                    {
                        "event_id": f"pc-{i}-{position}",
                        "visitor_id": visitor,
                        "type": "click",
                        "item_id": item["item_id"],
                        "recommendation_id": body["recommendation_id"],
                        "timestamp": (now + timedelta(seconds=5)).isoformat(),
                    }
                )
        if rng.random() < 0.2:
            buyers += 1
            events.append(
                {
                    "event_id": f"pp-{i}",
                    "visitor_id": visitor,
                    "type": "purchase",
                    "item_id": items_shown[0]["item_id"],
                    "price": 99_000,
                    "recommendation_id": body["recommendation_id"],
                    "timestamp": (now + timedelta(minutes=3)).isoformat(),
                }
            )
    for start in range(0, len(events), 200):
        http_json(f"{stack.profile}/v1/events", {"events": events[start : start + 200]})

    def attributed() -> bool:
        arms = stack.report()["arms"]
        return sum(a["metrics"]["ctr"]["total"] for a in arms) == clicks and (
            sum(a["metrics"]["conversion"]["total"] for a in arms) == buyers
        )

    wait_for(attributed, 60, "the profile service to attribute every outcome")
    report = stack.report()
    arms = {a["name"]: a for a in report["arms"]}

    # Each process exports only its own increments: the sum over the three processes is the stored total,
    # and both replicas took part.
    scraped = {name: scrape(url) for name, url in [("r1", stack.replicas[0]), ("r2", stack.replicas[1])]}
    scraped["profile"] = scrape(stack.profile)
    for arm in ("control", "treatment"):
        labels = {"experiment": EXPERIMENT, "arm": arm, "slot": "all"}
        per_replica = [total(scraped[r], "selaras_experiment_visitors_total", **labels) for r in ("r1", "r2")]
        assert all(n > 0 for n in per_replica)
        assert (
            sum(per_replica) + total(scraped["profile"], "selaras_experiment_visitors_total", **labels)
            == arms[arm]["n"]
        )
        ctr = {**labels, "metric": "ctr"}
        clicks_exported = sum(total(s, "selaras_experiment_value_sum_total", **ctr) for s in scraped.values())
        impressions = sum(total(s, "selaras_experiment_denominator_sum_total", **ctr) for s in scraped.values())
        assert clicks_exported == arms[arm]["metrics"]["ctr"]["total"]
        assert impressions == arms[arm]["metrics"]["ctr"]["denominator"]
        assert total(scraped["profile"], "selaras_experiment_denominator_sum_total", **ctr) == 0

    ctr_result = next(r for r in report["results"] if r["metric"] == "ctr")

    def value_of(expr: str, **labels: str) -> float | None:
        for series in stack.query(expr):
            if all(series["metric"].get(k) == v for k, v in labels.items()):
                return float(series["value"][1])
        return None

    def close(a: float | None, b: float | None) -> bool:
        return a is not None and b is not None and abs(a - b) <= 1e-9 * max(1.0, abs(b))

    def rules_agree() -> bool:
        return (
            all(
                value_of("experiment_arm:selaras_experiment_visitors:sum", experiment=EXPERIMENT, arm=arm)
                == arms[arm]["n"]
                and close(
                    value_of("experiment_arm:selaras_experiment_ctr:ratio", experiment=EXPERIMENT, arm=arm),
                    arms[arm]["metrics"]["ctr"]["mean"],
                )
                for arm in ("control", "treatment")
            )
            and close(
                value_of("experiment_arm:selaras_experiment_ctr_uplift:ratio", experiment=EXPERIMENT, arm="treatment"),
                ctr_result["uplift"],
            )
            and close(
                value_of("experiment:selaras_experiment_srm_chi2:sum", experiment=EXPERIMENT), report["srm"]["chi2"]
            )
        )

    wait_for(rules_agree, 60, "Prometheus's recording rules to match the report")
    # The holdout is exported but is not part of the SRM check.
    assert value_of("experiment_arm:selaras_experiment_visitors:sum", experiment=EXPERIMENT, arm="holdout") > 0
    # The result gauges (same on every replica: max, not sum) carry the report's numbers.
    wait_for(
        lambda: (
            close(
                value_of(f'max by (arm) (selaras_experiment_uplift{{experiment="{EXPERIMENT}",metric="ctr"}})'),
                ctr_result["uplift"],
            )
            and close(
                value_of(f'max(selaras_experiment_srm_p_value{{experiment="{EXPERIMENT}"}})'), report["srm"]["p_value"]
            )
        ),
        30,
        "the result gauges",
    )
    lower = value_of(f'max by (arm) (selaras_experiment_uplift_ci_lower{{experiment="{EXPERIMENT}",metric="ctr"}})')
    assert close(lower, ctr_result["ci_lower"])

    # Every rule (experiments and operations) evaluates without errors, and every dashboard query parses and runs.
    groups = http_json(f"{stack.prometheus}/api/v1/rules")["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert all(rule["health"] == "ok" for rule in rules), [r for r in rules if r["health"] != "ok"]
    experiment_rules = [r for g in groups if g["name"].startswith("selaras-experiment") for r in g["rules"]]
    assert len(experiment_rules) == 18 and len(rules) == 18 + 19  # 7 recording and 12 alerting ops rules
    dashboard = json.loads(DASHBOARD.read_text())
    with_data = 0
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$experiment", EXPERIMENT).replace("$metric", "ctr")
            with_data += bool(stack.query(expr))
    assert with_data >= 12, with_data
    # The operations dashboard over the same live services: the request, latency and fallback panels have data.
    operations = json.loads(OPS_DASHBOARD.read_text())
    answered = {
        target["expr"]: bool(stack.query(target["expr"]))
        for panel in operations["panels"]
        for target in panel.get("targets", [])
    }
    for expr in (
        "service:selaras_http_requests_5xx:ratio_rate5m",
        "service_route:selaras_http_request_duration_seconds:p99_rate5m",
        "service:selaras_recommendations_fallback:ratio_rate5m",
        "instance:selaras_item_cache_age_seconds:max",
    ):
        wait_for(lambda e=expr: bool(stack.query(e)), 30, f"{expr} to have data")
    assert sum(answered.values()) >= 10, answered
