"""Recommend service logic: the item cache refresher, model loading/hot reload and the ranking pipeline
candidates -> features -> LightGBM -> rules -> experiment tag -> impression log, with an explicit fallback."""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from services.common.catalog import ItemKind
from services.common.clock import SYSTEM_CLOCK, Clock, TimePolicy, wall_time
from services.common.consent import ConsentDefaults
from services.common.context import context_features, daypart, local_time, zone_for
from services.common.events import Event
from services.common.features import visitor_row_at
from services.recommend.candidates import (
    CandidateGenerator,
    CandidateSet,
    Filters,
    VisitorVector,
    context_keys_for,
)
from services.recommend.catalog_cache import (
    KIND_CODES,
    CatalogArrays,
    ItemColumns,
    ItemSnapshot,
    build_snapshot,
    catalog_arrays,
)
from services.recommend.exploration import exploration_for, explore
from services.recommend.item_embeddings import ItemEmbeddings
from services.recommend.ranker import (
    IncompatibleModel,
    RankerModel,
    explain_item,
    feature_matrix,
    targeting_match,
    verify_model_text,
)
from services.recommend.repository import RecommendRepository
from services.recommend.rules import RuleContext, apply_rules, targeting_allows
from services.recommend.schemas import RecommendRequest, SlotRequest
from services.recommend.settings import RecommendSettings

log = logging.getLogger(__name__)

RECOMMENDATIONS = Counter(
    "selaras_recommendations_total", "Recommendation responses by strategy", ["strategy", "fallback"]
)
FALLBACKS = Counter("selaras_recommend_fallback_total", "Responses served by the fallback, by reason", ["reason"])
STAGE_SECONDS = Histogram(
    "selaras_recommend_stage_seconds",
    "Time per ranking stage",
    ["stage"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1),
)
# Label children resolved once: `.labels()` on every request is measurable on the hot path.
STAGE_VISITOR, STAGE_CANDIDATES, STAGE_FEATURES, STAGE_PREDICT, STAGE_RULES = (
    STAGE_SECONDS.labels(stage) for stage in ("visitor", "candidates", "features", "predict", "rules")
)
MODEL_INFO = Gauge("selaras_model_loaded_timestamp_seconds", "When the serving model was trained", ["version"])
CACHE_AGE = Gauge("selaras_item_cache_built_timestamp_seconds", "When the in-process item cache was built")
CACHE_ITEMS = Gauge("selaras_item_cache_items", "Items in the in-process cache")
IMPRESSIONS_DROPPED = Counter("selaras_impressions_dropped_total", "Impression batches dropped (queue full)")
EXPLAIN_LIMIT = 3


# The only explanation a browser-scoped key gets: it says nothing about the visitor.
GENERIC_REASON = "recommended for this page"


class ArmChooser(Protocol):
    """Experiments: which arm serves this visitor (None = no experiment covers the request)."""

    def assign_recommend(
        self, visitor_id: str, slot_kinds: Sequence[str], now: float
    ) -> tuple[str, str, bool] | None: ...

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
    ) -> None:
        """`shown` maps each slot name to (slot kind, item ids shown); `now` is the request time."""


