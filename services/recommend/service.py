"""Recommend service logic: the item cache refresher, the served models (served_models.py), and a request's path
visitor -> experiment arm -> `RankContext` -> the ranking pipeline of each slot (ranking/pipeline.py) -> answer
and impression log, with an explicit fallback."""

from __future__ import annotations

import gc
import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from prometheus_client import Counter, Gauge

from services.common.catalog import ItemKind
from services.common.clock import SYSTEM_CLOCK, Clock, TimePolicy, wall_time
from services.common.consent import Consent, ConsentDefaults
from services.common.context import context_features, daypart, local_time, zone_for
from services.common.errors import InvalidPayload, NotFound
from services.common.events import Event
from services.experiments.config import ArmChoice
from services.experiments.covariates import exposure_covariates
from services.experiments.targeting import TargetingContext, targeting_context
from services.features.item_cache import (
    KIND_CODES,
    CatalogArrays,
    ItemSnapshot,
    build_snapshot,
    catalog_arrays,
)
from services.features.schema import visitor_row_at
from services.recommend.answers import impression_event, impression_shared, item_card
from services.recommend.ranking.candidates import (
    CandidateGenerator,
    Filters,
    VisitorVector,
    context_keys_for,
    eligible_products,
)
from services.recommend.ranking.item2item import Strategy, neighbours
from services.recommend.ranking.pipeline import (
    STAGE_VISITOR,
    PipelineOptions,
    RankContext,
    Ranked,
    SlotPipeline,
)
from services.recommend.ranking.ranker import (
    RankerModel,
)
from services.recommend.ranking.reasons import PHRASES, context_label, locale_of, say
from services.recommend.ranking.rules import RuleContext
from services.recommend.repository import RecommendRepository
from services.recommend.schemas import ANCHORED, RecommendRequest, SlotRequest
from services.recommend.served_models import ServedModels
from services.recommend.settings import RecommendSettings

log = logging.getLogger(__name__)

RECOMMENDATIONS = Counter(
    "selaras_recommendations_total", "Recommendation responses by strategy", ["strategy", "fallback"]
)
FALLBACKS = Counter("selaras_recommend_fallback_total", "Responses served by the fallback, by reason", ["reason"])
CACHE_AGE = Gauge("selaras_item_cache_built_timestamp_seconds", "When the in-process item cache was built")
CACHE_ITEMS = Gauge("selaras_item_cache_items", "Items in the in-process cache")
IMPRESSIONS_DROPPED = Counter("selaras_impressions_dropped_total", "Impression batches dropped (queue full)")


# The only explanation a browser-scoped key gets: it says nothing about the visitor.
GENERIC_REASON = PHRASES["generic"]["en"]  # what a browser key gets (in its locale: say(locale, "generic"))


class ArmChooser(Protocol):
    """Experiments: which arm serves this visitor (None = no experiment covers the request)."""

    def assign_recommend(
        self, visitor_id: str, slot_kinds: Sequence[str], now: float, context: TargetingContext | None = None
    ) -> ArmChoice | None: ...

    def record_exposure(
        self,
        visitor_id: str,
        key: str,
        arm: str,
        shown: Mapping[str, tuple[str, Sequence[str]]],
        persona: str | None,
        recommendation_id: str,
        now: float,
        took_s: float,
        covariates: Mapping[str, float] | None = None,
    ) -> None:
        """`shown` maps each slot name to (slot kind, item ids shown); `now` is the request time; `covariates`
        the visitor's pre-exposure metric values (CUPED)."""


@dataclass(frozen=True)
class StoredVisitor:
    """The visitor's stored inputs to ranking. `available` False: the store did not answer (fallback);
    `consent` None: not read (a known visitor under the opt-out default, no experiments)."""

    available: bool
    personalization_allowed: bool
    row: dict[str, Any] | None
    consent: Consent | None

    UNAVAILABLE: ClassVar[StoredVisitor]


StoredVisitor.UNAVAILABLE = StoredVisitor(False, True, None, None)


