"""deploy/helm/selaras: rendered by Helm's own engine (helm-python-sdk bundles Helm's Go SDK as a library, so no
helm binary or cluster is needed), every object validated against the Kubernetes schemas (kubernetes-validate),
then checked against each other, against the plain manifests in deploy/k8s and against the code they run."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import typer
import yaml

from services.cli import app as cli_app
from services.experiments.config import load_config
from tests.deploy.deploy_checks import REPO, cli_args, known_variables, parse_cli

CHART = REPO / "deploy" / "helm" / "selaras"
K8S = REPO / "deploy" / "k8s"
VERSIONS = ["1.30.0", "1.37.0"]  # as deploy/k8s: the oldest supported and the newest
RELEASE = "shop"
KEYS = {"apiKeys": {"apiKeys": "shop-frontend:recommend:" + "ab" * 32}}
# Everything optional switched on: what the validation must cover.
FULL = {
    **KEYS,
    "ingress": {"enabled": True, "className": "nginx", "tls": {"secretName": "selaras-tls"}},
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True},
    },
    "aggregator": {"enabled": True},
    "jobs": {"train": {"extraArgs": ["--engine", "dask"]}},
}
# The other branches: a fixed replica count instead of the HPA, an external Redis, a Secret managed elsewhere.
EXTERNAL = {
    "apiKeys": {"existingSecret": "selaras-api-keys"},
    "recommend": {"autoscaling": {"enabled": False}, "replicas": 3},
    "redis": {"enabled": False, "url": "redis://managed-redis:6379/0"},
    "offlineStore": {"existingClaim": "shop-offline"},
    "networkPolicy": {"enabled": False},
}
VALUE_SETS = {"default": KEYS, "full": FULL, "external": EXTERNAL}
# No schema of the Prometheus Operator's CRDs ships offline: test_servicemonitor_* checks the ServiceMonitor
# against the Services, test_prometheus_rule_* the PrometheusRule against the rule files promtool tests.
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=RELEASE, namespace="selaras", is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".yaml"):
            docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


RENDERED = {name: render(values) for name, values in VALUE_SETS.items()}


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"].removeprefix(f"{RELEASE}-selaras-"): doc for doc in docs if doc["kind"] == kind}


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(short owner name, pod template metadata, pod spec) of every workload."""
    for kind in ("Deployment", "StatefulSet"):
        for name, doc in of_kind(docs, kind).items():
            yield name, doc["spec"]["template"]["metadata"], doc["spec"]["template"]["spec"]
    for name, doc in of_kind(docs, "CronJob").items():
        template = doc["spec"]["jobTemplate"]["spec"]["template"]
        yield name, template["metadata"], template["spec"]


def selaras_containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for owner, _, spec in pod_specs(docs):
        for container in spec["containers"]:
            if container["image"].split(":")[0].endswith("selaras"):
                yield owner, spec, container


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and In/NotIn/Exists expressions) against a pod's or Service's labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not ok:
            return False
    return True


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_every_rendered_object_is_valid_for_kubernetes(value_set: str, version: str) -> None:
    docs = RENDERED[value_set]
    assert len(docs) >= 10
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{value_set}: {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {exc.message}")


def test_helm_lint_finds_nothing_and_every_option_renders() -> None:
    for values in VALUE_SETS.values():
        report = helm.lint(CHART, values, strict=True, kube_version="v1.30.0")
        assert report["errors"] == [], report
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], report
    kinds = {doc["kind"] for doc in RENDERED["full"]}
    assert {"Ingress", "ServiceMonitor", "PrometheusRule", "NetworkPolicy", "HorizontalPodAutoscaler"} <= kinds
    assert {"CronJob", "Secret", "ConfigMap", "Service", "Deployment", "StatefulSet"} <= kinds
    names = {doc["metadata"]["name"] for docs in RENDERED.values() for doc in docs}
    assert all(name.startswith(f"{RELEASE}-selaras") for name in names), "every object is named after the release"


def test_production_refuses_to_render_without_api_keys() -> None:
    with pytest.raises(helm.HelmRenderError, match="production needs API keys"):
        render({})
    with pytest.raises(helm.HelmRenderError, match=r"redis\.url is required"):
        render({**KEYS, "redis": {"enabled": False}})
    development = render({"config": {"SELARAS_ENVIRONMENT": "development"}})
    assert of_kind(development, "Secret")["api-keys"]["stringData"]["SELARAS_API_KEYS"] == ""


