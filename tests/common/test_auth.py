"""API keys: hashed storage, scopes (admin includes the others), 401 vs 403, settings checks, and
`selaras keys new` printing a key whose entry authenticates it."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from services.cli import app as cli_app
from services.common.auth import ApiKeyAuth, hash_key, parse_keys
from services.common.errors import Forbidden, Unauthorized
from services.common.security import generate_api_key
from services.common.settings import CommonSettings

WEB, SENDER, OPS = "pk_web_0123456789abcdef", "sk_sender_0123456789abcdef", "sk_ops_0123456789abcdef"
SPEC = f"web:recommend:{hash_key(WEB)},sender:ingest:{hash_key(SENDER)},ops:admin:{hash_key(OPS)}"


def test_keys_are_stored_as_hashes_only() -> None:
    keys = parse_keys(SPEC)
    assert [k.name for k in keys] == ["web", "sender", "ops"]
    assert all(WEB.encode() not in k.digest and len(k.digest) == 32 for k in keys)
    assert WEB not in SPEC


def test_scopes_401_and_403() -> None:
    auth = ApiKeyAuth(SPEC)
    assert auth.authenticate(WEB, "recommend") == "web"
    assert auth.authenticate(SENDER, "ingest") == "sender"
    for scope in ("recommend", "ingest", "admin"):
        assert auth.authenticate(OPS, scope) == "ops"  # admin includes everything
    with pytest.raises(Forbidden, match="'web' lacks the 'ingest' scope"):
        auth.authenticate(WEB, "ingest")
    with pytest.raises(Forbidden):
        auth.authenticate(SENDER, "recommend")
    with pytest.raises(Forbidden):
        auth.authenticate(WEB, "admin")
    with pytest.raises(Unauthorized, match="missing"):
        auth.authenticate(None, "recommend")
    with pytest.raises(Unauthorized, match="unknown"):
        auth.authenticate(WEB + "x", "recommend")
    assert Unauthorized("x").status_code == 401 and Forbidden("x").status_code == 403


def test_without_keys_auth_is_off_only_outside_production() -> None:
    assert ApiKeyAuth("").authenticate(None, "admin") == "anonymous"
    with pytest.raises(ValidationError, match="SELARAS_API_KEYS must be set"):
        CommonSettings(environment="production")
    with pytest.raises(ValidationError, match="placeholder"):
        CommonSettings(environment="production", api_keys="ops:admin:changeme")
    assert CommonSettings(environment="production", api_keys=SPEC).api_keys == SPEC


@pytest.mark.parametrize(
    "spec", ["web:recommend", "web:superuser:" + "0" * 64, "web:recommend:abc", "web:recommend:" + "zz" * 32]
)
def test_malformed_entries_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_keys(spec)


def test_generated_keys_are_random_and_authenticate() -> None:
    secret, entry = generate_api_key("shop-web", "recommend")
    other, _ = generate_api_key("shop-web", "recommend")
    assert secret != other and len(secret) >= 40
    assert ApiKeyAuth(entry).authenticate(secret, "recommend") == "shop-web"
    with pytest.raises(ValueError):
        generate_api_key("bad:name", "recommend")
    with pytest.raises(ValueError):
        generate_api_key("crm", "recommend+root")


def test_cli_keys_new_prints_a_key_and_its_entry() -> None:
    result = CliRunner().invoke(cli_app, ["keys", "new", "--name", "crm", "--scopes", "recommend+ingest"])
    assert result.exit_code == 0, result.output
    secret = re.search(r"key \(give it to the client; it is not stored anywhere\): (\S+)", result.output)
    entry = re.search(r"SELARAS_API_KEYS entry \(comma-separate several\): (\S+)", result.output)
    assert secret and entry
    auth = ApiKeyAuth(entry.group(1))
    assert auth.authenticate(secret.group(1), "ingest") == "crm"
    assert auth.authenticate(secret.group(1), "recommend") == "crm"
    with pytest.raises(Forbidden):
        auth.authenticate(secret.group(1), "admin")
    refused = CliRunner().invoke(cli_app, ["keys", "new", "--name", "crm", "--scopes", "root"])
    assert refused.exit_code == 2