class RecommendService:
    def __init__(
        self,
        settings: RecommendSettings,
        repository: RecommendRepository,
        consent_defaults: ConsentDefaults | None = None,
        experiments: ArmChooser | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ):
        self.settings = settings
        self.clock = clock
        self.time_policy = TimePolicy(clock, settings.simulation)
        self.repository = repository
        self.consent_defaults = consent_defaults or ConsentDefaults()
        self.experiments = experiments
        self.pipeline = SlotPipeline(
            CandidateGenerator(
                settings.candidate_count(), sources=settings.candidate_sources, pool=settings.candidate_pool
            ),
            PipelineOptions(
                exploration=settings.exploration,
                max_per_category=settings.max_per_category,
                max_pinned_per_slot=settings.max_pinned_per_slot,
                naive_item_features=settings.naive_item_features,
            ),
            exploration_seed=settings.exploration_seed,
            item_stats_via_sdk=repository.item_stats_via_sdk if settings.naive_item_features else None,
        )
        self.snapshot: ItemSnapshot = build_snapshot([], {}, {}, {}, now=clock.now())
        self.models = ServedModels(
            settings, repository, lambda: set(getattr(experiments, "model_versions", lambda: set())())
        )
        self.persona_names: dict[int, str] = {}
        self._catalog: CatalogArrays | None = None
        self._catalog_version: bytes | None = None
        self._product_ids: list[str] = []
        self._item_stats: dict[str, dict[str, Any]] = {}
        self._stats_read_at: float | None = None
        self._stats_full_read_at = 0.0
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        try:
            self.refresh_cache()
        except Exception as exc:  # the store may be down at start: serve empty and keep trying
            log.warning("item cache not built at start: %s", type(exc).__name__)
        try:
            self.reload_model()
            self.load_arm_models()
        except Exception as exc:
            log.warning("no model loaded at start: %s", type(exc).__name__)
        # Objects built at start-up are permanent: freezing them keeps the GC from rescanning them (p99).
        gc.collect()
        gc.freeze()
        self._refresher = threading.Thread(target=self._refresh_loop, name="item-cache", daemon=True)
        self._refresher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._refresher:
            self._refresher.join(5)

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.settings.refresh_interval_s):
            try:
                self.refresh_cache()
            except Exception as exc:
                log.warning("item cache refresh failed, keeping the previous one: %s", type(exc).__name__)
            try:
                self.follow_model_registry()
            except Exception as exc:
                log.warning("model registry not read, keeping the current model: %s", type(exc).__name__)

    @property
    def ready(self) -> bool:
        return self.model is not None and self.snapshot.size > 0

    def refresh_cache(self) -> ItemSnapshot:
        repo = self.repository
        # Parsing the catalog is the costliest part of a refresh (seconds at 100k items): only on a change.
        version = repo.catalog_version()
        catalog_changed = self._catalog is None or version is None or version != self._catalog_version
        if catalog_changed or self._catalog is None:
            self._catalog = catalog_arrays(repo.iter_catalog())
            self._catalog_version = version
            self._product_ids = [self._catalog.ids[i] for i in self._catalog.by_kind[KIND_CODES[ItemKind.PRODUCT]]]
        arrays = self._catalog
        stats = self._read_item_stats(catalog_changed)
        snapshot = build_snapshot(arrays, stats, repo.covisitation(), repo.popularity(), now=self.clock.now())
        self.snapshot = snapshot  # one reference swap: requests see the old or the new snapshot, never half
        self.persona_names = repo.persona_names()
        # Long-lived objects out of the cyclic GC's way: a full collection over them paused requests ~200 ms.
        # (Replaced snapshots are still freed by reference counting; they hold no reference cycles.)
        gc.freeze()
        CACHE_AGE.set(snapshot.built_at)
        CACHE_ITEMS.set(snapshot.size)
        return snapshot

    def _read_item_stats(self, catalog_changed: bool) -> dict[str, dict[str, Any]]:
        """Statistics rows of the catalog's products. Between full reads (at start, after a catalog change or a
        gap, and every `item_stats_full_read_s`) only the rows the aggregator changed since the previous
        refresh are read: a full read is O(catalog) (5.6 s of CPU at 100,000 items). The change log is stamped
        with wall time by the aggregator (it tracks writes, not business events), so it is read in wall time."""
        now = wall_time()
        changed = None
        if (
            not catalog_changed
            and self._stats_read_at is not None
            and now - self._stats_full_read_at < self.settings.item_stats_full_read_s
        ):
            changed = self.repository.changed_items(self._stats_read_at, now)
        if changed is None:
            stats = self.repository.item_stats(self._product_ids)
            self._stats_full_read_at = now
        else:
            index = self._catalog.index if self._catalog is not None else {}
            stats = dict(self._item_stats)
            stats.update(self.repository.item_stats([item_id for item_id in changed if item_id in index]))
        self._item_stats, self._stats_read_at = stats, now
        return stats

    # -- models (services/recommend/served_models.py) ---------------------------------------------------
    @property
    def model(self) -> RankerModel | None:
        return self.models.serving

    @property
    def skipped_models(self) -> dict[str, str]:
        return self.models.skipped

    def reload_model(self, version: str | None = None) -> tuple[str | None, str | None]:
        return self.models.reload(version)

    def follow_model_registry(self) -> None:
        self.models.follow()

    def load_arm_models(self) -> None:
        self.models.load_arm_models()

    # -- ranking ------------------------------------------------------------------------------------
    def read_visitor(self, visitor_id: str) -> StoredVisitor:
        """What ranking reads from the store about the visitor (blocking I/O: the endpoint runs it in the store
        guard's threads, within a budget). Raises when the store or Feast fails."""
        # With an opt-out default, a visitor row exists only while personalization is allowed (the profile
        # service keeps no profile without consent and deletes it on withdrawal), so a known row answers the
        # consent question without a second Redis round trip. With opt-in, consent is always read.
        opt_out = self.consent_defaults.personalization == "opt_out"
        row = self.repository.visitor_row(visitor_id) if opt_out else None
        consent: Consent | None = None
        if row is None or self.experiments is not None:  # experiments also need the `analytics` purpose
            consent = self.repository.consent(visitor_id)
        allowed = (opt_out and row is not None) or (
            consent is not None and consent.allows("personalization", self.consent_defaults)
        )
        if allowed and not opt_out:
            row = self.repository.visitor_row(visitor_id)
        return StoredVisitor(True, allowed, row if allowed else None, consent)

    def recommend(
        self,
        request: RecommendRequest,
        caller_may_set_time: bool = True,
        personal_reasons: bool = True,
        stored: StoredVisitor | None = None,
    ) -> dict[str, Any]:
        """Rank every slot. `caller_may_set_time`: whether `context.now` is honoured (the HTTP endpoint passes
        False for non-admin keys; see `TimePolicy`); the answer says which time was used. `personal_reasons`:
        whether `explain` may say what the visitor did ("still in your cart"); a browser key gets only
        `GENERIC_REASON` (anyone holding the public key could otherwise read a visitor's behaviour). `stored`:
        what `read_visitor` returned, read beforehand off the event loop (None = read it here, blocking)."""
        started = time.perf_counter()
        recommendation_id = uuid.uuid4().hex
        used = self.time_policy.resolve(request.context.now, caller_may_set_time)
        snapshot, model = self.snapshot, self.model
        anchors = self._anchor_rows(request, snapshot)
        if stored is None:
            try:
                stored = self.read_visitor(request.visitor_id)
            except Exception as exc:  # store or Feast down: answer from the in-process caches
                log.debug("visitor row unavailable: %s", type(exc).__name__)
                stored = StoredVisitor.UNAVAILABLE
        visitor, personalization_allowed, fallback_reason = self._visitor(request.visitor_id, used.ts, stored)
        if model is None and fallback_reason is None:
            fallback_reason = "no_model"
        experiment = self._experiment(request, used.ts, stored)
        personalized = experiment[2] if experiment is not None else True
        model = self.models.of_arm(experiment, model)
        use_model = (
            personalized and personalization_allowed and visitor.known and model is not None and fallback_reason is None
        )
        strategy = self._strategy_name(personalization_allowed, personalized, use_model)
        rank = self._rank_context(
            request,
            snapshot,
            model if use_model else None,
            visitor,
            used.ts,
            request.explain and personal_reasons,
            anchors,
            experiment,
        )

        shown: set[str] = set()
        slots_out: list[dict[str, Any]] = []
        impressions: list[Event | dict[str, Any]] = []
        for slot in request.slots:
            slot_out, slot_impressions = self._answer_slot(request, rank, slot, shown, recommendation_id)
            slots_out.append(slot_out)
            impressions.extend(slot_impressions)

        fallback = fallback_reason is not None
        self._record(request, rank, slots_out, impressions, recommendation_id, strategy, fallback_reason, started)
        return {
            "recommendation_id": recommendation_id,
            "visitor_id": request.visitor_id,
            "model_version": model.meta.version if model else None,
            "fallback": fallback,
            "strategy": strategy,
            "experiment": {"key": experiment[0], "arm": experiment[1]} if experiment else None,
            "took_ms": round((time.perf_counter() - started) * 1000, 3),
            "time": used.to_dict(),
            "slots": slots_out,
        }

    @staticmethod
    def _strategy_name(personalization_allowed: bool, personalized: bool, use_model: bool) -> str:
        """The answer's `strategy` (and the metric label): why the visitor got the model or a generic order."""
        if not personalization_allowed:
            return "generic_no_consent"
        if not personalized:
            return "generic_control"
        return "personalized" if use_model else "popular_in_context"

    def _anchor_rows(self, request: RecommendRequest, snapshot: ItemSnapshot) -> tuple[int, ...]:
        """Snapshot rows of `context.item_ids`. Unknown ids are the caller's error (422 naming each), as is an
        item-anchored slot without anchors; with an empty item cache (store down at start) nothing is known,
        and the anchored slots answer empty instead."""
        ids = request.context.item_ids
        errors: list[dict[str, Any]] = []
        if not ids:
            for i, slot in enumerate(request.slots):
                if slot.strategy in ANCHORED:
                    errors.append(
                        {"field": "context.item_ids", "message": f"slots.{i} ({slot.strategy}) needs anchor items"}
                    )
        elif snapshot.size:
            errors = [
                {"field": f"context.item_ids.{j}", "message": f"unknown item {item_id!r}"}
                for j, item_id in enumerate(ids)
                if item_id not in snapshot.index
            ]
        if errors:
            raise InvalidPayload(f"{len(errors)} invalid field(s)", extra={"errors": errors})
        return tuple(dict.fromkeys(snapshot.index[i] for i in ids if i in snapshot.index))

    def _visitor(self, visitor_id: str, now: float, stored: StoredVisitor) -> tuple[VisitorVector, bool, str | None]:
        """(visitor, personalization allowed, fallback reason) from what `read_visitor` read."""
        stage = time.perf_counter()
        visitor = VisitorVector(visitor_id, False, {})
        fallback_reason: str | None = None
        if not stored.available:
            fallback_reason = "store_unavailable"
        elif stored.personalization_allowed:
            row = stored.row
            visitor = VisitorVector.from_row(visitor_id, visitor_row_at(row, now) if row else row)
        STAGE_VISITOR.observe(time.perf_counter() - stage)
        return visitor, stored.personalization_allowed, fallback_reason

    def _experiment(self, request: RecommendRequest, now: float, stored: StoredVisitor) -> ArmChoice | None:
        """(experiment key, arm, personalised) of the visitor, None outside experiments."""
        if self.experiments is None:
            return None
        ctx, row = request.context, stored.row
        persona_id = row.get("persona_id") if row else None
        targeting = targeting_context(
            device=ctx.device.value if ctx.device else None,
            channel=ctx.channel,
            city=ctx.city,
            row=row,
            persona=self.persona_names.get(persona_id) if isinstance(persona_id, int) else None,
            now=now,
        )
        experiment = self.experiments.assign_recommend(
            request.visitor_id, [s.kind.value for s in request.slots], now, targeting
        )
        if experiment is not None and not self._analytics_allowed(request.visitor_id, stored):
            return None  # no exposure (and so no outcome) is tracked without `analytics` consent
        return experiment

    def _rank_context(
        self,
        request: RecommendRequest,
        snapshot: ItemSnapshot,
        model: RankerModel | None,
        visitor: VisitorVector,
        now: float,
        explain: bool,
        anchors: tuple[int, ...],
        experiment: ArmChoice | None,
    ) -> RankContext:
        ctx = request.context
        device = ctx.device.value if ctx.device else None
        city = ctx.city or visitor.city
        offset = ctx.utc_offset_min
        context = context_features(now, offset, device, ctx.channel, city)
        persona_id = visitor.row.get("persona_id") if visitor.known else None
        locale = locale_of(ctx.locale, self.settings.default_locale)
        return RankContext(
            snapshot=snapshot,
            model=model,
            visitor=visitor,
            context=context,
            keys=context_keys_for(city, device, now, offset),
            rules=RuleContext(context["hour"], device, city, bool(context["is_payday_window"])),
            now=now,
            explain=explain,
            context_label=context_label(city, daypart(local_time(now, zone_for(city, offset)).hour), locale),
            locale=locale,
            persona=self.persona_names.get(int(persona_id)) if isinstance(persona_id, int) else None,
            anchors=anchors,
            experiment=experiment,
        )

    def _answer_slot(
        self, request: RecommendRequest, rank: RankContext, slot: SlotRequest, shown: set[str], recommendation_id: str
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """One slot's answer and its impressions; the slot's items join `shown` (no repeats across slots)."""
        snapshot = rank.snapshot
        ranked = self.pipeline.rank_slot(slot, rank, shown)
        items = []
        impressions = []
        shared = impression_shared(request, rank.now) if ranked.idx else None
        for position, (i, score) in enumerate(zip(ranked.idx, ranked.scores, strict=True)):
            item_id = snapshot.ids[i]
            shown.add(item_id)
            entry = item_card(snapshot, i, position, score)
            entry["propensity"] = ranked.propensities[position]
            if ranked.reasons is not None:
                entry["reasons"] = ranked.reasons[position]
            elif request.explain:
                entry["reasons"] = [say(rank.locale, "generic")]
            items.append(entry)
            impressions.append(
                impression_event(
                    request,
                    recommendation_id,
                    slot,
                    item_id,
                    position,
                    score,
                    ranked.propensities[position],
                    rank.now,
                    rank.experiment,
                    rank=ranked.ranks[position] if ranked.ranks is not None else None,
                    pool=ranked.pool,
                    shared=shared,
                )
            )
        slot_out: dict[str, Any] = {"name": slot.name, "kind": slot.kind.value, "items": items}
        if slot.strategy != "personal":
            slot_out["strategy"] = slot.strategy
        if ranked.unknown is not None:
            slot_out["unknown_candidates"] = ranked.unknown
        return slot_out, impressions

    def _record(
        self,
        request: RecommendRequest,
        rank: RankContext,
        slots_out: list[dict[str, Any]],
        impressions: list[Event | dict[str, Any]],
        recommendation_id: str,
        strategy: str,
        fallback_reason: str | None,
        started: float,
    ) -> None:
        """Metrics, the experiment exposure and the impression log of one answer."""
        if fallback_reason:
            FALLBACKS.labels(fallback_reason).inc()
        fallback = fallback_reason is not None
        RECOMMENDATIONS.labels(strategy, str(fallback).lower()).inc()
        experiment = rank.experiment
        if experiment is not None:
            shown_items = {s["name"]: (s["kind"], [it["item_id"] for it in s["items"]]) for s in slots_out}
            self.experiments.record_exposure(  # type: ignore[union-attr]
                request.visitor_id,
                experiment[0],
                experiment[1],
                shown_items,
                rank.persona,
                recommendation_id,
                rank.now,
                time.perf_counter() - started,
                covariates=exposure_covariates(rank.visitor.row if rank.visitor.known else None),
            )
        if self.settings.log_impressions and impressions and not fallback:
            record = {
                "visitor_id": request.visitor_id,
                "ts": rank.now,
                "experiment": experiment[0] if experiment else None,
                "arm": experiment[1] if experiment else None,
                "slots": {s["name"]: [it["item_id"] for it in s["items"]] for s in slots_out},
                "persona": rank.persona,
            }
            if not self.repository.log_events_async(
                impressions, (recommendation_id, record, self.settings.recommendation_ttl_s)
            ):
                IMPRESSIONS_DROPPED.inc()

    def _analytics_allowed(self, visitor_id: str, stored: StoredVisitor) -> bool:
        """Whether experiment exposures and outcomes may be tracked for the visitor (the `analytics` purpose).
        If the store cannot answer, no: the visitor is then served outside the experiment."""
        if not stored.available:
            return False
        if stored.consent is not None:
            return stored.consent.allows("analytics", self.consent_defaults)
        try:
            return self.repository.consent(visitor_id).allows("analytics", self.consent_defaults)
        except Exception as exc:
            log.debug("consent unavailable: %s", type(exc).__name__)
            return False

    @property
    def generator(self) -> CandidateGenerator:
        return self.pipeline.generator

    def rank_slot(self, slot: SlotRequest, rank: RankContext, shown: set[str]) -> Ranked:
        """One slot through the serving pipeline (offline evaluation measures exactly this)."""
        return self.pipeline.rank_slot(slot, rank, shown)

    def similar_items(self, item_id: str, strategy: Strategy, limit: int) -> dict[str, Any]:
        """GET /v1/items/{item_id}/similar: the item's neighbours among available products, the same for every
        visitor (no personal data is read, nothing is logged)."""
        snapshot = self.snapshot
        row = snapshot.index.get(item_id)
        if row is None:
            raise NotFound(f"unknown item {item_id!r}")
        found = neighbours(snapshot, [row], strategy, eligible_products(snapshot, Filters()), limit)
        items = [
            item_card(snapshot, i, position, score)
            for position, (i, score) in enumerate(zip(found.idx.tolist(), found.scores.tolist(), strict=True))
        ]
        return {"item_id": item_id, "strategy": strategy, "items": items}
