"""API keys with scopes. Keys are stored as SHA-256 hashes and compared in constant time.

Scopes: `recommend` (read-only, safe in a browser), `ingest` (event senders), `admin` (catalog, experiments,
reload, erasure). `admin` includes the others.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Final

from services.common.errors import Forbidden, Unauthorized

SCOPES: Final = frozenset({"recommend", "ingest", "admin"})


@dataclass(frozen=True)
class ApiKey:
    name: str
    scopes: frozenset[str]
    digest: bytes


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_keys(spec: str) -> list[ApiKey]:
    """`name:scope+scope:sha256hex` entries separated by commas."""
    keys: list[ApiKey] = []
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        try:
            name, scopes, digest = entry.split(":")
        except ValueError as exc:
            raise ValueError(f"API key entry {entry[:20]!r}… must be name:scope+scope:sha256hex") from exc
        wanted = frozenset(scopes.split("+"))
        if not wanted <= SCOPES:
            raise ValueError(f"API key {name!r} has unknown scopes {sorted(wanted - SCOPES)}")
        if len(digest) != 64:
            raise ValueError(f"API key {name!r}: the hash must be 64 hex characters (sha256)")
        keys.append(ApiKey(name, wanted, bytes.fromhex(digest)))
    return keys


class ApiKeyAuth:
    def __init__(self, spec: str):
        self.keys = parse_keys(spec)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def is_admin(self, name: str) -> bool:
        """True for an admin key, and for everyone when auth is off (development)."""
        if not self.enabled:
            return True
        return any(key.name == name and "admin" in key.scopes for key in self.keys)

    def authenticate(self, presented: str | None, scope: str) -> str:
        """The key's name, or 401 (no/unknown key) / 403 (known key, wrong scope)."""
        if not self.enabled:
            return "anonymous"
        if not presented:
            raise Unauthorized("missing API key: send it in the X-API-Key header")
        digest = hashlib.sha256(presented.encode()).digest()
        match: ApiKey | None = None
        for key in self.keys:  # compare against every key so timing does not reveal which one matched
            if hmac.compare_digest(digest, key.digest):
                match = key
        if match is None:
            raise Unauthorized("unknown API key")
        if scope not in match.scopes and "admin" not in match.scopes:
            raise Forbidden(f"API key {match.name!r} lacks the {scope!r} scope")
        return match.name
