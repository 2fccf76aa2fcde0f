"""deploy/compose.yaml, validated by Compose itself (`docker compose config`; no engine runs here) and checked
against the code: commands parse with the real CLI, variables are real settings, mounted files exist."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_checks import REPO, known_variables, parse_cli, selaras_variables

COMPOSE_FILE = REPO / "deploy" / "compose.yaml"
SECRETS = {"SELARAS_API_KEYS": "shop:admin:" + "ab" * 32, "GRAFANA_ADMIN_PASSWORD": "not-a-real-password"}
SELARAS_SERVICES = ("profile", "recommend-1", "recommend-2", "train", "personas", "retention")


def compose_command() -> list[str]:
    """Compose v2 (`docker compose`) when the plugin is there, else v1 (`docker-compose`, Debian's package)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    assert legacy, "docker-compose is missing: run scripts/ensure_system_packages.sh"
    return [legacy]


def run_config(*extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in SECRETS and not k.startswith("COMPOSE_")}
    return subprocess.run(
        [*compose_command(), "-f", str(COMPOSE_FILE), "--profile", "jobs", "--profile", "monitoring", "config", *extra],
        capture_output=True,
        text=True,
        env={**base, **(env if env is not None else SECRETS)},
        cwd=COMPOSE_FILE.parent,
        timeout=60,
    )


def volume(entry: str | dict[str, Any]) -> tuple[str, str]:
    """(source, target) of a volume in either syntax (v1 prints "src:dst:mode", v2 a mapping)."""
    if isinstance(entry, dict):
        return str(entry.get("source", "")), str(entry["target"])
    source, target = entry.split(":")[:2]
    return source, target


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    result = run_config()
    assert result.returncode == 0, result.stderr
    loaded: dict[str, Any] = yaml.safe_load(result.stdout)
    return loaded


def test_compose_accepts_the_file_and_lists_every_service(config: dict[str, Any]) -> None:
    assert set(config["services"]) == {
        "redis", "profile", "aggregator", "recommend-1", "recommend-2", "proxy", "train", "personas", "retention",
        "prometheus", "grafana",
    }  # fmt: skip
    profiles = {name: set(service.get("profiles", [])) for name, service in config["services"].items()}
    assert profiles["prometheus"] == profiles["grafana"] == {"monitoring"}
    assert profiles["train"] == profiles["personas"] == profiles["retention"] == {"jobs"}
    assert all(not profiles[name] for name in ("redis", "profile", "aggregator", "recommend-1", "recommend-2", "proxy"))
    # The aggregator folds in its own process, not inside the profile API.
    assert config["services"]["profile"]["environment"]["PROFILE_AGGREGATOR_ENABLED"] == "false"
    assert parse_cli(config["services"]["aggregator"]["command"]).command.name == "aggregator"


def test_secrets_are_required_not_defaulted() -> None:
    result = run_config(env={"GRAFANA_ADMIN_PASSWORD": "x"})
    assert result.returncode != 0 and "SELARAS_API_KEYS" in result.stderr


def test_redis_persists_every_acknowledged_write(config: dict[str, Any]) -> None:
    redis = config["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--appendfsync always" in command
    # A full Redis refuses writes (503) instead of evicting idempotency keys, consents or the log's hot window.
    assert "--maxmemory-policy noeviction" in command and "--maxmemory " in command
    assert [target for _, target in map(volume, redis["volumes"])] == ["/data"]
    assert redis["healthcheck"]["test"][-1] == "ping"


def test_every_selaras_command_parses_with_the_real_cli(config: dict[str, Any]) -> None:
    for name in SELARAS_SERVICES:
        service = config["services"][name]
        assert service["build"]["dockerfile"] == "Dockerfile" and Path(service["build"]["context"]) == REPO
        context = parse_cli([str(arg) for arg in service["command"]])
        assert context.command.name in ("serve", "train", "personas", "retention")
        assert service.get("user") in (None, "10001", "10001:10001"), "services run as the image's non-root user"
    serve = {name: parse_cli(config["services"][name]["command"]).params for name in ("profile", "recommend-1")}
    assert serve["profile"]["service"] == "profile" and serve["profile"]["workers"] == 1
    assert serve["profile"]["host"] == serve["recommend-1"]["host"] == "0.0.0.0"
    assert config["services"]["recommend-1"]["command"] == config["services"]["recommend-2"]["command"]


def test_variables_are_ones_selaras_reads(config: dict[str, Any]) -> None:
    known = known_variables()
    for name in SELARAS_SERVICES:
        variables = selaras_variables(config["services"][name]["environment"])
        assert variables and variables <= known, f"{name}: unknown {sorted(variables - known)}"
        env = config["services"][name]["environment"]
        assert env["REDIS_URL"] == "redis://redis:6379/0" and env["SELARAS_ENVIRONMENT"] == "production"


def test_healthchecks_probe_the_port_the_service_listens_on(config: dict[str, Any]) -> None:
    for name in ("profile", "aggregator", "recommend-1", "recommend-2"):
        service = config["services"][name]
        port = parse_cli(service["command"]).params["port"]
        probe = " ".join(service["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/readyz" in probe, probe
        assert str(service["environment"]["SELARAS_PORT"]) == str(port)  # the image's own HEALTHCHECK


def test_offline_store_is_the_only_shared_disk_and_mounted_files_exist(config: dict[str, Any]) -> None:
    def mounts(name: str) -> dict[str, str]:
        return {target: source for source, target in map(volume, config["services"][name].get("volumes", []))}

    writer, trainer, retention = mounts("aggregator"), mounts("train"), mounts("retention")
    data_dir = config["services"]["profile"]["environment"]["SELARAS_DATA_DIR"]
    assert writer[f"{data_dir}/offline"] == trainer[f"{data_dir}/offline"] == retention[f"{data_dir}/offline"]
    assert writer[f"{data_dir}/offline"] == "offline"
    assert data_dir not in writer, "the Feast registry stays local to each container"
    experiments = config["services"]["recommend-1"]["environment"]["RECOMMEND_EXPERIMENTS_FILE"]
    assert Path(mounts("recommend-1")[experiments]) == REPO / "experiments.yaml"
    for name in ("prometheus", "grafana", "proxy", "recommend-1"):
        for source in mounts(name).values():
            if source.startswith("/"):
                assert Path(source).exists(), f"{name} mounts {source}, which is not in the repository"
    assert (REPO / "deploy" / "prometheus" / "prometheus.yml").is_file()


def test_proxy_balances_exactly_the_recommend_replicas_with_readiness_checks(config: dict[str, Any]) -> None:
    text = (REPO / "deploy" / "haproxy.cfg").read_text()
    servers = re.findall(r"^\s*server\s+(\S+)\s+(\S+):(\d+)", text, flags=re.M)
    replicas = sorted(name for name in config["services"] if name.startswith("recommend-"))
    assert sorted(host for _, host, _ in servers) == replicas
    assert {int(port) for _, _, port in servers} == {8002}
    assert "option httpchk GET /readyz" in text and "option redispatch" in text
    # Only requests that never reached a replica are retried: the POST routes are not idempotent.
    retry_on = re.findall(r"^\s*retry-on\s+(.+)$", text, flags=re.M)
    assert [line.split() for line in retry_on] == [["conn-failure"]]
    published = config["services"]["proxy"]["ports"][0]
    assert int(published["published"]) == 8002
    haproxy = shutil.which("haproxy")
    assert haproxy, "haproxy is missing: run scripts/ensure_system_packages.sh"
    check = subprocess.run([haproxy, "-c", "-f", str(REPO / "deploy" / "haproxy.cfg")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
