"""Helpers shared by the deployment tests: which environment variables Selaras reads, and CLI argument checks."""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer
from pydantic import AliasChoices

from services.cli import app
from services.common.settings import CommonSettings
from services.profile.settings import ProfileSettings
from services.recommend.settings import RecommendSettings

REPO = Path(__file__).resolve().parents[2]
# Read outside the settings classes: the image's healthcheck port, the CLI's options and the metrics switch.
OTHER_VARIABLES = frozenset(
    {"SELARAS_PORT", "SELARAS_ADMIN_API_KEY", "SELARAS_DASK_SCHEDULER", "SELARAS_METRICS_DIR", "REDIS_URL"}
)


def known_variables() -> frozenset[str]:
    """Every environment variable the settings classes accept."""
    names: set[str] = set(OTHER_VARIABLES)
    for model, prefix in ((CommonSettings, ""), (ProfileSettings, "PROFILE_"), (RecommendSettings, "RECOMMEND_")):
        for field_name, info in model.model_fields.items():
            alias = info.validation_alias
            if isinstance(alias, AliasChoices):
                names.update(str(choice).upper() for choice in alias.choices)
            elif prefix and field_name not in CommonSettings.model_fields:
                names.add(f"{prefix}{field_name}".upper())
    return frozenset(names)


def selaras_variables(env: dict[str, str] | Sequence[str]) -> set[str]:
    keys = env.keys() if isinstance(env, dict) else [entry.split("=", 1)[0] for entry in env]
    return {key for key in keys if key.startswith(("SELARAS_", "PROFILE_", "RECOMMEND_"))}


def parse_cli(args: Sequence[str]) -> Any:
    """Parse `selaras ARGS` exactly as the entry point would, without running the command.

    Unknown commands or options and badly typed values raise Typer's usage errors."""
    command: Any = typer.main.get_command(app)
    context = command.context_class(command, info_name="selaras")
    remaining = list(args)
    while hasattr(command, "get_command"):  # a command group (Typer vendors its own click)
        assert remaining, "a command group needs a subcommand"
        name = remaining.pop(0)
        sub = command.get_command(context, name)
        assert sub is not None, f"unknown command {name!r}"
        command = sub
        context = command.context_class(command, info_name=name, parent=context)
    return command.make_context(context.info_name, remaining, parent=context.parent)


def cli_args(container: dict[str, Any]) -> list[str]:
    """The `selaras` arguments a container runs (the training job wraps them in a shell for the reload list)."""
    if container.get("command", [None])[0] == "/bin/sh":
        script = " ".join(container["args"])
        script = re.sub(r"\$\((?:[^()]|\([^()]*\))*\)", "--reload-url http://10.1.2.3:8002", script)
        words = shlex.split(script)
        return words[words.index("selaras") + 1 :]
    return [str(arg) for arg in container["args"]]
