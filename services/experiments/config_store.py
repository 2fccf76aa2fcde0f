"""The experiments configuration as one shared record, and the audit log of its changes.

Every replica of the recommend service reads the same record (namespace `expconfig`, key `config`):
`{"generation": n, "config": <experiments.yaml as JSON>}`. Changes go through `Store.update`, a
compare-and-set, so two admins changing it at once never lose one another's change; each change bumps the
generation, which the replicas poll (runtime.py) to swap their view without a restart.

Seeding rule: experiments.yaml is written to the store only when the store holds no configuration yet. Once
stored, **the store wins**: editing the file and restarting changes nothing (otherwise a restart of one replica
would silently undo changes made through the API). `selaras experiments seed --force FILE` replaces the stored
configuration with the file's (and is audited like any other change).

The audit log is a second record (key `audit`), the newest `AUDIT_LIMIT` entries, appended by compare-and-set
right after the change it describes: who (the API key's name), when (business clock), what (the experiment
before and after).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from pydantic import ValidationError

from services.common.api import describe_errors
from services.common.errors import InvalidPayload
from services.common.storage import Store
from services.experiments.config import ConfigFieldError, ExperimentsFile

# The blob namespace of both records. Only the experiments package reads it, so it is named here rather than in
# `services.common.storage.Namespace` (the contract between services).
NAMESPACE: Final = "expconfig"
CONFIG_KEY: Final = "config"
AUDIT_KEY: Final = "audit"
AUDIT_LIMIT: Final = 1000


@dataclass(frozen=True)
class StoredConfig:
    generation: int
    config: ExperimentsFile

    def to_json(self) -> bytes:
        return json.dumps({"generation": self.generation, "config": self.config.model_dump(mode="json")}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> StoredConfig:
        data = json.loads(raw)
        return cls(int(data["generation"]), ExperimentsFile.model_validate(data["config"]))


# An edit of the configuration as plain JSON data (validated afterwards as a whole); it raises a SelarasError
# to refuse the change (unknown key, conflict).
Edit = Callable[[dict[str, Any]], dict[str, Any]]


def validate_config(data: dict[str, Any]) -> ExperimentsFile:
    """The edited configuration, or 422 naming the field (`experiments.<i>.<field>`)."""
    try:
        return ExperimentsFile.model_validate(data)
    except ValidationError as exc:
        raw = exc.errors()
        errors = describe_errors(raw)
        for error, described in zip(raw, errors, strict=True):
            # A check across experiments (namespace overlap) names the field of the experiment it refuses.
            cause = (error.get("ctx") or {}).get("error")
            if isinstance(cause, ConfigFieldError):
                described["field"] = cause.field
                described["message"] = str(cause).removeprefix(f"{cause.field}: ")
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        raise InvalidPayload(f"invalid experiment configuration: {detail}", extra={"errors": errors}) from exc


def _experiment(config: ExperimentsFile, key: str | None) -> dict[str, Any] | None:
    found = next((e for e in config.experiments if e.key == key), None)
    return found.model_dump(mode="json") if found is not None else None


class ExperimentConfigStore:
    """Reads, seeds and changes the shared configuration record; appends and reads the audit log."""

    def __init__(self, store: Store):
        self.store = store

    def load(self) -> StoredConfig | None:
        raw = self.store.get(NAMESPACE, CONFIG_KEY)
        return StoredConfig.from_json(raw) if raw is not None else None

    def seed(self, config: ExperimentsFile, *, force: bool, actor: str, now: float) -> tuple[StoredConfig, bool]:
        """Store `config` when none is stored (or always with `force`); returns what is stored and whether
        this call wrote it."""
        wrote: list[StoredConfig | None] = [None]
        before: list[StoredConfig | None] = [None]

        def change(raw: bytes | None) -> bytes:
            current = StoredConfig.from_json(raw) if raw is not None else None
            before[0] = current
            if raw is not None and not force:
                wrote[0] = None  # keep what is stored (a retry may follow a write that came first)
                return raw
            new = StoredConfig((current.generation if current else 0) + 1, config)
            wrote[0] = new
            return new.to_json()

        stored = StoredConfig.from_json(self.store.update(NAMESPACE, CONFIG_KEY, change))
        if wrote[0] is not None:
            old = before[0].config if before[0] is not None else None
            keys = [e.key for e in config.experiments]
            if old is not None:
                keys = list(dict.fromkeys([*(e.key for e in old.experiments), *keys]))
            for key in keys:
                self._audit(actor, now, "seed", key, stored.generation, old, config)
        return stored, wrote[0] is not None

    def change(self, edit: Edit, *, actor: str, now: float, action: str, key: str) -> StoredConfig:
        """Apply `edit` by compare-and-set (re-run on the new value if another writer came first), bump the
        generation and audit the change of experiment `key`."""
        before: list[ExperimentsFile | None] = [None]

        def change(raw: bytes | None) -> bytes:
            current = StoredConfig.from_json(raw) if raw is not None else StoredConfig(0, ExperimentsFile())
            before[0] = current.config
            edited = validate_config(edit(current.config.model_dump(mode="json")))
            return StoredConfig(current.generation + 1, edited).to_json()

        stored = StoredConfig.from_json(self.store.update(NAMESPACE, CONFIG_KEY, change))
        self._audit(actor, now, action, key, stored.generation, before[0], stored.config)
        return stored

    def _audit(
        self,
        actor: str,
        now: float,
        action: str,
        key: str,
        generation: int,
        before: ExperimentsFile | None,
        after: ExperimentsFile,
    ) -> None:
        entry = {
            "at": datetime.fromtimestamp(now, tz=UTC).isoformat(),
            "ts": now,
            "actor": actor,
            "action": action,
            "key": key,
            "generation": generation,
            "before": _experiment(before, key) if before is not None else None,
            "after": _experiment(after, key),
        }

        def append(raw: bytes | None) -> bytes:
            entries: list[dict[str, Any]] = json.loads(raw) if raw else []
            return json.dumps([*entries, entry][-AUDIT_LIMIT:]).encode()

        self.store.update(NAMESPACE, AUDIT_KEY, append)

    def audit(self, key: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The newest entries first, of every experiment or of `key`."""
        raw = self.store.get(NAMESPACE, AUDIT_KEY)
        entries: list[dict[str, Any]] = json.loads(raw) if raw else []
        chosen = [e for e in reversed(entries) if key is None or e["key"] == key]
        return chosen[:limit]
