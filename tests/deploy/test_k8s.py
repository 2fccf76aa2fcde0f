"""deploy/k8s: every manifest validated against the Kubernetes schemas (kubernetes-validate bundles them, no
cluster or network needed), then checked against each other and against the code they run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from services.experiments.config import load_config
from tests.deploy.deploy_checks import REPO, cli_args, known_variables, parse_cli

K8S = REPO / "deploy" / "k8s"
VERSIONS = ["1.30.0", "1.37.0"]  # the oldest we support (CronJob timeZone, autoscaling/v2) and the newest


def manifests() -> list[tuple[str, dict[str, Any]]]:
    docs: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


DOCS = manifests()


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in DOCS if doc["kind"] == kind}


def pod_specs() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(owner name, pod template metadata, pod spec) of every workload."""
    for _, doc in DOCS:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["metadata"], doc["spec"]["template"]["spec"]
        elif doc["kind"] == "CronJob":
            template = doc["spec"]["jobTemplate"]["spec"]["template"]
            yield doc["metadata"]["name"], template["metadata"], template["spec"]


def selaras_containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for owner, _, spec in pod_specs():
        for container in spec["containers"]:
            if container["image"].split(":")[0].endswith("selaras"):
                yield owner, spec, container


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(version: str) -> None:
    assert len(DOCS) >= 12
    for name, doc in DOCS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {exc.message}")


def test_kustomization_lists_every_manifest_and_one_namespace() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    namespaces = {doc["metadata"].get("namespace") for _, doc in DOCS if doc["kind"] != "Namespace"}
    assert namespaces == {kustomization["namespace"]} == set(of_kind("Namespace"))


def test_deployments_have_probes_requests_and_run_locked_down() -> None:
    for owner, spec, container in selaras_containers():
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
        assert security["capabilities"]["drop"] == ["ALL"]
        requests = container["resources"]["requests"]
        assert {"cpu", "memory"} <= set(requests) and "memory" in container["resources"]["limits"], owner
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        assert {"/data", "/tmp"} <= mounts, f"{owner}: writable data dir and tmp on a read-only root"
    for name, deployment in of_kind("Deployment").items():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert container[probe]["httpGet"]["port"] in ports
        args = parse_cli(cli_args(container)).params
        wanted = {"profile": 8001, "aggregator": 8003}.get(name, 8002)
        assert args["host"] == "0.0.0.0" and ports["http"] == args["port"] == wanted
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        assert int(env["SELARAS_PORT"]) == args["port"], "the image's HEALTHCHECK port"
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 15


def test_aggregators_fold_apart_and_the_apis_scale_out() -> None:
    deployments, hpas, pdbs = of_kind("Deployment"), of_kind("HorizontalPodAutoscaler"), of_kind("PodDisruptionBudget")
    # The profile pods only ingest and serve: folding runs in the aggregator Deployment (leases per partition).
    profile_container = deployments["profile"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in profile_container["env"]}
    assert env["PROFILE_AGGREGATOR_ENABLED"] == "false"
    aggregator = deployments["aggregator"]["spec"]
    container = aggregator["template"]["spec"]["containers"][0]
    context = parse_cli(cli_args(container))
    assert context.command.name == "aggregator" and context.params["port"] == 8003
    partitions = int(of_kind("ConfigMap")["selaras-config"]["data"].get("SELARAS_LOG_PARTITIONS", "4"))
    assert 2 <= aggregator["replicas"] <= partitions, "more aggregators than partitions are idle standbys"
    assert {hpa["spec"]["scaleTargetRef"]["name"] for hpa in hpas.values()} == {"recommend", "profile"}
    for hpa in hpas.values():
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in deployments
        spec = deployments[target["name"]]["spec"]
        # The HPA owns the replica count: a fixed value would reset it on every apply.
        assert "replicas" not in spec
        assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
        assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        pod_labels = spec["template"]["metadata"]["labels"]
        pdb = pdbs[target["name"]]["spec"]
        assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
        # A drain can always proceed: the budget keeps fewer pods than the autoscaler's minimum.
        assert pdb["minAvailable"] < hpa["spec"]["minReplicas"]


