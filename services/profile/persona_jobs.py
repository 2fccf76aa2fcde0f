"""The persona job: learn personas from the visitors' behaviour, store the model, assign every visitor.

Runs from `selaras personas` (schedule it, e.g. a nightly cron or Kubernetes CronJob) and from the demo
world builder. One run:
  1. reads every visitor state and turns it into the visitor's feature row (as of their latest event, exactly
     the row the aggregator wrote online);
  2. fits personas (services/profile/personas.py: k chosen by the Davies-Bouldin index, ids matched to the
     previous model);
  3. stores the model (`personas:current`, plus `personas:model:<version>` as history) and a report with
     how visitors moved between the previous and the new personas;
  4. rewrites the online rows with the persona id and with segments as of now (lifecycle only moves to
     at-risk or dormant when time passes without events, which no event can trigger), and appends those
     changed rows to the offline history stamped now, so training sees what serving sees;
  5. optionally back-fills `persona_id` in the offline history, each row assigned from its own point-in-time
     features, so a ranker trained afterwards learns from persona ids like the ones it will be served.
Live updates between runs: the aggregator assigns each new row with `PersonaAssigner`, which follows the
stored model.

The job never writes visitor states (the aggregator owns them; a concurrent write could lose events). Everything
it reads and writes goes through `PersonaRepository` (services/profile/personas/repository.py).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

from services.common.clock import SYSTEM_CLOCK, wall_time
from services.common.models import ModelKind, ModelRegistry
from services.common.storage import Store
from services.features import schema as F
from services.features.aggregations import SEGMENT_NAMES, SegmentRules, VisitorState, segments, visitor_features
from services.profile.personas import TRAIT_NAMES, PersonaModel, fit_personas, movement_report
from services.profile.personas.repository import PersonaRepository

log = logging.getLogger(__name__)

CHUNK = 500
# The fit runs on at most this many visitors (a seeded sample); every visitor is still assigned.
MAX_FIT_VISITORS = 50_000
# Columns of the visitor view that persona traits read (services/profile/personas.py _trait_row).
TRAIT_COLUMNS = (
    "event_count",
    "views_30d",
    "session_depth",
    "carts_30d",
    "purchases_30d",
    "typical_price_viewed",
    "discount_affinity",
    "discount_views_30d",
    "hour_histogram",
    "payday_purchase_share",
    "preferred_device",
    "top_categories",
    "top_category_scores",
    "top_brand_scores",
    "rfm_monetary",
)


def persona_rows(repository: PersonaRepository, rules: SegmentRules) -> list[dict[str, Any]]:
    """Every visitor's feature row (as of their latest event) with its visitor id."""
    return [
        {**visitor_features(state, rules), F.VISITOR_KEY: state.visitor_id}
        for state in repository.iter_visitor_states()
    ]


# --------------------------------------------------------------------------------------------- live


class PersonaAssigner:
    """`Aggregator(persona_assigner=...)`: the persona id of a fresh feature row, from the stored model.

    Polls the stored model version at most every `check_every_s` and reloads the model when it changed, so a
    persona job's new model reaches the live service without a restart. -1 until a model exists."""

    def __init__(self, store: Store, check_every_s: float = 10.0):
        self.registry = ModelRegistry(store)
        self.check_every_s = check_every_s
        self.model: PersonaModel | None = None
        self._serving: str | None = None
        self._checked = -math.inf
        self._lock = threading.Lock()

    def current(self) -> PersonaModel | None:
        now = time.monotonic()
        if now - self._checked >= self.check_every_s:
            with self._lock:
                self._checked = now
                try:
                    index = self.registry.index(ModelKind.PERSONAS)
                    if index.serving != self._serving:
                        blob = self.registry.blob(ModelKind.PERSONAS, index.serving, index) if index.serving else None
                        model = PersonaModel.from_json(blob.decode()) if blob else None
                        if model is not None and model.trait_names != list(TRAIT_NAMES):
                            log.warning("stored persona model uses other traits; run `selaras personas` again")
                            model = None
                        self.model, self._serving = model, index.serving
                except Exception as exc:  # keep the last model when the store hiccups
                    log.warning("persona model not reloaded: %s", type(exc).__name__)
        return self.model

    def __call__(self, row: Mapping[str, Any]) -> int:
        model = self.current()
        if model is None:
            return -1
        return int(model.assign([row])[0])


