"""The only persona module that talks to storage: the persona models (the model registry), the job's report,
the visitor states the job reads, and the visitor rows it writes (Feast online, the offline history).

`load_model` and `load_report` need the store only: the endpoints and the CLI read them without Feast."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from feast import FeatureStore

from services.common.models import ModelKind, ModelRegistry
from services.common.storage import Namespace, Store
from services.features import schema as F
from services.features.aggregations import VisitorState
from services.features.store import (
    FeatureWriter,
    delete_online_entities,
    online_rows,
    rewrite_offline_parts,
    to_arrow_table,
)
from services.profile.personas.model import PersonaModel
from services.profile.repository import erased_since

REPORT_KEY = "report"


def load_model(store: Store) -> PersonaModel | None:
    """The persona model that serves (pinned, else the newest; see services/common/models.py)."""
    serving = ModelRegistry(store).serving_blob(ModelKind.PERSONAS)
    return PersonaModel.from_json(serving[1].decode()) if serving else None


def load_report(store: Store) -> dict[str, Any] | None:
    raw = store.get(Namespace.PERSONAS, REPORT_KEY)
    return dict(orjson.loads(raw)) if raw else None


class PersonaRepository:
    def __init__(self, store: Store, feature_store: FeatureStore, offline_dir: Path):
        self.store = store
        self.feature_store = feature_store
        self.offline_dir = offline_dir.resolve()
        self.writer = FeatureWriter(feature_store, offline_dir)

    # -- models and the report ----------------------------------------------------------------------
    def serving_model(self) -> PersonaModel | None:
        return load_model(self.store)

    def newest_model(self) -> PersonaModel | None:
        """The newest persona model published, pinned or not: the next fit continues its persona ids."""
        registry = ModelRegistry(self.store)
        index = registry.index(ModelKind.PERSONAS)
        blob = registry.blob(ModelKind.PERSONAS, index.newest, index) if index.newest else None
        return PersonaModel.from_json(blob.decode()) if blob else None

    def save_model(self, model: PersonaModel) -> None:
        created_at = datetime.fromisoformat(model.created_at).timestamp()
        ModelRegistry(self.store).publish(ModelKind.PERSONAS, str(model.version), model.to_json().encode(), created_at)

    def report(self) -> dict[str, Any] | None:
        return load_report(self.store)

    def save_report(self, report: dict[str, Any]) -> None:
        self.store.put(Namespace.PERSONAS, REPORT_KEY, orjson.dumps(report))

    # -- visitor states (read only: the aggregator owns them) ---------------------------------------
    def visitor_state_records(self) -> Iterator[tuple[str, bytes]]:
        """(visitor id, stored state) of every visitor, in one scan. Unparsed: a caller that keeps a sample
        parses only what it keeps."""
        return self.store.scan(Namespace.VISITOR_STATE)

    def iter_visitor_states(self) -> Iterator[VisitorState]:
        for _, raw in self.visitor_state_records():
            yield VisitorState.from_dict(orjson.loads(raw))

    def visitor_states(self, visitor_ids: Sequence[str]) -> list[VisitorState]:
        """The states of the visitors that have one, in the order asked (erased or expired ones are left out)."""
        raws = self.store.get_many(Namespace.VISITOR_STATE, visitor_ids)
        return [VisitorState.from_dict(orjson.loads(raw)) for raw in raws if raw]

    def applied_positions(self, visitor_ids: Sequence[str]) -> dict[str, Any]:
        """The log position each stored state has folded up to, by visitor (visitors without a state are absent)."""
        raws = self.store.get_many(Namespace.VISITOR_STATE, visitor_ids)
        return {
            visitor_id: orjson.loads(raw).get("applied_position")
            for visitor_id, raw in zip(visitor_ids, raws, strict=True)
            if raw is not None
        }

    # -- visitor rows ---------------------------------------------------------------------------------
    def online_rows(self, visitor_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The visitors' Feast online rows, in the order asked."""
        return online_rows(self.feature_store, F.VISITOR_VIEW, visitor_ids)

    def write_visitor_rows(self, rows: Sequence[dict[str, Any]]) -> str:
        """Write the rows online and append them to the offline history (a new part file); returns the part's
        name (for `forget_history_rows`)."""
        self.writer.write(F.VISITOR_VIEW, rows, offline=False)
        path = self.writer.append_offline(F.VISITOR_VIEW, to_arrow_table(rows, F.VISITOR_KEY, F.VISITOR_FEATURES))
        return path.stem.removeprefix("part-")

    # -- erasure against the job's writes (as against the aggregator's batches) -----------------------
    def erased_since(self, visitor_ids: Sequence[str], read_at: float) -> list[str]:
        """Visitors whose erasure is in progress or ended at or after `read_at` (wall time)."""
        return erased_since(self.store, visitor_ids, read_at)

    def forget_online_rows(self, visitor_ids: Sequence[str]) -> int:
        """Delete the visitors' online rows (never their states: the aggregator owns those)."""
        return delete_online_entities(self.feature_store, F.VISITOR_VIEW, list(visitor_ids))

    def forget_history_rows(self, part: str, visitor_ids: Sequence[str]) -> int:
        """Remove the visitors' rows from the part file `write_visitor_rows` wrote as `part`; returns how many."""
        return self.writer.remove_offline_rows(F.VISITOR_VIEW, part, visitor_ids)

    def rewrite_offline_persona_ids(
        self, columns: Sequence[str], persona_ids: Callable[[list[dict[str, Any]]], np.ndarray]
    ) -> tuple[int, int]:
        """Set `persona_id` of every offline visitor row to `persona_ids(rows of `columns`)`, rewriting only the
        files where an id changes. Returns (rows whose persona id changed, files rewritten)."""
        changed = 0

        def transform(path: Path) -> pa.Table | None:
            nonlocal changed
            probe = pq.read_table(path, columns=[*columns, "persona_id"])
            rows = probe.select(list(columns)).to_pylist()
            if not rows:
                return None
            ids = persona_ids(rows)
            old = probe["persona_id"].to_numpy(zero_copy_only=False)
            old = np.where(np.isnan(old.astype(np.float64)), -2, old).astype(np.int64)
            moved = int((old != ids).sum())
            if moved == 0:
                return None
            changed += moved
            table = pq.read_table(path)
            column = table.schema.get_field_index("persona_id")
            return table.set_column(column, "persona_id", pa.array(ids, pa.int64()))

        files = rewrite_offline_parts(self.offline_dir, F.VISITOR_VIEW, transform)
        return changed, files