def test_services_select_pods_and_named_ports() -> None:
    templates = [(meta.get("labels", {}), spec) for _, meta, spec in pod_specs()]
    for name, service in of_kind("Service").items():
        selector = service["spec"]["selector"]
        matching = [spec for labels, spec in templates if selector.items() <= labels.items()]
        assert matching, f"Service {name} selects no pod"
        for port in service["spec"]["ports"]:
            names = {p.get("name") for spec in matching for c in spec["containers"] for p in c.get("ports", [])}
            assert port["targetPort"] in names, f"Service {name}: no container port {port['targetPort']}"
    assert of_kind("Service")["recommend-pods"]["spec"]["clusterIP"] == "None"


def test_references_resolve_and_variables_are_real_settings() -> None:
    configmaps, secrets, claims = of_kind("ConfigMap"), of_kind("Secret"), of_kind("PersistentVolumeClaim")
    known = known_variables()
    for name in ("selaras-config",):
        assert set(configmaps[name]["data"]) <= known
    assert set(secrets["selaras-api-keys"]["stringData"]) <= known
    for owner, spec, container in selaras_containers():
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in configmaps, owner
            if "secretRef" in source:
                assert source["secretRef"]["name"] in secrets, owner
        assert {e["name"] for e in container.get("env", [])} <= known
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, owner
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, owner


def test_offline_store_is_shared_read_write_many_only_where_used() -> None:
    data_dir = of_kind("ConfigMap")["selaras-config"]["data"]["SELARAS_DATA_DIR"]
    (claim,) = of_kind("PersistentVolumeClaim").values()
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    users = set()
    for owner, spec, container in selaras_containers():
        claimed = {v["name"] for v in spec.get("volumes", []) if "persistentVolumeClaim" in v}
        for mount in container.get("volumeMounts", []):
            if mount["name"] in claimed:
                assert mount["mountPath"] == f"{data_dir}/offline", owner
                users.add(owner)
    assert users == {"profile", "aggregator", "train", "personas", "retention"}


def test_experiments_configmap_is_what_the_service_loads(tmp_path: Path) -> None:
    config = of_kind("ConfigMap")["selaras-config"]["data"]
    experiments_file = Path(config["RECOMMEND_EXPERIMENTS_FILE"])
    recommend = of_kind("Deployment")["recommend"]["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in recommend["containers"][0]["volumeMounts"]}
    volume = next(v for v in recommend["volumes"] if v.get("configMap", {}).get("name") == "selaras-experiments")
    assert Path(mounts[volume["name"]]) == experiments_file.parent
    text = of_kind("ConfigMap")["selaras-experiments"]["data"][experiments_file.name]
    (tmp_path / "experiments.yaml").write_text(text)
    assert load_config(tmp_path / "experiments.yaml").experiments, "the shipped experiments must load"


def test_cronjobs_train_refresh_personas_and_apply_retention_with_real_commands() -> None:
    cronjobs = of_kind("CronJob")
    assert set(cronjobs) == {"train", "personas", "retention"}
    for name, job in cronjobs.items():
        assert job["spec"]["concurrencyPolicy"] == "Forbid" and job["spec"]["timeZone"] == "Asia/Jakarta"
        container = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
        context = parse_cli(cli_args(container))
        assert context.command.name == name
    train = cronjobs["train"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert "recommend-pods" in " ".join(train["args"]), "every replica is reloaded through the headless Service"
    assert parse_cli(cli_args(train)).params["reload_url"] == ["http://10.1.2.3:8002"]
    # Personas are refreshed before training, so training sees the new persona ids.
    hour = {name: int(job["spec"]["schedule"].split()[1]) for name, job in cronjobs.items()}
    assert hour["personas"] < hour["train"]
    # Retention trims the history first (and is over before the next job starts), so nothing learns from data
    # past its retention period.
    retention = cronjobs["retention"]["spec"]
    assert hour["retention"] < hour["personas"]
    assert retention["jobTemplate"]["spec"]["activeDeadlineSeconds"] <= 3600 * (hour["personas"] - hour["retention"])


def test_redis_persists_every_acknowledged_write() -> None:
    redis = of_kind("StatefulSet")["redis"]["spec"]
    args = " ".join(redis["template"]["spec"]["containers"][0]["args"])
    assert "--appendonly yes" in args and "--appendfsync always" in args
    assert "--maxmemory-policy noeviction" in args and "--maxmemory " in args
    assert redis["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