@dataclass
class Ranked:
    idx: list[int]
    scores: list[float]
    reasons: list[list[str]] | None
    propensities: list[float]
    # With exploration: each item's rank in the deterministic eligible list, and that list's length.
    ranks: list[int] | None = None
    pool: int | None = None
    candidates: np.ndarray | None = None  # the generators' rows before scoring (offline candidate recall)


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
        self.generator = CandidateGenerator(settings.max_candidates, sources=settings.candidate_sources)
        self.snapshot: ItemSnapshot = build_snapshot([], {}, {}, {}, now=clock.now())
        self.model: RankerModel | None = None
        self.skipped_models: dict[str, str] = {}
        self.persona_names: dict[int, str] = {}
        self._catalog: CatalogArrays | None = None
        self._catalog_version: bytes | None = None
        self._product_ids: list[str] = []
        self._item_stats: dict[str, dict[str, Any]] = {}
        self._stats_read_at: float | None = None
        self._stats_full_read_at = 0.0
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        self._reload_lock = threading.Lock()
        self._exploration_rng = np.random.default_rng(settings.exploration_seed)

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        try:
            self.refresh_cache()
        except Exception as exc:  # the store may be down at start: serve empty and keep trying
            log.warning("item cache not built at start: %s", type(exc).__name__)
        try:
            self.reload_model()
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

    def reload_model(self, version: str | None = None) -> tuple[str | None, str | None]:
        """Load the given or newest compatible model; the swap is atomic, in-flight requests finish on the old."""
        with self._reload_lock:
            previous = self.model.meta.version if self.model else None
            for meta in self.repository.model_versions():
                if version and meta.version != version:
                    continue
                text = self.repository.model_text(meta.version)
                if text is None:
                    continue
                try:
                    verify_model_text(text, self.repository.model_digest(meta.version))
                    model = RankerModel.from_bytes(text, meta, self.settings.data_dir / "compiled-models")
                    embeddings = self.repository.model_embeddings(meta.version)
                    model.embeddings = ItemEmbeddings.from_bytes(embeddings) if embeddings else None
                except IncompatibleModel as exc:
                    self.skipped_models[meta.version] = str(exc)
                    log.warning("skipping incompatible model: %s", exc)
                    continue
                except Exception as exc:  # damaged (CorruptModel) or unparsable: the next newest may be whole
                    self.skipped_models[meta.version] = f"unreadable: {exc}"
                    log.warning("skipping unreadable model %s: %s", meta.version, exc)
                    continue
                self.model = model
                if previous:
                    MODEL_INFO.remove(previous) if previous != meta.version else None
                MODEL_INFO.labels(meta.version).set(meta.created_at)
                return meta.version, previous
            return previous, previous

    # -- ranking ------------------------------------------------------------------------------------
    def recommend(
        self, request: RecommendRequest, caller_may_set_time: bool = True, personal_reasons: bool = True
    ) -> dict[str, Any]:
        """Rank every slot. `caller_may_set_time`: whether `context.now` is honoured (the HTTP endpoint passes
        False for non-admin keys; see `TimePolicy`); the answer says which time was used. `personal_reasons`:
        whether `explain` may say what the visitor did ("still in your cart"); a browser key gets only
        `GENERIC_REASON` (anyone holding the public key could otherwise read a visitor's behaviour)."""
        started = time.perf_counter()
        recommendation_id = uuid.uuid4().hex
        ctx = request.context
        used = self.time_policy.resolve(ctx.now, caller_may_set_time)
        now = used.ts
        snapshot, model = self.snapshot, self.model
        fallback_reason: str | None = None

        stage = time.perf_counter()
        visitor = VisitorVector(request.visitor_id, False, {})
        personalization_allowed = True
        try:
            # With an opt-out default, a visitor row exists only while personalization is allowed (the profile
            # service keeps no profile without consent and deletes it on withdrawal), so a known row answers the
            # consent question without a second Redis round trip. With opt-in, consent is always read.
            row = None
            if self.consent_defaults.personalization == "opt_out":
                row = self.repository.visitor_row(request.visitor_id)
            if row is None:
                consent = self.repository.consent(request.visitor_id)
                personalization_allowed = consent.allows("personalization", self.consent_defaults)
                if personalization_allowed and self.consent_defaults.personalization == "opt_in":
                    row = self.repository.visitor_row(request.visitor_id)
            if personalization_allowed:
                visitor = VisitorVector.from_row(request.visitor_id, visitor_row_at(row, now) if row else row)
        except Exception as exc:  # store or Feast down: answer from the in-process caches
            fallback_reason = "store_unavailable"
            log.debug("visitor row unavailable: %s", type(exc).__name__)
        STAGE_VISITOR.observe(time.perf_counter() - stage)
        if model is None and fallback_reason is None:
            fallback_reason = "no_model"

        experiment = None
        personalized = True
        if self.experiments is not None:
            experiment = self.experiments.assign_recommend(
                request.visitor_id, [s.kind.value for s in request.slots], now
            )
            if experiment is not None and not self._analytics_allowed(request.visitor_id):
                experiment = None  # no exposure (and so no outcome) is tracked without `analytics` consent
            if experiment is not None:
                personalized = experiment[2]
        use_model = (
            personalized and personalization_allowed and visitor.known and model is not None and fallback_reason is None
        )
        if not personalization_allowed:
            strategy = "generic_no_consent"
        elif not personalized:
            strategy = "generic_control"
        elif use_model:
            strategy = "personalized"
        else:
            strategy = "popular_in_context"

        city = ctx.city or visitor.city
        offset = ctx.utc_offset_min
        context = context_features(now, offset, ctx.device.value if ctx.device else None, ctx.channel, city)
        keys = context_keys_for(city, ctx.device.value if ctx.device else None, now, offset)
        rule_ctx = RuleContext(
            context["hour"], ctx.device.value if ctx.device else None, city, bool(context["is_payday_window"])
        )
        context_label = self._context_label(city, now, offset)
        persona_id = visitor.row.get("persona_id") if visitor.known else None
        persona = self.persona_names.get(int(persona_id)) if isinstance(persona_id, int) else None

        shown: set[str] = set()
        slots_out: list[dict[str, Any]] = []
        impressions: list[Event | dict[str, Any]] = []
        for slot in request.slots:
            ranked = self._rank_slot(
                slot,
                snapshot,
                model if use_model else None,
                visitor,
                context,
                keys,
                rule_ctx,
                now,
                shown,
                request.explain and personal_reasons,
                context_label,
                persona,
            )
            items = []
            for position, (i, score) in enumerate(zip(ranked.idx, ranked.scores, strict=True)):
                item_id = snapshot.ids[i]
                shown.add(item_id)
                entry: dict[str, Any] = {
                    "item_id": item_id,
                    "position": position,
                    "score": round(score, 6),
                    "title": snapshot.titles[i],
                    "category": snapshot.categories[i],
                    "brand": snapshot.brands[i],
                    "price": None if math.isnan(snapshot.price[i]) else float(snapshot.price[i]),
                    "url": snapshot.urls[i],
                    "image_url": snapshot.image_urls[i],
                    "propensity": ranked.propensities[position],
                }
                if ranked.reasons is not None:
                    entry["reasons"] = ranked.reasons[position]
                elif request.explain:
                    entry["reasons"] = [GENERIC_REASON]
                items.append(entry)
                impressions.append(
                    self._impression(
                        request,
                        recommendation_id,
                        slot,
                        item_id,
                        position,
                        score,
                        ranked.propensities[position],
                        now,
                        experiment,
                        rank=ranked.ranks[position] if ranked.ranks is not None else None,
                        pool=ranked.pool,
                    )
                )
            slots_out.append({"name": slot.name, "kind": slot.kind.value, "items": items})

        if fallback_reason:
            FALLBACKS.labels(fallback_reason).inc()
        fallback = fallback_reason is not None
        RECOMMENDATIONS.labels(strategy, str(fallback).lower()).inc()
        if experiment is not None:
            shown_items = {s["name"]: (s["kind"], [it["item_id"] for it in s["items"]]) for s in slots_out}
            self.experiments.record_exposure(  # type: ignore[union-attr]
                request.visitor_id,
                experiment[0],
                experiment[1],
                shown_items,
                persona,
                recommendation_id,
                now,
                time.perf_counter() - started,
            )
        if self.settings.log_impressions and impressions and not fallback:
            record = {
                "visitor_id": request.visitor_id,
                "ts": now,
                "experiment": experiment[0] if experiment else None,
                "arm": experiment[1] if experiment else None,
                "slots": {s["name"]: [it["item_id"] for it in s["items"]] for s in slots_out},
                "persona": persona,
            }
            if not self.repository.log_events_async(
                impressions, (recommendation_id, record, self.settings.recommendation_ttl_s)
            ):
                IMPRESSIONS_DROPPED.inc()
        return {
            "recommendation_id": recommendation_id,
            "visitor_id": request.visitor_id,
            "model_version": model.meta.version if model and use_model else (model.meta.version if model else None),
            "fallback": fallback,
            "strategy": strategy,
            "experiment": {"key": experiment[0], "arm": experiment[1]} if experiment else None,
            "took_ms": round((time.perf_counter() - started) * 1000, 3),
            "time": used.to_dict(),
            "slots": slots_out,
        }

    def _analytics_allowed(self, visitor_id: str) -> bool:
        """Whether experiment exposures and outcomes may be tracked for the visitor (the `analytics` purpose).
        If the store cannot answer, no: the visitor is then served outside the experiment."""
        try:
            return self.repository.consent(visitor_id).allows("analytics", self.consent_defaults)
        except Exception as exc:
            log.debug("consent unavailable: %s", type(exc).__name__)
            return False

    def _rank_slot(
        self,
        slot: SlotRequest,
        snapshot: ItemSnapshot,
        model: RankerModel | None,
        visitor: VisitorVector,
        context: dict[str, int],
        keys: list[str],
        rule_ctx: RuleContext,
        now: float,
        shown: set[str],
        explain: bool,
        context_label: str,
        persona: str | None,
    ) -> Ranked:
        filters = Filters(
            categories=frozenset(slot.filters.categories),
            brands=frozenset(slot.filters.brands),
            min_price=slot.filters.min_price,
            max_price=slot.filters.max_price,
            exclude=frozenset(slot.filters.exclude_items),
        )
        stage = time.perf_counter()
        if slot.kind is ItemKind.PRODUCT:
            embeddings = model.embeddings if model else None
            candidates = self.generator.products(
                snapshot, visitor, keys, filters, personalized=model is not None, embeddings=embeddings
            )
        else:
            candidates = self.generator.creatives(snapshot, slot.kind, filters)
            allowed = np.array(
                [targeting_allows(snapshot.targeting.get(int(i)), rule_ctx) for i in candidates.idx],
                dtype=bool,
            )
            candidates = CandidateSet(
                candidates.idx[allowed] if len(allowed) else candidates.idx,
                candidates.covisitation[allowed] if len(allowed) else candidates.covisitation,
                [s for s, a in zip(candidates.sources, allowed, strict=True) if a],
                {name: values[allowed] for name, values in candidates.signals.items()} if len(allowed) else {},
            )
        STAGE_CANDIDATES.observe(time.perf_counter() - stage)

        X = None
        if model is not None and len(candidates.idx):
            stage = time.perf_counter()
            columns = snapshot.columns(candidates.idx, slot.name, now)
            if self.settings.naive_item_features:
                columns = self._naive_columns(snapshot, candidates.idx, slot.name, now)
            targeting = np.array(
                [targeting_match(snapshot.targeting.get(int(i)), visitor, persona) for i in candidates.idx]
                if slot.kind is not ItemKind.PRODUCT
                else np.full(len(candidates.idx), 0.5)
            )
            X = feature_matrix(visitor, context, columns, candidates.signals, targeting, now)
            STAGE_FEATURES.observe(time.perf_counter() - stage)
            stage = time.perf_counter()
            scores = model.predict(X)
            STAGE_PREDICT.observe(time.perf_counter() - stage)
        else:
            scores = self._popularity_scores(snapshot, candidates.idx, keys)

        stage = time.perf_counter()
        exploration = exploration_for(self.settings.exploration, slot.name, slot.kind.value)
        chosen = apply_rules(
            snapshot,
            candidates.idx,
            scores,
            # Exploring chooses among every rule-eligible item, so the rules see the whole ranked list.
            len(candidates.idx) if exploration.active else slot.count,
            shown,
            just_bought=visitor.purchased_items if slot.kind is ItemKind.PRODUCT else (),
            max_per_category=(slot.max_per_category or self.settings.max_per_category)
            if slot.kind is ItemKind.PRODUCT
            else None,
            max_pinned=self.settings.max_pinned_per_slot,
        )
        STAGE_RULES.observe(time.perf_counter() - stage)
        propensities = [1.0] * min(len(chosen), slot.count)
        ranks: list[int] | None = None
        pool: int | None = None
        if exploration.active:
            pinned = 0  # merchandiser pins keep their places; exploration starts after them
            while pinned < len(chosen) and snapshot.pinned[chosen[pinned][0]]:
                pinned += 1
            placement = explore(
                np.array([s for _, s in chosen]), slot.count, exploration, self._exploration_rng, pinned
            )
            chosen = [chosen[int(r)] for r in placement.order]
            propensities = placement.propensities.tolist()
            ranks, pool = placement.order.tolist(), placement.pool
        idx = [i for i, _ in chosen]
        reasons = None
        if explain:
            reasons = self._explain(snapshot, model, X, candidates, idx, visitor, context_label)
        return Ranked(idx, [s for _, s in chosen], reasons, propensities, ranks, pool, candidates.idx)

    def _naive_columns(self, snapshot: ItemSnapshot, idx: np.ndarray, slot: str, now: float) -> ItemColumns:
        """The baseline the benchmark compares against: candidate item features fetched through the Feast SDK
        on every request (what ARCHITECTURE.md measured at 130-150 ms p99), instead of the in-process cache."""
        ids = [snapshot.ids[i] for i in idx]
        rows = self.repository.item_stats_via_sdk(ids)
        fresh = build_snapshot(
            snapshot, {i: rows[i] for i in ids if i in rows}, {}, {}, now=now, cache_neighbours=False
        )
        return fresh.columns(idx, slot, now)

    @staticmethod
    def _popularity_scores(snapshot: ItemSnapshot, idx: np.ndarray, keys: list[str]) -> np.ndarray:
        """Generic ranking: popularity in the most specific context, then overall popularity."""
        scores = np.zeros(len(idx), dtype=np.float64)
        if len(idx) == 0:
            return scores
        order = np.argsort(idx)
        sorted_idx = idx[order]
        weight = 1.0
        for key in keys:
            entry = snapshot.popularity.get(key)
            if entry is not None and len(entry[0]):
                rows, values = entry
                position = np.clip(np.searchsorted(sorted_idx, rows), 0, len(sorted_idx) - 1)
                hit = sorted_idx[position] == rows
                top = values.max() or 1.0
                np.add.at(scores, order[position[hit]], weight * values[hit] / top)
            weight *= 0.5
        views = np.nan_to_num(snapshot.stats["views_7d"][idx], nan=0.0)
        return scores + 1e-3 * np.log1p(views)

    def _explain(
        self,
        snapshot: ItemSnapshot,
        model: RankerModel | None,
        X: np.ndarray | None,
        candidates: CandidateSet,
        chosen: list[int],
        visitor: VisitorVector,
        context_label: str,
    ) -> list[list[str]]:
        row_of = {int(i): r for r, i in enumerate(candidates.idx)}
        recent_titles = [snapshot.titles[snapshot.index[i]] for i in visitor.recent_items[:3] if i in snapshot.index]
        recent_categories = [
            snapshot.categories[snapshot.index[i]] for i in visitor.recent_items if i in snapshot.index
        ]
        if model is not None and X is not None and chosen:
            rows = [row_of[i] for i in chosen]
            contributions = model.contributions(X[rows])
            return [
                explain_item(
                    contributions[k],
                    X[r],
                    snapshot.titles[i],
                    snapshot.categories[i],
                    snapshot.brands[i],
                    visitor,
                    recent_categories.count(snapshot.categories[i]),
                    recent_titles,
                    context_label,
                    candidates.sources[r],
                    EXPLAIN_LIMIT,
                )
                for k, (i, r) in enumerate(zip(chosen, rows, strict=True))
            ]
        return [[f"popular {context_label}"] for _ in chosen]

    @staticmethod
    def _context_label(city: str | None, now: float, offset: int | None) -> str:
        part = daypart(local_time(now, zone_for(city, offset)).hour)
        when = {
            "morning": "this morning",
            "midday": "at lunchtime",
            "afternoon": "this afternoon",
            "evening": "this evening",
            "night": "tonight",
        }[part]
        return f"in {city} {when}" if city else when

    @staticmethod
    def _impression(
        request: RecommendRequest,
        recommendation_id: str,
        slot: SlotRequest,
        item_id: str,
        position: int,
        score: float,
        propensity: float,
        now: float,
        experiment: tuple[str, str, bool] | None,
        rank: int | None = None,
        pool: int | None = None,
    ) -> dict[str, Any]:
        """The impression event as its JSON dict (the log's schema): built for every shown item, so plain dicts
        rather than validated models; the writer thread serialises them."""
        ctx = request.context
        properties: dict[str, Any] = {
            "slot": slot.name,
            "slot_kind": slot.kind.value,
            "position": position,
            "score": round(score, 6),
            "propensity": propensity,
        }
        if rank is not None and pool is not None:
            # Off-policy evaluation of other rankings of the same pool needs both (services/recommend/policy_eval.py).
            properties["rank"], properties["pool"] = rank, pool
        if experiment:
            properties["experiment"], properties["arm"] = experiment[0], experiment[1]
        context = {
            name: value
            for name, value in (
                ("device", ctx.device.value if ctx.device else None),
                ("channel", ctx.channel),
                ("city", ctx.city),
                ("locale", ctx.locale),
            )
            if value is not None
        }
        return {
            "event_id": f"imp:{recommendation_id}:{slot.name}:{position}",
            "visitor_id": request.visitor_id,
            "type": "impression",
            "timestamp": datetime.fromtimestamp(now, tz=UTC).isoformat(),
            "item_id": item_id,
            "recommendation_id": recommendation_id,
            "context": context,
            "properties": properties,
        }
