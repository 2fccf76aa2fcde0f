"""The next-best-message decision, for one request or a batch.

One decision per (visitor, channel): consent -> experiment -> send slot (quiet hours, `timing`) -> frequency
caps (`history`) -> eligible messages (trigger rules on the visitor's features, `eligibility`) -> cooldowns ->
the uplift model (one vectorised predict for a whole batch, `model`) -> control group / exploration
(`policy`) -> render in the visitor's locale and tone (`render`).

Recording: the answer is the send. Unless the request says `dry_run`, Selaras records the send in the
visitor's send history (caps and cooldowns) before answering, and logs the decision as a `message_sent`
event (event id `msg:<recommendation_id>`, so a CRM that posts the same event again is deduplicated) with its
propensity and candidates. Decisions that send nothing on purpose (control group, no expected uplift,
exploration) are logged too, as `message_sent` with `item_id` "none" and `properties.action` "none": they
are the comparison that uplift training and offline evaluation need; no message goes out for them.
Caps are checked against the recorded history, including earlier decisions of the same batch, and a send is
checked and recorded in one compare-and-set on the stored history (`MessageRepository.record_send`): of
concurrent requests for one visitor, only as many send as the caps and cooldowns allow, in any process.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from prometheus_client import Counter, Histogram

from services.common.clock import SYSTEM_CLOCK, Clock, TimePolicy
from services.common.consent import ConsentDefaults
from services.experiments.assignment import HOLDOUT_ARM
from services.experiments.config import ArmChoice
from services.experiments.covariates import exposure_covariates
from services.experiments.targeting import targeting_context
from services.features.item_cache import ItemSnapshot
from services.features.schema import visitor_row_at
from services.messages.decision_log import DecisionEntry, encode_candidates, next_id
from services.messages.eligibility import Candidate, Eligibility, StockWatch, explain
from services.messages.history import WEEK, SendHistory
from services.messages.model import (
    ACTION_COLUMNS,
    MessageModel,
    VisitorView,
    action_vector,
    decision_vector,
)
from services.messages.policy import choose, uniforms
from services.messages.render import deep_link, render, tokens_for, tone_for
from services.messages.repository import MessageRepository
from services.messages.schemas import MessageRequest, none_answer
from services.messages.settings import PURPOSE, MessageSettings
from services.messages.templates import MessageCatalog, Template
from services.messages.timing import open_hours, plan_send

log = logging.getLogger(__name__)

DECISIONS = Counter(
    "selaras_nbm_decisions_total",
    "Next-best-message answers by channel, action and reason",
    ["channel", "action", "reason"],
)
SENDS = Counter("selaras_nbm_sends_total", "Messages chosen to be sent, by channel and trigger", ["channel", "trigger"])
BATCH_SECONDS = Histogram(
    "selaras_nbm_decide_seconds",
    "Time to decide one request or batch",
    ["kind"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
DECISIONS_DROPPED = Counter("selaras_nbm_log_dropped_total", "Decision log entries dropped (queue full)")


@dataclass
class _Planned:
    index: int
    request: MessageRequest
    view: VisitorView
    now: float
    send_at: datetime
    send_ts: float
    candidates: list[Candidate]
    history: SendHistory
    experiment: tuple[str, str] | None
    personalized: bool = True  # False: the experiment arm gets the rules baseline, not the uplift model
    first: int = 0  # first candidate row in the batch matrices
    row: int = 0  # row of the decision in the batch's visitor matrix


class MessageService:
    """Decides next-best messages for one visitor or a batch, on the recommend service's item snapshot."""

    def __init__(
        self,
        repository: MessageRepository,
        snapshot_source: Callable[[], ItemSnapshot],
        settings: MessageSettings | None = None,
        consent_defaults: ConsentDefaults | None = None,
        experiments: Any = None,
        recommendation_ttl_s: int = 7 * 86_400,
        clock: Clock = SYSTEM_CLOCK,
        simulation: bool = False,
    ):
        self.repository = repository
        self.clock = clock
        self.time_policy = TimePolicy(clock, simulation)
        self.snapshot_source = snapshot_source
        self.settings = settings or MessageSettings()
        self.consent_defaults = consent_defaults or ConsentDefaults()
        self.experiments = experiments
        self.recommendation_ttl_s = recommendation_ttl_s
        self.watch = StockWatch(repository)
        self._catalog: MessageCatalog | None = None
        self._model: MessageModel | None = None
        self._model_checked = -math.inf
        self._personas: dict[int, dict[str, Any]] = {}
        self._personas_checked = -math.inf
        self._lock = threading.Lock()

    # -- cached inputs --------------------------------------------------------------------------------
    def catalog(self, now: float) -> MessageCatalog:
        """The message catalog of the current item snapshot; `now` stamps restocks the watch notices."""
        snapshot = self.snapshot_source()
        catalog = self._catalog
        if catalog is None or catalog.snapshot is not snapshot:
            catalog = MessageCatalog.build(snapshot, self.settings.min_discount)
            self._catalog = catalog
        self.watch.observe(snapshot, now, self.settings.restock_days * 86_400.0)
        return catalog

    @property
    def model(self) -> MessageModel | None:
        """The newest message model, re-checked every `model_check_interval_s` (one small read)."""
        now = time.monotonic()
        if now - self._model_checked >= self.settings.model_check_interval_s:
            with self._lock:
                if now - self._model_checked >= self.settings.model_check_interval_s:
                    self._model_checked = now
                    self._reload_model()
        return self._model

    def follow_model_registry(self) -> None:
        """Check the model registry now (after a pin on this replica) instead of at the next interval."""
        with self._lock:
            self._model_checked = time.monotonic()
            self._reload_model()

    def _reload_model(self) -> None:
        """Serve what the model registry says (the pinned version, else the newest that loads)."""
        try:
            index = self.repository.model_index()
            for version in index.load_order():
                if self._model is not None and self._model.version == version:
                    return
                try:
                    blob = self.repository.model_blob(version, index)
                    if blob is None:
                        continue
                    self._model = MessageModel.from_bytes(blob)
                    log.info("message model %s loaded", version)
                    return
                except Exception as exc:  # incompatible or damaged: the one before may load
                    log.warning("message model %s skipped: %s", version, exc)
        except Exception as exc:  # keep the current model when the store hiccups
            log.warning("message model not reloaded: %s", type(exc).__name__)

    def use_model(self, model: MessageModel | None) -> None:
        """Serve this model (tests, simulations); the store is still checked for newer ones later."""
        self._model = model
        self._model_checked = time.monotonic()

    def personas(self) -> dict[int, dict[str, Any]]:
        now = time.monotonic()
        if now - self._personas_checked >= 60.0:
            self._personas_checked = now
            try:
                self._personas = self.repository.persona_profiles()
            except Exception as exc:
                log.warning("personas not loaded: %s", type(exc).__name__)
        return self._personas

    # -- deciding ------------------------------------------------------------------------------------
    def decide(self, request: MessageRequest, caller_may_set_time: bool = True) -> dict[str, Any]:
        """One decision. `caller_may_set_time`: whether the request's `now` is honoured (the HTTP endpoints pass
        False for non-admin keys; see `TimePolicy`); the answer says which time was used."""
        started = time.perf_counter()
        result = self._decide([request], caller_may_set_time)[0]
        BATCH_SECONDS.labels("single").observe(time.perf_counter() - started)
        return result

    def decide_batch(
        self, requests: Sequence[MessageRequest], caller_may_set_time: bool = True
    ) -> list[dict[str, Any]]:
        started = time.perf_counter()
        results = self._decide(requests, caller_may_set_time)
        BATCH_SECONDS.labels("batch").observe(time.perf_counter() - started)
        return results

    def _decide(self, requests: Sequence[MessageRequest], caller_may_set_time: bool) -> list[dict[str, Any]]:
        settings = self.settings
        times = [self.time_policy.resolve(r.now, caller_may_set_time) for r in requests]
        # A restock is noticed "now"; for replays and simulations that is the earliest decision time asked.
        catalog = self.catalog(min(t.ts for t in times))
        eligibility = Eligibility(catalog, self.watch, settings)
        model = self.model
        personas = self.personas()
        visitor_ids = list(dict.fromkeys(r.visitor_id for r in requests))
        consents = dict(zip(visitor_ids, self.repository.consents(visitor_ids), strict=True))
        # Consent first (one cheap read): features and send histories only for visitors who may be messaged.
        consented = [
            r.visitor_id for r in requests if consents[r.visitor_id].allows(PURPOSE[r.channel], self.consent_defaults)
        ]
        reachable = list(dict.fromkeys(consented))
        rows = self.repository.visitor_rows(reachable)
        histories = {
            v: SendHistory.from_bytes(raw)
            for v, raw in zip(reachable, self.repository.histories(reachable), strict=True)
        }
        # Windows seen from the (first) decision time for each visitor, not from the visitor's latest event.
        decided: dict[str, float] = {}
        for request, used in zip(requests, times, strict=True):
            decided.setdefault(request.visitor_id, used.ts)
        # Traits of visitors without behaviour first: a customer known only from CRM traits is a known visitor.
        # The others' traits are read below for the planned decisions only (the state blob is not small).
        traits = self._traits_for([v for v, row in zip(reachable, rows, strict=True) if row is None])
        views = {
            v: VisitorView.from_row(v, visitor_row_at(row, decided[v]) if row else row, traits.get(v))
            for v, row in zip(reachable, rows, strict=True)
        }

        allowed_hours = open_hours(settings)
        results: list[dict[str, Any] | None] = [None] * len(requests)
        planned: list[_Planned] = []
        for i, request in enumerate(requests):
            now = times[i].ts
            channel = request.channel
            if not consents[request.visitor_id].allows(PURPOSE[channel], self.consent_defaults):
                results[i] = none_answer(request, "no_consent", f"no consent for {PURPOSE[channel]}")
                continue
            view = views[request.visitor_id]
            experiment = self._experiment(request, now, view, personas)
            if experiment is not None and experiment[1] == HOLDOUT_ARM:
                detail = "the experiments' global holdout gets no marketing messages"
                results[i] = none_answer(request, "experiment_holdout", detail, experiment)
                continue
            tag = (experiment[0], experiment[1]) if experiment else None
            personalized = experiment[2] if experiment else True
            if not view.known:
                results[i] = none_answer(
                    request, "unknown_visitor", "no behaviour or traits recorded for this visitor", tag
                )
                continue
            send_at = plan_send(now, view.zone, view.histogram, settings, allowed_hours)
            if send_at is None:
                results[i] = none_answer(
                    request, "quiet_hours", "quiet hours until tomorrow in the visitor's time zone", tag
                )
                continue
            history = histories[request.visitor_id]
            cap = history.cap_reached(channel, send_at, settings)
            if cap is not None:
                results[i] = none_answer(request, "frequency_cap", f"{cap} cap reached", tag)
                continue
            candidates = eligibility.candidates(view, channel, now, send_at)
            if not candidates:
                results[i] = none_answer(request, "no_eligible_message", "no trigger applies to this visitor now", tag)
                continue
            send_ts = send_at.timestamp()
            candidates = [c for c in candidates if not history.cooling(c.template, send_ts)]
            if not candidates:
                results[i] = none_answer(request, "cooldown", "every eligible message is cooling down", tag)
                continue
            planned.append(_Planned(i, request, view, now, send_at, send_ts, candidates, history, tag, personalized))

        if planned:
            # Traits are model features (declared ones) and rendering tokens (first name).
            unread = [v for v in dict.fromkeys(p.request.visitor_id for p in planned) if v not in traits]
            traits.update(self._traits_for(unread))
            for p in planned:
                p.view.traits = traits.get(p.request.visitor_id, {})
            uplift, attributed, baseline = self._score(planned, catalog.snapshot, model)
            for p in planned:
                results[p.index] = self._choose(p, uplift, attributed, baseline, model, catalog, traits, personas)

        for result, used in zip(results, times, strict=True):
            if result is not None:
                result["time"] = used.to_dict()
        out = [r for r in results if r is not None]
        for result in out:
            DECISIONS.labels(result["channel"], result["action"], result.get("reason") or "send").inc()
        return out

    def _experiment(
        self, request: MessageRequest, now: float, view: VisitorView, personas: Mapping[int, Mapping[str, Any]]
    ) -> ArmChoice | None:
        """(experiment key, arm, personalized) covering this decision, when the experiments runtime assigns
        messages. The holdout arm gets nothing; a non-personalized arm gets the rules baseline."""
        assign = getattr(self.experiments, "assign_message", None)
        if assign is None:
            return None
        try:
            if getattr(self.experiments, "targets_messages", False):
                # Only a targeted message experiment needs the visitor's segments (experiments/targeting.py).
                persona = personas.get(view.persona_id)
                context = targeting_context(
                    device=None,
                    channel=request.channel,
                    city=None,
                    row=dict(view.row) if view.known else None,
                    persona=str(persona.get("name_en")) if persona else None,
                    now=now,
                )
                assigned = assign(request.visitor_id, request.channel, now, context=context)
            else:
                assigned = assign(request.visitor_id, request.channel, now)
        except Exception as exc:  # experiments must never take messages down
            log.warning("message experiment assignment failed: %s", type(exc).__name__)
            return None
        if not assigned:
            return None
        key, arm = str(assigned[0]), str(assigned[1])
        allowed = bool(assigned[2]) if len(assigned) > 2 else True
        return ArmChoice(key, arm, allowed)

    def _score(
        self, planned: Sequence[_Planned], snapshot: ItemSnapshot, model: MessageModel | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One model call for the whole batch: uplift and P(message-driven purchase) per candidate row."""
        total = 0
        for k, p in enumerate(planned):
            p.first, p.row = total, k
            total += len(p.candidates)
        if model is None:
            return np.zeros(total), np.zeros(total), np.zeros(len(planned))
        V = np.empty((len(planned), len(model.visitor_columns)), dtype=np.float64)
        A = np.empty((total, len(ACTION_COLUMNS)), dtype=np.float64)
        owner = np.empty(total, dtype=np.int64)
        for k, p in enumerate(planned):
            V[k] = decision_vector(p.view, p.now, p.send_ts, p.request.channel, model.traits)
            for j, c in enumerate(p.candidates):
                A[p.first + j] = action_vector(
                    p.view, c.template.trigger, c.template.item_id, c.product, snapshot, p.now
                )
                owner[p.first + j] = k
        uplift, attributed, baseline = model.uplift(V, A, owner)
        return uplift, attributed, baseline

    def _traits_for(self, visitor_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        if not visitor_ids:
            return {}
        try:
            return dict(zip(visitor_ids, self.repository.visitor_traits(visitor_ids), strict=True))
        except Exception as exc:  # a nicety: the fallback greeting, behaviour-only features
            log.warning("visitor traits unavailable: %s", type(exc).__name__)
            return {}

    def _choose(
        self,
        p: _Planned,
        uplift: np.ndarray,
        attributed: np.ndarray,
        baseline: np.ndarray,
        model: MessageModel | None,
        catalog: MessageCatalog,
        traits: Mapping[str, Mapping[str, Any]],
        personas: Mapping[int, Mapping[str, Any]],
    ) -> dict[str, Any]:
        s = self.settings
        request, k = p.request, len(p.candidates)
        scores = uplift[p.first : p.first + k].tolist()
        draws = uniforms(s.salt, request.visitor_id, request.channel, p.send_at.date().isoformat())
        triggers = [c.template.trigger for c in p.candidates]
        choice = choose(scores, triggers, p.personalized, model is not None, s, draws)
        action, greedy, reason, propensity = choice.action, choice.greedy, choice.reason, choice.propensity
        # Earlier decisions of this batch may have used up a cap or started a cooldown for this visitor.
        if action > 0:
            cap = p.history.cap_reached(request.channel, p.send_at, s)
            if cap is not None:
                return none_answer(request, "frequency_cap", f"{cap} cap reached", p.experiment)
            if p.history.cooling(p.candidates[action - 1].template, p.send_ts):
                return none_answer(request, "cooldown", "every eligible message is cooling down", p.experiment)
        recommendation_id = next_id()
        snapshot = catalog.snapshot
        version = model.version if model else None
        ids = snapshot.ids
        # Only logged decisions need their candidates as text.
        candidates_text = (
            ""
            if request.dry_run
            else encode_candidates(
                (c.template.item_id, ids[c.product] if c.product >= 0 else None) for c in p.candidates
            )
        )
        if action == 0:
            detail = {
                "control_group": "random control group: measures what messages add over sending nothing",
                "no_expected_uplift": f"no message is expected to add over {s.min_uplift:.2%} purchase probability",
                "exploration": "exploration: sending nothing this time to keep the model's estimates honest",
            }[reason]
            result = none_answer(request, reason, detail, p.experiment, recommendation_id)
            result["model_version"] = version
            # When the message would have gone out: outcomes of "nothing sent" are measured from then.
            result["planned_send_at"] = p.send_at.isoformat()
            if request.explain:
                result["candidates"] = explain(p.candidates, scores, snapshot)
            if not request.dry_run:
                self._log(p, recommendation_id, propensity, choice.control, reason, candidates_text, version)
            return result

        chosen = p.candidates[action - 1]
        template = chosen.template
        product = chosen.product
        row_baseline = float(baseline[p.row]) if len(baseline) else 0.0
        persona = personas.get(p.view.persona_id) if p.view.persona_id >= 0 else None
        tone, tone_reason = tone_for(p.view, persona)
        locale = p.view.locale if p.view.locale in ("id", "en") else "id"
        visitor_traits = traits.get(request.visitor_id, {})
        tokens = tokens_for(p.view, chosen, visitor_traits, snapshot, locale, s.voucher_discount)
        title, body, used_locale, used_tone = render(template, locale, tone, tokens, request.channel)
        link = deep_link(template, tokens)
        score = float(scores[action - 1])
        zone_name = p.send_at.tzname() or "local"
        reasons = [
            chosen.reason,
            f"send at {p.send_at:%H:%M} {zone_name}: "
            + ("their most active hour left today" if p.view.histogram else "default hour (active hours unknown)"),
            f"{used_tone} tone: {tone_reason}",
        ]
        if model is not None:
            if model.learner == "funnel" or model.reward.binary:
                unit = "purchase probability" if model.learner == "funnel" else f"{model.reward.kind} probability"
                reasons.append(f"expected uplift {score:+.2%} {unit} (baseline {row_baseline:.1%})")
            else:
                unit = model.reward.describe()
                reasons.append(f"expected uplift {score:+,.4g} {unit} (baseline {row_baseline:,.4g})")
        if reason == "exploration" or action != greedy:
            reasons.append("exploration: a less certain message, to keep learning")
        if not request.dry_run:
            # The caps and the cooldown checked above were read at the start; this is the decisive check, on the
            # stored history in one compare-and-set: a concurrent decision for the visitor may have sent since.
            refused, stored = self.repository.record_send(
                request.visitor_id,
                lambda history: history.try_send(request.channel, p.send_at, template, s),
                p.now,
                catalog.max_cooldown_s + WEEK,
                int(max(catalog.max_cooldown_s, WEEK) + 86_400),
            )
            p.history.replace(stored)
            if refused == "cooldown":
                return none_answer(request, "cooldown", "every eligible message is cooling down", p.experiment)
            if refused is not None:
                return none_answer(request, "frequency_cap", f"{refused} cap reached", p.experiment)
            product_id = snapshot.ids[product] if product >= 0 else None
            self._log(
                p,
                recommendation_id,
                propensity,
                False,
                "send",
                candidates_text,
                version,
                template=template,
                product_id=product_id,
                tone=used_tone,
                score=score,
            )
            SENDS.labels(request.channel, template.trigger).inc()
            if p.experiment is not None:
                self._record_exposure(p, recommendation_id, template.item_id, persona)
        answer: dict[str, Any] = {
            "recommendation_id": recommendation_id,
            "visitor_id": request.visitor_id,
            "channel": request.channel,
            "action": "send",
            "message": {
                "item_id": template.item_id,
                "name": template.name,
                "trigger": template.trigger,
                "title": title,
                "body": body,
                "locale": used_locale,
                "tone": used_tone,
                "deep_link": link,
            },
            "product": catalog.product_card(product) if product >= 0 else None,
            "send_at": p.send_at.isoformat(),
            "reasons": reasons,
            "score": round(score, 6),
            "propensity": round(propensity, 6),
            "experiment": {"key": p.experiment[0], "arm": p.experiment[1]} if p.experiment else None,
            "model_version": version,
            "dry_run": request.dry_run,
        }
        if request.explain:
            answer["candidates"] = explain(p.candidates, scores, snapshot)
        return answer

    def _record_exposure(
        self, p: _Planned, recommendation_id: str, template_id: str, persona: Mapping[str, Any] | None
    ) -> None:
        """A message sent under an experiment arm: its opens, clicks and purchases count for the arm."""
        record = getattr(self.experiments, "record_message_exposure", None)
        if record is None or p.experiment is None:
            return
        try:
            record(
                p.request.visitor_id,
                p.experiment[0],
                p.experiment[1],
                p.request.channel,
                recommendation_id,
                now=p.now,
                persona=str(persona.get("name_en")) if persona else None,
                item_id=template_id,
                covariates=exposure_covariates(p.view.row if p.view.known else None),
            )
        except Exception as exc:  # experiments must never take messages down
            log.warning("message exposure not recorded: %s", type(exc).__name__)

    def _log(
        self,
        p: _Planned,
        recommendation_id: str,
        propensity: float,
        control: bool,
        reason: str,
        candidates: str,
        model_version: str | None,
        template: Template | None = None,
        product_id: str | None = None,
        tone: str = "",
        score: float = 0.0,
    ) -> None:
        """Log the decision (`message_sent` event and recommendation record); `template` None: nothing sent."""
        entry = DecisionEntry(
            recommendation_id=recommendation_id,
            visitor_id=p.request.visitor_id,
            channel=p.request.channel,
            city=str(p.view.row.get("city") or "") or None,
            decided_at=p.now,
            send_at=p.send_at,
            propensity=propensity,
            control=control,
            reason=reason,
            candidates=candidates,
            model_version=model_version,
            experiment=p.experiment,
            persona=p.view.persona_id if p.view.persona_id >= 0 else None,
            template_id=template.item_id if template else None,
            trigger=template.trigger if template else None,
            product_id=product_id,
            tone=tone,
            score=score,
        )
        if not self.repository.log_decision(
            entry.event(), recommendation_id, entry.record(), self.recommendation_ttl_s
        ):
            DECISIONS_DROPPED.inc()