# --------------------------------------------------------------------------------------------- the job


@dataclass
class PersonaJobResult:
    model: PersonaModel
    previous_version: int | None
    movement: dict[str, Any] | None
    visitors: int = 0
    assigned: dict[int, int] = field(default_factory=dict)  # persona id -> visitors (all activity levels)
    persona_changed: int = 0
    segments_changed: int = 0
    online_rows: int = 0
    skipped_busy: int = 0
    offline_rows_appended: int = 0
    offline_rows_backfilled: int = 0
    offline_files_rewritten: int = 0
    seconds: float = 0.0

    def report(self) -> dict[str, Any]:
        """The JSON report stored next to the model and served by GET /v1/personas."""
        model = self.model
        return {
            "version": model.version,
            "previous_version": self.previous_version,
            "created_at": model.created_at,
            "k": model.k,
            "silhouette_by_k": {str(k): round(v, 4) for k, v in model.silhouette_by_k.items()},
            "davies_bouldin_by_k": {str(k): round(v, 4) for k, v in model.davies_bouldin_by_k.items()},
            "n_fit": model.n_fit,
            "visitors": self.visitors,
            "assigned": {str(k): v for k, v in sorted(self.assigned.items())},
            "persona_changed": self.persona_changed,
            "segments_changed": self.segments_changed,
            "movement": self.movement,
            "offline_rows_backfilled": self.offline_rows_backfilled,
            "seconds": self.seconds,
        }


