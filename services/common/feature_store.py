"""The Feast store, configured from settings, and the writes/reads both services make through it.

Configuration is built in code from the same settings as everything else (`feature_repo/feature_store.yaml`
mirrors it for the plain `feast` CLI): SQLite online store by default, Redis when REDIS_URL is set,
DuckDB offline store over parquet part files that the profile service appends.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import math
import sys
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from feast import FeatureStore, RepoConfig

from services.common import features as F
from services.common.settings import CommonSettings

log = logging.getLogger(__name__)

ARROW_TYPES: dict[str, pa.DataType] = {
    "int": pa.int64(),
    "float": pa.float64(),
    "str": pa.string(),
    "str_list": pa.list_(pa.string()),
    "float_list": pa.list_(pa.float64()),
}


def redis_connection_string(redis_url: str, timeout_s: float) -> str:
    """Feast's `host:port,db=N,password=...` form of a redis:// URL, with fail-fast timeouts."""
    url = urlparse(redis_url)
    parts = [f"{url.hostname or '127.0.0.1'}:{url.port or 6379}"]
    db = (url.path or "/0").lstrip("/") or "0"
    if db != "0":
        parts.append(f"db={db}")
    if url.password:
        parts.append(f"password={unquote(url.password)}")
    if url.scheme == "rediss":
        parts.append("ssl=true")
    parts += [f"socket_timeout={timeout_s}", f"socket_connect_timeout={timeout_s}"]
    return ",".join(parts)


def repo_config(settings: CommonSettings) -> RepoConfig:
    feast_dir = (settings.data_dir / "feast").resolve()
    feast_dir.mkdir(parents=True, exist_ok=True)
    online: dict[str, Any]
    if settings.redis_url:
        online = {
            "type": "redis",
            "connection_string": redis_connection_string(settings.redis_url, settings.redis_timeout_s),
            "redis_type": "redis_cluster" if settings.redis_cluster else "redis",
        }
        if settings.redis_cluster:
            # Feast's cluster client takes no db parameter.
            online["connection_string"] = ",".join(
                p for p in online["connection_string"].split(",") if not p.startswith("db=")
            )
    else:
        online = {"type": "sqlite", "path": str(feast_dir / "online.db")}
    return RepoConfig(
        project=settings.feast_project,
        provider="local",
        registry=str(feast_dir / f"registry-{settings.feast_project}.db"),
        online_store=online,
        offline_store={"type": "duckdb"},
        entity_key_serialization_version=3,
        repo_path=settings.feature_repo.resolve(),
    )


def _load_definitions_module(feature_repo: Path) -> Any:
    path = feature_repo / "feature_definitions.py"
    spec = importlib.util.spec_from_file_location("selaras_feature_definitions", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def definitions_fingerprint(feature_repo: Path) -> str:
    """Changes whenever the definitions or the feature lists change, so the registry is re-applied."""
    digest = hashlib.sha256()
    for path in (feature_repo / "feature_definitions.py", Path(F.__file__)):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_feature_store(settings: CommonSettings) -> FeatureStore:
    """A FeatureStore whose registry holds the current definitions (applied once per change)."""
    config = repo_config(settings)
    store = FeatureStore(config=config)
    feast_dir = (settings.data_dir / "feast").resolve()
    fingerprint = definitions_fingerprint(settings.feature_repo)
    marker = feast_dir / f"applied-{settings.feast_project}-{'redis' if settings.redis_url else 'sqlite'}"
    with file_lock(feast_dir / f"apply-{settings.feast_project}.lock"):
        if not marker.exists() or marker.read_text() != fingerprint:
            module = _load_definitions_module(settings.feature_repo)
            offline_dir = settings.offline_dir.resolve()
            for view in (F.VISITOR_VIEW, F.ITEM_VIEW):
                (offline_dir / view).mkdir(parents=True, exist_ok=True)
            log.info("applying feature definitions", extra={"fingerprint": fingerprint})
            store.apply(module.build_definitions(offline_dir))
            marker.write_text(fingerprint)
    store.refresh_registry()
    return store


def to_arrow_table(rows: Sequence[Mapping[str, Any]], key: str, features: Mapping[str, F.FeatureKind]) -> pa.Table:
    """Rows -> a typed arrow table (entity key, event timestamp, features); missing values become nulls."""
    columns: dict[str, pa.Array] = {
        key: pa.array([r[key] for r in rows], pa.string()),
        F.TIMESTAMP_FIELD: pa.array([r[F.TIMESTAMP_FIELD] for r in rows], pa.timestamp("us", tz="UTC")),
    }
    for name, kind in features.items():
        values = [_clean(r.get(name), kind) for r in rows]
        columns[name] = pa.array(values, ARROW_TYPES[kind])
    return pa.table(columns)


def _clean(value: Any, kind: F.FeatureKind) -> Any:
    if value is None:
        return None
    if kind == "float":
        number = float(value)
        return None if math.isnan(number) else number
    if kind == "int":
        return None if isinstance(value, float) and math.isnan(value) else int(value)
    return value


class FeatureWriter:
    """Writes feature rows online (Feast) and appends them offline as parquet part files (point-in-time)."""

    def __init__(self, store: FeatureStore, offline_dir: Path):
        self.store = store
        self.offline_dir = offline_dir.resolve()
        self._lock = threading.Lock()

    def write(self, view: str, rows: Sequence[Mapping[str, Any]], offline: bool = True) -> None:
        if not rows:
            return
        key, features = (F.VISITOR_KEY, F.VISITOR_FEATURES) if view == F.VISITOR_VIEW else (F.ITEM_KEY, F.ITEM_FEATURES)
        table = to_arrow_table(rows, key, features)
        frame = table.to_pandas()
        # The online row is stamped with the write time: Feast keeps the newest-stamped row, and a late
        # event (older event time) must still replace what is online.
        online = frame.copy()
        online[F.TIMESTAMP_FIELD] = pd.Timestamp(datetime.now(UTC))
        self.store.write_to_online_store(view, online)
        if offline:
            self.append_offline(view, table)

    def append_offline(self, view: str, table: pa.Table) -> Path:
        directory = self.offline_dir / view
        directory.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        path = directory / f"part-{stamp}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp)
        tmp.rename(path)  # readers glob *.parquet and never see a half-written file
        return path


def online_rows(store: FeatureStore, view: str, keys: Sequence[str]) -> list[dict[str, Any]]:
    """Read rows from the online store; a missing entity comes back with every feature None."""
    key, features = (F.VISITOR_KEY, F.VISITOR_FEATURES) if view == F.VISITOR_VIEW else (F.ITEM_KEY, F.ITEM_FEATURES)
    response = store.get_online_features(
        features=[f"{view}:{name}" for name in features], entity_rows=[{key: k} for k in keys]
    ).to_dict()
    return [{name: response[name][i] for name in (key, *features)} for i in range(len(keys))]