def test_the_hpa_owns_the_recommend_replicas() -> None:
    for value_set, docs in RENDERED.items():
        deployments, hpas = of_kind(docs, "Deployment"), of_kind(docs, "HorizontalPodAutoscaler")
        for hpa in hpas.values():
            target = hpa["spec"]["scaleTargetRef"]
            owned = deployments[target["name"].removeprefix(f"{RELEASE}-selaras-")]
            assert target["kind"] == "Deployment"
            assert "replicas" not in owned["spec"], f"{value_set}: a fixed count would reset the HPA's on upgrade"
            assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
            (pdb,) = of_kind(docs, "PodDisruptionBudget").values()
            assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a drain can always proceed"
        # Single consumers of the event log never scale out and never overlap during a rollout.
        for name in ("profile", "aggregator"):
            if name in deployments:
                spec = deployments[name]["spec"]
                assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate", (value_set, name)
                assert name not in {h["spec"]["scaleTargetRef"]["name"] for h in hpas.values()}
    assert set(of_kind(RENDERED["default"], "HorizontalPodAutoscaler")) == {"recommend"}
    assert not of_kind(RENDERED["external"], "HorizontalPodAutoscaler")
    assert of_kind(RENDERED["external"], "Deployment")["recommend"]["spec"]["replicas"] == 3


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_processes_have_probes_resources_and_run_locked_down(value_set: str) -> None:
    docs = RENDERED[value_set]
    for owner, spec, container in selaras_containers(docs):
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
        assert security["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]), owner
        assert "memory" in container["resources"]["limits"], owner
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        assert {"/data", "/tmp"} <= mounts, f"{owner}: writable data dir and tmp on a read-only root"
    for name, deployment in of_kind(docs, "Deployment").items():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", name
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz", name
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert container[probe]["httpGet"]["port"] in ports
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        assert int(env["SELARAS_PORT"]) == ports["http"], "the image's HEALTHCHECK port"
        if name in ("profile", "recommend"):
            args = parse_cli(cli_args(container)).params
            assert args["host"] == "0.0.0.0" and args["port"] == ports["http"] == {"profile": 8001}.get(name, 8002)
            assert args["workers"] == 1


def test_settings_are_real_variables_and_references_resolve() -> None:
    known = known_variables()
    for value_set, docs in RENDERED.items():
        configmaps, secrets = of_kind(docs, "ConfigMap"), of_kind(docs, "Secret")
        claims = set(of_kind(docs, "PersistentVolumeClaim"))
        assert set(configmaps["config"]["data"]) <= known, sorted(set(configmaps["config"]["data"]) - known)
        for secret in secrets.values():
            assert set(secret["stringData"]) <= known
        for owner, spec, container in selaras_containers(docs):
            assert {e["name"] for e in container.get("env", [])} <= known
            for source in container["envFrom"]:
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"].removeprefix(f"{RELEASE}-selaras-") in configmaps
                if "secretRef" in source:
                    name = source["secretRef"]["name"]
                    managed = VALUE_SETS[value_set].get("apiKeys", {}).get("existingSecret")
                    assert name == managed or name.removeprefix(f"{RELEASE}-selaras-") in secrets, (value_set, owner)
            for volume in spec.get("volumes", []):
                if "configMap" in volume:
                    assert volume["configMap"]["name"].removeprefix(f"{RELEASE}-selaras-") in configmaps
                if "persistentVolumeClaim" in volume:
                    claim = volume["persistentVolumeClaim"]["claimName"]
                    assert claim.removeprefix(f"{RELEASE}-selaras-") in claims or claim == "shop-offline"
    config = of_kind(RENDERED["default"], "ConfigMap")["config"]["data"]
    assert config["REDIS_URL"] == f"redis://{RELEASE}-selaras-redis:6379/0"
    assert "redis" in of_kind(RENDERED["default"], "Service") and "redis" in of_kind(RENDERED["default"], "StatefulSet")
    # The bundled Redis persists every write and refuses writes when full instead of evicting keys.
    redis_args = " ".join(
        of_kind(RENDERED["default"], "StatefulSet")["redis"]["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    assert "--appendonly yes" in redis_args and "--appendfsync always" in redis_args
    assert "--maxmemory-policy noeviction" in redis_args and "--maxmemory " in redis_args
    assert of_kind(RENDERED["external"], "ConfigMap")["config"]["data"]["REDIS_URL"] == "redis://managed-redis:6379/0"
    assert not of_kind(RENDERED["external"], "StatefulSet") and not of_kind(RENDERED["external"], "Secret")


def test_experiments_configmap_is_what_the_service_loads(tmp_path: Path) -> None:
    docs = RENDERED["default"]
    config = of_kind(docs, "ConfigMap")["config"]["data"]
    experiments_file = Path(config["RECOMMEND_EXPERIMENTS_FILE"])
    recommend = of_kind(docs, "Deployment")["recommend"]["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in recommend["containers"][0]["volumeMounts"]}
    volume = next(v for v in recommend["volumes"] if v.get("configMap", {}).get("name", "").endswith("-experiments"))
    assert Path(mounts[volume["name"]]) == experiments_file.parent
    text = of_kind(docs, "ConfigMap")["experiments"]["data"][experiments_file.name]
    assert text == (REPO / "experiments.yaml").read_text(), "the chart ships the repository's default experiments"
    (tmp_path / "experiments.yaml").write_text(text)
    assert load_config(tmp_path / "experiments.yaml").experiments
    custom = render({**KEYS, "experiments": "holdout: 0.1\nexperiments: []\n"})
    assert of_kind(custom, "ConfigMap")["experiments"]["data"]["experiments.yaml"] == "holdout: 0.1\nexperiments: []\n"
    # A changed experiments file rolls the recommend pods (it is read at start).
    checksum = "checksum/config"
    before = of_kind(docs, "Deployment")["recommend"]["spec"]["template"]["metadata"]["annotations"][checksum]
    after = of_kind(custom, "Deployment")["recommend"]["spec"]["template"]["metadata"]["annotations"][checksum]
    assert before != after


def test_jobs_run_real_commands_in_order_on_the_offline_store() -> None:
    docs = RENDERED["full"]
    cronjobs = of_kind(docs, "CronJob")
    assert set(cronjobs) == {"train", "personas", "retention"}
    for name, job in cronjobs.items():
        assert job["spec"]["concurrencyPolicy"] == "Forbid"
        container = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
        assert parse_cli(cli_args(container)).command.name == name
        assert "/data/offline" in {m["mountPath"] for m in container["volumeMounts"]}
    train = cronjobs["train"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert f"{RELEASE}-selaras-recommend-pods" in " ".join(train["args"])
    assert of_kind(docs, "Service")["recommend-pods"]["spec"]["clusterIP"] == "None"
    params = parse_cli(cli_args(train)).params
    assert params["reload_url"] == ["http://10.1.2.3:8002"] and params["engine"] == "dask"
    # Retention, then personas, then training; each over before the next one starts.
    start = {}  # minutes after midnight
    for name, job in cronjobs.items():
        minute, hour = job["spec"]["schedule"].split()[:2]
        start[name] = int(hour) * 60 + int(minute)
    order = sorted(start, key=start.__getitem__)
    assert order == ["retention", "personas", "train"]
    for first, second in itertools.pairwise(order):
        deadline = cronjobs[first]["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]
        assert deadline <= (start[second] - start[first]) * 60, f"{first} may still run when {second} starts"


def test_services_select_pods_and_named_ports() -> None:
    for value_set, docs in RENDERED.items():
        templates = [(meta["labels"], spec) for _, meta, spec in pod_specs(docs)]
        for name, service in of_kind(docs, "Service").items():
            selector = {"matchLabels": service["spec"]["selector"]}
            matching = [spec for labels, spec in templates if selects(selector, labels)]
            assert matching, f"{value_set}: Service {name} selects no pod"
            for port in service["spec"]["ports"]:
                names = {p.get("name") for spec in matching for c in spec["containers"] for p in c.get("ports", [])}
                assert port["targetPort"] in names, f"Service {name}: no container port {port['targetPort']}"


def test_servicemonitor_scrapes_every_selaras_pod_exactly_once() -> None:
    docs = RENDERED["full"]
    (monitor,) = of_kind(docs, "ServiceMonitor").values()
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]
    services = [s for s in of_kind(docs, "Service").values() if selects(selector, s["metadata"]["labels"])]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    for component in ("profile", "recommend", "aggregator"):
        pod_labels = of_kind(docs, "Deployment")[component]["spec"]["template"]["metadata"]["labels"]
        scraping = [s for s in services if selects({"matchLabels": s["spec"]["selector"]}, pod_labels)]
        assert len(scraping) == 1, f"{component} is scraped through {len(scraping)} Services"
        assert endpoint["port"] in {p["name"] for p in scraping[0]["spec"]["ports"]}
    # Without the ServiceMonitor the pods announce themselves to annotation-based scraping instead; never both.
    for value_set, docs_ in RENDERED.items():
        monitored = bool(of_kind(docs_, "ServiceMonitor"))
        for name, deployment in of_kind(docs_, "Deployment").items():
            annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
            assert ("prometheus.io/scrape" in annotations) != monitored, (value_set, name)


def test_ingress_exposes_only_public_routes_of_the_right_service() -> None:
    from services.profile.app import create_app as profile_app
    from services.recommend.app import create_app as recommend_app

    routes = {"profile": list(profile_app().openapi()["paths"]), "recommend": list(recommend_app().openapi()["paths"])}
    docs = RENDERED["full"]
    (ingress,) = of_kind(docs, "Ingress").values()
    services = of_kind(docs, "Service")
    assert ingress["spec"]["tls"][0]["secretName"] == "selaras-tls"
    exposed: set[str] = set()
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            service = backend["name"].removeprefix(f"{RELEASE}-selaras-")
            assert backend["port"]["name"] in {p["name"] for p in services[service]["spec"]["ports"]}
            # Prefix paths match whole segments; the one with a colon (ImplementationSpecific) exactly that route.
            assert path["pathType"] == ("ImplementationSpecific" if ":" in path["path"] else "Prefix")
            prefix = path["path"].rstrip("/").split("/")
            matched = [r for r in routes[service] if r.split("/")[: len(prefix)] == prefix]
            assert matched, f"{path['path']} matches no route of {service}"
            exposed.update(matched)
    assert {"/v1/recommend", "/v1/events", "/v1/next-best-message:batch", "/v1/catalog/items"} <= exposed
    assert not {r for r in exposed if r.startswith(("/v1/admin", "/v1/experiments", "/v1/personas"))}


def test_network_policies_admit_selaras_and_listed_namespaces_only() -> None:
    docs = RENDERED["full"]
    policies = of_kind(docs, "NetworkPolicy")
    workloads = {name: meta["labels"] for name, meta, _ in pod_specs(docs)}
    apis, redis = policies["apis"]["spec"], policies["redis"]["spec"]
    assert {n for n, labels in workloads.items() if selects(apis["podSelector"], labels)} == {
        "profile",
        "recommend",
        "aggregator",
    }
    assert {n for n, labels in workloads.items() if selects(redis["podSelector"], labels)} == {"redis"}
    (rule,) = redis["ingress"]
    (peer,) = rule["from"]
    clients = {n for n, labels in workloads.items() if selects(peer["podSelector"], labels)}
    assert clients == set(workloads), "every Selaras pod reaches Redis"
    (rule,) = apis["ingress"]
    peers = [p for p in rule["from"] if "podSelector" in p]
    assert {n for n, labels in workloads.items() if any(selects(p["podSelector"], labels) for p in peers)} >= {
        "train"
    }, "the training job reloads the recommend pods"
    namespaces = [p["namespaceSelector"]["matchLabels"] for p in rule["from"] if "namespaceSelector" in p]
    assert {"kubernetes.io/metadata.name": "ingress-nginx"} in namespaces
    assert [p["port"] for p in rule["ports"]] == ["http"]


def test_aggregator_runs_on_its_own_only_when_enabled() -> None:
    default = of_kind(RENDERED["default"], "Deployment")
    full = of_kind(RENDERED["full"], "Deployment")
    assert "aggregator" not in default and "aggregator" in full

    def profile_folds(deployments: dict[str, dict[str, Any]]) -> str:
        env = deployments["profile"]["spec"]["template"]["spec"]["containers"][0]["env"]
        return str(next(e["value"] for e in env if e["name"] == "PROFILE_AGGREGATOR_ENABLED"))

    # Exactly one process folds the log: the profile pod by default, the aggregator when it runs on its own.
    assert profile_folds(default) == "true" and profile_folds(full) == "false"
    aggregator = full["aggregator"]["spec"]["template"]["spec"]["containers"][0]
    assert "/data/offline" in {m["mountPath"] for m in aggregator["volumeMounts"]}
    command: Any = typer.main.get_command(cli_app)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["aggregator"]
    if "run" in command.commands:
        assert parse_cli(cli_args(aggregator)).params["port"] == aggregator["ports"][0]["containerPort"]
    else:
        # `selaras run aggregator` is not there yet: the chart must not start it unless asked to.
        assert defaults["enabled"] is False


def test_chart_keeps_the_settings_of_the_plain_manifests() -> None:
    """deploy/k8s stays for `kubectl apply -k`; the chart's defaults must not drift from it."""
    plain = [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]
    plain_pods = {name: spec for name, _, spec in pod_specs([d for d in plain if "metadata" in d])}
    chart_pods = {name: spec for name, _, spec in pod_specs(RENDERED["default"])}
    # The plain manifests run the aggregator on its own; the chart does when `aggregator.enabled` (full values).
    chart_pods["aggregator"] = {name: spec for name, _, spec in pod_specs(RENDERED["full"])}["aggregator"]
    assert set(plain_pods) == set(chart_pods)
    for name, spec in plain_pods.items():
        plain_container, chart_container = spec["containers"][0], chart_pods[name]["containers"][0]
        assert plain_container["resources"] == chart_container["resources"], name
        assert plain_container.get("args") == chart_container.get("args") or name == "train", name
        assert spec["securityContext"] == chart_pods[name]["securityContext"], name
    plain_jobs, chart_jobs = of_kind(plain, "CronJob"), of_kind(RENDERED["default"], "CronJob")
    for name, job in plain_jobs.items():
        assert job["spec"]["schedule"] == chart_jobs[name]["spec"]["schedule"], name
        assert job["spec"]["timeZone"] == chart_jobs[name]["spec"]["timeZone"], name
    plain_hpa = of_kind(plain, "HorizontalPodAutoscaler")["recommend"]["spec"]
    chart_hpa = of_kind(RENDERED["default"], "HorizontalPodAutoscaler")["recommend"]["spec"]
    assert (plain_hpa["minReplicas"], plain_hpa["maxReplicas"]) == (chart_hpa["minReplicas"], chart_hpa["maxReplicas"])
    plain_config = of_kind(plain, "ConfigMap")["selaras-config"]["data"]
    chart_config = of_kind(RENDERED["default"], "ConfigMap")["config"]["data"]
    shared = set(plain_config) - {"REDIS_URL"}
    assert {k: plain_config[k] for k in shared} == {k: chart_config[k] for k in shared}


def test_prometheus_rule_ships_the_rules_promtool_tests() -> None:
    (rule,) = of_kind(RENDERED["full"], "PrometheusRule").values()
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    shipped = {group["name"]: group for group in rule["spec"]["groups"]}
    files = sorted((REPO / "deploy" / "prometheus" / "rules").glob("*.yml"))
    expected = {group["name"]: group for path in files for group in yaml.safe_load(path.read_text())["groups"]}
    assert shipped == expected
    assert {"selaras-ops", "selaras-ops-alerts", "selaras-experiments", "selaras-experiment-alerts"} <= set(shipped)
    assert not of_kind(RENDERED["default"], "PrometheusRule"), "needs the operator's CRD: off unless asked for"


def test_values_schema_refuses_misspelt_or_misplaced_values() -> None:
    with helm.Chart.load(CHART) as chart:
        for values in VALUE_SETS.values():
            chart.validate_schema(values)
    refused = [
        {"recommend": {"autoscalling": {"enabled": False}}},  # a typo would silently keep the HPA
        {"config": {"SELARAS_API_KEYS": "shop:admin:" + "ab" * 32}},  # a secret in a ConfigMap
        {"config": {"REDIS_URL": "redis://elsewhere:6379/0"}},  # set by redis.*
        {"jobs": {"train": {"schedule": "nightly"}}},
        {"redis": {"enabled": False, "url": "elsewhere:6379"}},
    ]
    for values in refused:
        with pytest.raises(helm.HelmError, match="schema"):
            render({**KEYS, **values})
