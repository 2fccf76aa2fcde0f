"""Replay of logged decisions: the event log folded into the training and evaluation data of the uplift model.

Visitor features at a decision are the visitor's row as of that moment. Training and offline evaluation
replay the events through the profile service's own pure aggregation code (`services.features.aggregations`),
the same code that writes the online rows the service reads, so serving and training see the same values.
Declared customer traits (`services/common/traits.py`) come from the same visitor state the service reads.

Every logged decision is checked: one that cannot be replayed faithfully (no `properties.action`, no
candidates, a propensity outside (0, 1], its message gone from the catalog) is left out and counted by
reason in `LoggedDecisions.excluded`, so the caller can say what was dropped instead of estimating on a
silently wrong log (a decision without `action` would otherwise read as "sent nothing").
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from services.common.catalog import CatalogItem, ItemKind
from services.common.consent import Consent, ConsentDefaults, consent_changes_from_properties
from services.common.events import Event, EventType
from services.common.traits import TraitSchema
from services.features.aggregations import (
    BEHAVIOUR_TYPES,
    ItemInfo,
    SegmentRules,
    VisitorState,
    fold_visitor,
    visitor_features,
)
from services.features.item_cache import ItemSnapshot, build_snapshot
from services.features.schema import as_number, visitor_row_at
from services.messages.decision_log import decode_candidates
from services.messages.model import ACTION_COLUMNS, VisitorView, action_vector, decision_vector, visitor_columns

# What counts as a visit to the shop (a reward of its own, services/messages/reward.py): the visitor's own
# behaviour, not what was shown to them or dismissed.
VISIT_TYPES: Final = BEHAVIOUR_TYPES - {EventType.DISMISS, EventType.IMPRESSION}

# Why a logged decision is left out, as the CLI reports it.
EXCLUSION_REASONS: Final = {
    "no_propensity": "message_sent without properties.propensity (not logged by a Selaras policy)",
    "no_recommendation_id": "without recommendation_id (outcomes cannot be joined)",
    "invalid_propensity": "properties.propensity not a number in (0, 1]",
    "no_action": "without properties.action (send or none)",
    "no_candidates": "without properties.candidates (the eligible messages)",
    "unknown_message": "the logged message is not in the catalog",
    "no_analytics_consent": "of visitors who refuse analytics (their behaviour is not used for training)",
}


@dataclass
class LoggedDecisions:
    """Decisions that had at least one eligible message, with their candidates and outcomes (arrays)."""

    visitor_ids: list[str]
    recommendation_ids: list[str]
    channels: list[str]
    send_at: np.ndarray
    V: np.ndarray  # decision x VISITOR_COLUMNS
    propensity: np.ndarray
    action: np.ndarray  # candidate row of the logged action, -1 = nothing sent
    control: np.ndarray  # bool: the random control group
    opened: np.ndarray
    clicked: np.ndarray
    attributed: np.ndarray  # a purchase echoing the decision's recommendation id
    converted: np.ndarray  # any purchase by the visitor within the outcome window after send_at
    cand_owner: np.ndarray  # candidate -> decision
    cand_template: list[str]
    cand_product: list[str | None]
    A: np.ndarray  # candidate x ACTION_COLUMNS
    window_h: float
    traits: TraitSchema = field(default_factory=TraitSchema)  # the trait columns at the end of V
    # Outcomes without opens or clicks, within the window after send_at: a visit, and the money spent.
    visited: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    revenue: np.ndarray = field(default_factory=lambda: np.zeros(0))
    excluded: dict[str, int] = field(default_factory=dict)  # left-out decisions by reason (EXCLUSION_REASONS)

    @property
    def size(self) -> int:
        return len(self.visitor_ids)

    def sent(self) -> np.ndarray:
        return self.action >= 0

    def without_visitors(self, refused: Collection[str], reason: str) -> LoggedDecisions:
        """These decisions without those of `refused` visitors, counted under `reason` in `excluded`."""
        keep = np.array([visitor not in refused for visitor in self.visitor_ids], dtype=bool)
        kept = self.subset(keep)
        dropped = int(self.size - keep.sum())
        if dropped:
            kept.excluded[reason] = kept.excluded.get(reason, 0) + dropped
        return kept

    def subset(self, mask: np.ndarray) -> LoggedDecisions:
        """Decisions where `mask` is true, with their candidates re-indexed."""
        keep = np.flatnonzero(mask)
        new_index = -np.ones(self.size, dtype=np.int64)
        new_index[keep] = np.arange(len(keep))
        cand_keep = np.flatnonzero(mask[self.cand_owner]) if len(self.cand_owner) else np.zeros(0, dtype=np.int64)
        cand_new = -np.ones(len(self.cand_owner), dtype=np.int64)
        cand_new[cand_keep] = np.arange(len(cand_keep))
        action = np.where(self.action[keep] >= 0, cand_new[np.maximum(self.action[keep], 0)], -1)
        return LoggedDecisions(
            visitor_ids=[self.visitor_ids[i] for i in keep],
            recommendation_ids=[self.recommendation_ids[i] for i in keep],
            channels=[self.channels[i] for i in keep],
            send_at=self.send_at[keep],
            V=self.V[keep],
            propensity=self.propensity[keep],
            action=action,
            control=self.control[keep],
            opened=self.opened[keep],
            clicked=self.clicked[keep],
            attributed=self.attributed[keep],
            converted=self.converted[keep],
            cand_owner=new_index[self.cand_owner[cand_keep]],
            cand_template=[self.cand_template[j] for j in cand_keep],
            cand_product=[self.cand_product[j] for j in cand_keep],
            A=self.A[cand_keep],
            window_h=self.window_h,
            traits=self.traits,
            excluded=dict(self.excluded),
            visited=self.visited[keep] if len(self.visited) == self.size else self.visited,
            revenue=self.revenue[keep] if len(self.revenue) == self.size else self.revenue,
        )


@dataclass
class _Pending:
    visitor_id: str
    recommendation_id: str
    channel: str
    send_at: float
    vector: list[float]
    propensity: float
    control: bool
    candidates: list[tuple[str, str | None, list[float]]]
    logged: int  # index into candidates, -1 = none


def replay_decisions(
    events: Iterable[Event],
    catalog: Sequence[CatalogItem],
    window_h: float = 24.0,
    consent_defaults: ConsentDefaults | None = None,
    progress: Callable[[int], None] | None = None,
    rules: SegmentRules | None = None,
    traits: TraitSchema | None = None,
) -> LoggedDecisions:
    """Fold events (in log or file order) through the profile aggregation code and collect every logged
    decision (`message_sent` with `properties.propensity`) with the visitor's row (and declared `traits`) as
    of that moment, its candidates and its outcomes."""
    defaults = consent_defaults or ConsentDefaults()
    schema = traits or TraitSchema()
    excluded: dict[str, int] = {}
    rules = rules or SegmentRules()  # callers with settings pass SegmentRules.from_settings (serving's rules)
    # Only ids, prices and creation times are read (ages are taken at each decision's own time), so the
    # snapshot's own "now" (which items are new arrivals) does not matter here.
    snapshot = build_snapshot(list(catalog), {}, {}, {}, now=0.0)
    templates = {
        item.item_id: item.message.trigger
        for item in catalog
        if item.kind is ItemKind.MESSAGE and item.message is not None
    }
    info = {
        item.item_id: ItemInfo(item.category, item.brand, item.price, item.discount)
        for item in catalog
        if item.kind is ItemKind.PRODUCT
    }
    states: dict[str, VisitorState] = {}
    consents: dict[str, Consent] = {}
    pending: list[_Pending] = []
    purchases: dict[str, list[float]] = {}
    spent: dict[str, list[tuple[float, float]]] = {}
    visits: dict[str, list[float]] = {}
    outcomes: dict[str, set[str]] = {}
    count = 0
    for event in events:
        count += 1
        if progress is not None and count % 50_000 == 0:
            progress(count)
        visitor_id = event.visitor_id
        if event.type is EventType.MESSAGE_SENT:
            decision = _pending_decision(event, states.get(visitor_id), rules, templates, snapshot, schema)
            if isinstance(decision, str):
                excluded[decision] = excluded.get(decision, 0) + 1
            else:
                pending.append(decision)
            continue
        if event.type is EventType.PURCHASE:
            purchases.setdefault(visitor_id, []).append(event.ts)
            item = info.get(event.item_id or "")
            price = event.price if event.price is not None else (item.price if item is not None else None)
            spent.setdefault(visitor_id, []).append((event.ts, float(price or 0.0) * (event.quantity or 1)))
        if event.type in VISIT_TYPES:
            visits.setdefault(visitor_id, []).append(event.ts)
        if event.recommendation_id and event.type in (
            EventType.MESSAGE_OPEN,
            EventType.MESSAGE_CLICK,
            EventType.PURCHASE,
        ):
            outcomes.setdefault(event.recommendation_id, set()).add(event.type.value)
        if event.type is EventType.PROFILE_UPDATE:
            changes = consent_changes_from_properties(event.properties)
            if changes:
                consents[visitor_id] = consents.get(visitor_id, Consent()).merged(changes, event.ts)
        # Mirror the aggregator: no behavioural profile without consent.
        if not consents.get(visitor_id, Consent()).allows("personalization", defaults):
            continue
        state = states.get(visitor_id)
        if state is None:
            state = states[visitor_id] = VisitorState(visitor_id)
        fold_visitor(state, event, info.get(event.item_id or ""))
    data = _assemble(pending, purchases, outcomes, snapshot, window_h, schema)
    data.excluded = excluded
    data.visited, data.revenue = _window_outcomes(pending, visits, spent, window_h)
    return data


def _pending_decision(
    event: Event,
    state: VisitorState | None,
    rules: SegmentRules,
    templates: Mapping[str, str],
    snapshot: ItemSnapshot,
    traits: TraitSchema,
) -> _Pending | str:
    """The decision, or why it is left out (a key of EXCLUSION_REASONS)."""
    props = event.properties
    if "propensity" not in props:
        return "no_propensity"
    if not event.recommendation_id:
        return "no_recommendation_id"
    propensity = props["propensity"]
    if isinstance(propensity, bool) or not isinstance(propensity, int | float) or not 0 < propensity <= 1:
        return "invalid_propensity"
    if props.get("action") not in ("send", "none"):
        return "no_action"
    if not props.get("candidates"):
        return "no_candidates"
    decided_at = as_number(props.get("decided_at"))
    send_at = event.ts
    now = decided_at if decided_at == decided_at else send_at
    row = visitor_features(state, rules, state.last_seen) if state is not None and state.event_count else None
    # Windows seen from the decision time, as serving sees the online row; traits as the service reads them.
    view = VisitorView.from_row(
        event.visitor_id, visitor_row_at(row, now) if row else row, state.traits if state is not None else None
    )
    channel = str(props.get("channel") or event.context.channel or "")
    pairs = decode_candidates(str(props.get("candidates") or ""))
    logged_template = event.item_id if props.get("action") == "send" else None
    product_id = props.get("product_id")
    logged_product = product_id if isinstance(product_id, str) else None
    if logged_template is not None and (logged_template, logged_product) not in pairs:
        pairs.append((logged_template, logged_product))
    candidates: list[tuple[str, str | None, list[float]]] = []
    logged = -1
    for template, product in pairs:
        trigger = templates.get(template)
        if trigger is None:
            continue  # the template left the catalog: its features are unknown
        product_row = snapshot.index.get(product, -1) if product else -1
        if template == logged_template and product == logged_product:
            logged = len(candidates)
        candidates.append((template, product, action_vector(view, trigger, template, product_row, snapshot, now)))
    if logged_template is not None and logged < 0:
        return "unknown_message"
    if not candidates:
        return "no_candidates"  # every candidate left the catalog: nothing to compare with
    return _Pending(
        visitor_id=event.visitor_id,
        recommendation_id=event.recommendation_id,
        channel=channel,
        send_at=send_at,
        vector=decision_vector(view, now, send_at, channel, traits),
        propensity=float(propensity),
        control=bool(props.get("control", False)),
        candidates=candidates,
        logged=logged,
    )


def _window_outcomes(
    pending: Sequence[_Pending],
    visits: Mapping[str, list[float]],
    spent: Mapping[str, list[tuple[float, float]]],
    window_h: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Per decision: whether the visitor visited, and what they spent, in [send_at, send_at + window)."""
    window = window_h * 3600.0
    visit_times = {visitor: np.sort(np.array(ts)) for visitor, ts in visits.items()}
    spend: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for visitor, rows in spent.items():
        ordered = sorted(rows)
        spend[visitor] = (
            np.array([t for t, _ in ordered]),
            np.concatenate([[0.0], np.cumsum([a for _, a in ordered])]),
        )
    visited = np.zeros(len(pending), dtype=bool)
    revenue = np.zeros(len(pending))
    for i, decision in enumerate(pending):
        times = visit_times.get(decision.visitor_id)
        if times is not None:
            first = np.searchsorted(times, decision.send_at, side="left")
            visited[i] = first < len(times) and times[first] < decision.send_at + window
        paid = spend.get(decision.visitor_id)
        if paid is not None:
            start, stop = np.searchsorted(paid[0], [decision.send_at, decision.send_at + window], side="left")
            revenue[i] = paid[1][stop] - paid[1][start]
    return visited, revenue


