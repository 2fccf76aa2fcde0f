"""API keys with scopes. Keys are stored as SHA-256 hashes and compared in constant time.

Scopes, by threat model. Browser scopes (the key is public: anyone can copy it from the shop's pages):
  * `recommend`: rankings; no personal data in answers (`explain` gives generic reasons), no chosen `now`;
  * `collect`: behaviour events (views, searches, carts, clicks) of one visitor per request; no purchases,
    no profile updates (they carry consent and traits), no consent API.
Server scopes (secret keys on the shop's backend):
  * `ingest`: any event, consent changes;
  * `messages`: next-best message decisions (they render the visitor's name and cart, record sends, use caps);
  * `admin`: catalog, experiments, reload, profiles, erasure; includes every other scope.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Final

from services.common.errors import Forbidden, Unauthorized

SCOPES: Final = frozenset({"recommend", "collect", "ingest", "messages", "admin"})
BROWSER_SCOPES: Final = frozenset({"recommend", "collect"})


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

    def scopes_of(self, name: str) -> frozenset[str]:
        """The key's scopes (every scope when auth is off: development)."""
        if not self.enabled:
            return SCOPES
        for key in self.keys:
            if key.name == name:
                return SCOPES if "admin" in key.scopes else key.scopes
        return frozenset()

    def is_browser(self, name: str) -> bool:
        """True for a key that holds only browser scopes: it gets no personal data."""
        return self.scopes_of(name) <= BROWSER_SCOPES

    def authenticate(self, presented: str | None, *scopes: str) -> str:
        """The key's name if it holds one of `scopes`, or 401 (no/unknown key) / 403 (known key, wrong scope)."""
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
        if not match.scopes & {*scopes, "admin"}:
            raise Forbidden(f"API key {match.name!r} lacks the {' or '.join(map(repr, scopes))} scope")
        return match.name