def _sample(
    repository: PersonaRepository, rules: SegmentRules, limit: int, seed: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """A seeded reservoir sample of visitor rows (all of them when there are fewer than `limit`), and every
    visitor id. One scan of the store: on a big Redis a scan walks the whole keyspace, so it is done once."""
    rng = random.Random(seed)
    sample: list[dict[str, Any]] = []
    visitor_ids: list[str] = []
    for key, raw in repository.visitor_state_records():
        visitor_ids.append(key)
        n = len(visitor_ids)
        j = n - 1 if n <= limit else rng.randrange(n)
        if j < limit:
            row = visitor_features(VisitorState.from_dict(orjson.loads(raw)), rules)
            if n <= limit:
                sample.append(row)
            else:
                sample[j] = row
    return sample, visitor_ids


def run_persona_job(
    repository: PersonaRepository,
    rules: SegmentRules,
    *,
    k_range: range = range(3, 7),
    seed: int = 0,
    now: float | None = None,
    backfill_offline: bool = True,
    max_fit_visitors: int = MAX_FIT_VISITORS,
) -> PersonaJobResult:
    """Fit, store, assign and report (see the module docstring). Raises ValueError with too little data."""
    started = time.perf_counter()
    at = now if now is not None else SYSTEM_CLOCK.now()
    previous = repository.newest_model()
    if previous is not None and previous.trait_names != list(TRAIT_NAMES):
        log.warning("previous persona model uses other traits: persona ids start afresh")
        previous = None
    sample, visitor_ids = _sample(repository, rules, max_fit_visitors, seed)
    model = fit_personas(sample, k_range, seed, previous, now=datetime.fromtimestamp(at, tz=UTC))
    movement = movement_report(previous, model, sample) if previous is not None else None
    repository.save_model(model)
    result = PersonaJobResult(model, previous.version if previous else None, movement)
    # Rows get the personas of the model that serves: with a version pinned (a rollback), the new fit is
    # published for review but the live assigner keeps the pinned one, and so does this job.
    serving = repository.serving_model() or model
    stamp = datetime.fromtimestamp(at, tz=UTC)

    def flush(chunk_ids: list[str]) -> None:
        read_at = wall_time()  # before the read: an erasure ending at or after it may miss the rows written below
        chunk = repository.visitor_states(chunk_ids)  # erased/expired since: gone
        visitor_ids = [state.visitor_id for state in chunk]
        rows = [visitor_features(state, rules) for state in chunk]
        ids = serving.assign(rows)
        online_now = repository.online_rows(visitor_ids)
        # Compare-and-skip: a visitor folded since we read the state has a fresher online row already.
        current = repository.applied_positions(visitor_ids)
        changed: list[dict[str, Any]] = []
        for state, row, persona_id, served in zip(chunk, rows, ids.tolist(), online_now, strict=True):
            result.visitors += 1
            persona = int(persona_id) if row["event_count"] else -1
            result.assigned[persona] = result.assigned.get(persona, 0) + 1
            now_segments = segments(state, at, rules)
            # Compared with what is served now: only rows that change are written (online and offline).
            persona_moved = persona != served.get("persona_id")
            segments_moved = any(now_segments[name] != served.get(name) for name in SEGMENT_NAMES)
            if not (persona_moved or segments_moved):
                continue
            if state.visitor_id not in current or current[state.visitor_id] != state.applied_position:
                result.skipped_busy += 1
                continue
            result.persona_changed += persona_moved
            result.segments_changed += segments_moved
            changed.append(
                {
                    **row,
                    **now_segments,
                    "persona_id": persona,
                    F.VISITOR_KEY: state.visitor_id,
                    F.TIMESTAMP_FIELD: stamp,
                }
            )
        if not changed:
            return
        part = repository.write_visitor_rows(changed)
        # An erasure that marked a visitor after the compare-and-skip above may have deleted its online row and
        # rewritten the files holding it before these rows existed: they go again here. One that marks after
        # this check finds them itself (the part file is indexed), as for the aggregator's batches.
        erased = repository.erased_since([row[F.VISITOR_KEY] for row in changed], read_at)
        removed = 0
        if erased:
            repository.forget_online_rows(erased)
            removed = repository.forget_history_rows(part, erased)
        result.online_rows += len(changed) - len(erased)
        result.offline_rows_appended += len(changed) - removed

    for start in range(0, len(visitor_ids), CHUNK):
        flush(visitor_ids[start : start + CHUNK])

    if backfill_offline:
        result.offline_rows_backfilled, result.offline_files_rewritten = backfill_offline_personas(serving, repository)
    result.seconds = round(time.perf_counter() - started, 2)
    repository.save_report(result.report())
    log.info(
        "personas refreshed: version %d, k=%d, %d visitors, %d changed persona",
        model.version,
        model.k,
        result.visitors,
        result.persona_changed,
    )
    return result


def backfill_offline_personas(model: PersonaModel, repository: PersonaRepository) -> tuple[int, int]:
    """Set `persona_id` of every offline visitor row from that row's own (point-in-time) features.

    Returns (rows whose persona id changed, files rewritten). Rows without activity keep -1."""

    def persona_ids(rows: list[dict[str, Any]]) -> np.ndarray:
        ids = model.assign(rows)
        active = np.array([bool(r.get("event_count")) for r in rows])
        return np.where(active, ids, -1)

    return repository.rewrite_offline_persona_ids(TRAIT_COLUMNS, persona_ids)


def persona_table(model: PersonaModel, assigned: Mapping[int, int] | None = None) -> list[dict[str, Any]]:
    """One entry per persona, for the API and the CLI."""
    out = []
    for persona in model.personas:
        out.append(
            {
                "persona_id": persona.persona_id,
                "name_id": persona.name_id,
                "name_en": persona.name_en,
                "description_id": persona.description_id,
                "description_en": persona.description_en,
                "size": persona.size,
                "share": round(persona.share, 4),
                "visitors": (assigned or {}).get(persona.persona_id),
                "top_traits": [dict(t) for t in persona.top_traits],
            }
        )
    return out


def persona_view(model: PersonaModel | None, persona_id: object) -> dict[str, Any] | None:
    """The persona shown on a visitor's profile: id, names and description (None without a persona)."""
    if isinstance(persona_id, bool) or not isinstance(persona_id, int | np.integer) or persona_id < 0:
        return None
    view: dict[str, Any] = {"persona_id": int(persona_id)}
    if model is not None:
        try:
            persona = model.persona(int(persona_id))
        except KeyError:
            return view  # retired by a newer model; the row is re-assigned at the visitor's next event
        view.update(
            name_id=persona.name_id,
            name_en=persona.name_en,
            description_id=persona.description_id,
            description_en=persona.description_en,
        )
    return view