def _assemble(
    pending: Sequence[_Pending],
    purchases: Mapping[str, list[float]],
    outcomes: Mapping[str, set[str]],
    snapshot: ItemSnapshot,
    window_h: float,
    traits: TraitSchema,
) -> LoggedDecisions:
    n = len(pending)
    window = window_h * 3600.0
    sorted_purchases = {visitor: np.sort(np.array(ts)) for visitor, ts in purchases.items()}
    cand_owner: list[int] = []
    cand_template: list[str] = []
    cand_product: list[str | None] = []
    rows: list[list[float]] = []
    action = np.full(n, -1, dtype=np.int64)
    converted = np.zeros(n, dtype=bool)
    for i, decision in enumerate(pending):
        for k, (template, product, vector) in enumerate(decision.candidates):
            if k == decision.logged:
                action[i] = len(cand_owner)
            cand_owner.append(i)
            cand_template.append(template)
            cand_product.append(product)
            rows.append(vector)
        times = sorted_purchases.get(decision.visitor_id)
        if times is not None:
            first = np.searchsorted(times, decision.send_at, side="left")
            converted[i] = first < len(times) and times[first] < decision.send_at + window
    seen = [outcomes.get(d.recommendation_id, set()) for d in pending]
    return LoggedDecisions(
        visitor_ids=[d.visitor_id for d in pending],
        recommendation_ids=[d.recommendation_id for d in pending],
        channels=[d.channel for d in pending],
        send_at=np.array([d.send_at for d in pending], dtype=np.float64),
        V=np.array([d.vector for d in pending], dtype=np.float64).reshape(n, len(visitor_columns(traits))),
        propensity=np.array([d.propensity for d in pending], dtype=np.float64),
        action=action,
        control=np.array([d.control for d in pending], dtype=bool),
        opened=np.array(["message_open" in s for s in seen], dtype=bool),
        clicked=np.array(["message_click" in s for s in seen], dtype=bool),
        attributed=np.array(["purchase" in s for s in seen], dtype=bool),
        converted=converted,
        cand_owner=np.array(cand_owner, dtype=np.int64),
        cand_template=cand_template,
        cand_product=cand_product,
        A=np.array(rows, dtype=np.float64).reshape(len(rows), len(ACTION_COLUMNS)),
        window_h=window_h,
        traits=traits,
    )
