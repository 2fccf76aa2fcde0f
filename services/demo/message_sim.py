"""Drive the next-best-message policy over the demo simulator: logged decisions with propensities plus the
simulated visitors' reactions, for training the uplift model and for offline policy evaluation.

After `history_days` of browsing, every simulated morning (07:00 WIB) each visitor is asked about one
channel (drawn at random) through the real `MessageService`: rows come from Feast, consent and caps from
the store, decisions are logged as `message_sent` events. A sent message gets `Simulator.respond_message`
(open, click, purchase, plus any organic purchase); a logged "nothing sent" gets
`Simulator.respond_no_message`, drawn from the same random stream, so both arms face the same organic
purchases. History and outcomes are ingested in time order through the profile service's ingest path and
aggregator, so features at each decision are the ones the live service would have read.

`bench_nbm_batch` measures the batch endpoint's throughput for `make bench`.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

import numpy as np

from services.common.catalog import CatalogItem
from services.common.clock import SYSTEM_CLOCK, DataClock
from services.common.context import WIB
from services.common.events import Event, EventContext, EventType
from services.common.settings import CommonSettings
from services.common.traits import TraitSchema
from services.demo.files import write_jsonl
from services.demo.shop import generate_shop
from services.demo.simulator import Simulator
from services.demo.visitor_types import SimVisitor
from services.demo.world import batched
from services.features.aggregations import SegmentRules
from services.features.item_cache import build_snapshot
from services.messages.decision_log import DecisionEntry, encode_candidates
from services.messages.replay import replay_decisions
from services.messages.repository import MessageRepository
from services.messages.schemas import MessageRequest
from services.messages.service import MessageService
from services.messages.settings import CHANNELS, MessageSettings
from services.messages.train import MessageTrainConfig, train_message_model
from services.profile.aggregator.worker import Aggregator
from services.profile.ingest import IngestService
from services.profile.repository import ProfileRepository
from services.recommend.repository import RecommendRepository
from services.recommend.settings import RecommendSettings

log = logging.getLogger(__name__)
Progress = Callable[[str, float], None]
CATALOG_FILE = "catalog.jsonl"
EVENTS_FILE = "events.jsonl.gz"


@dataclass(frozen=True)
class MessageSimConfig:
    visitors: int = 300
    history_days: int = 14
    message_days: int = 14
    seed: int = 7
    end: datetime | None = None  # default: the current hour in WIB
    channels: tuple[str, ...] = CHANNELS
    # Share of visitors who opted in to each channel (marketing consent is opt-in by default).
    consent: tuple[tuple[str, float], ...] = (("push", 0.85), ("email", 0.7), ("whatsapp", 0.6))
    decision_hour_wib: int = 7
    # Train the uplift model after this many message days and serve it from then on (None: never).
    train_after_days: int | None = None
    restock_share: float = 0.15  # of the sold-out products, restocked each simulated day (back in stock)
    # Keep simulating browsing sessions during the message days. Off by default: their purchases do not
    # react to messages and would bury the messages' effect in noise; the simulator's organic purchase
    # (`respond_no_message`, same random stream as `respond_message`) is the designed counterfactual.
    browsing_during_messages: bool = False
    policy: MessageSettings = field(default_factory=lambda: MessageSettings(win_back_after_days=7.0))
    batch_size: int = 1000


@dataclass
class MessageSimResult:
    start: datetime
    first_decision: datetime
    end: datetime
    decisions: int = 0
    logged: int = 0
    sent: int = 0
    events: int = 0
    answers: dict[str, int] = field(default_factory=dict)
    model_version: str | None = None
    train_metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    files: dict[str, Path] = field(default_factory=dict)


def _noop(_: str, __: float) -> None:
    return None


class _Timeline:
    """History events and pending outcome events, released in time order."""

    def __init__(self, history: Iterator[Event]):
        self._history = history
        self._next: Event | None = next(history, None)
        self._pending: list[tuple[float, int, Event]] = []
        self._sequence = itertools.count()

    def push(self, events: Iterable[Event]) -> None:
        for event in events:
            heapq.heappush(self._pending, (event.ts, next(self._sequence), event))

    def until(self, ts: float) -> Iterator[Event]:
        while True:
            history_ts = self._next.ts if self._next is not None else float("inf")
            pending_ts = self._pending[0][0] if self._pending else float("inf")
            if min(history_ts, pending_ts) >= ts:
                return
            if history_ts <= pending_ts:
                assert self._next is not None
                yield self._next
                self._next = next(self._history, None)
            else:
                yield heapq.heappop(self._pending)[2]


def _consent_events(sim: Simulator, config: MessageSimConfig, at: datetime) -> list[Event]:
    rng = np.random.default_rng([config.seed, 41])
    events: list[Event] = []
    for visitor in sim.visitors:
        given = {f"consent_marketing_{channel}": bool(rng.random() < share) for channel, share in config.consent}
        events.append(
            Event(
                event_id=f"consent-{config.seed}-{visitor.visitor_id}",
                visitor_id=visitor.visitor_id,
                type=EventType.PROFILE_UPDATE,
                timestamp=at,
                context=EventContext(city=visitor.city, locale=visitor.locale),
                properties=given,
            )
        )
    return events


def _restock(
    products: list[CatalogItem], rng: np.random.Generator, share: float, profile: ProfileRepository
) -> list[str]:
    """Put a share of the sold-out products back in stock (the demo shop's catalog never changes otherwise)."""
    sold_out = [i for i, item in enumerate(products) if item.stock == 0]
    if not sold_out or share <= 0:
        return []
    picks = rng.choice(len(sold_out), size=max(1, int(len(sold_out) * share)), replace=False)
    changed = []
    for pick in picks:
        index = sold_out[int(pick)]
        products[index] = products[index].model_copy(update={"stock": int(rng.integers(5, 40))})
        changed.append(products[index])
    profile.upsert_catalog(changed)
    return [item.item_id for item in changed]


def simulate_messages(
    settings: CommonSettings,
    config: MessageSimConfig | None = None,
    out_dir: Path | None = None,
    progress: Progress | None = None,
) -> MessageSimResult:
    """Run the simulation into the store of `settings` (its own namespace!) and optionally export JSONL."""
    config = config or MessageSimConfig()
    progress = progress or _noop
    began = time.perf_counter()
    end = config.end or SYSTEM_CLOCK.now_datetime().astimezone(WIB).replace(minute=0, second=0, microsecond=0)
    total_days = config.history_days + config.message_days
    start = end - timedelta(days=total_days)
    shop = generate_shop(seed=config.seed, now=end)
    sim = Simulator(shop, n_visitors=config.visitors, seed=config.seed, start=start)
    products = list(shop.products)
    first_day = (start + timedelta(days=config.history_days)).astimezone(WIB)
    first_decision = first_day.replace(hour=config.decision_hour_wib, minute=0, second=0, microsecond=0)
    result = MessageSimResult(start=start, first_decision=first_decision, end=end)

    recommend_settings = RecommendSettings(
        **{name: getattr(settings, name) for name in CommonSettings.model_fields}, refresh_interval_s=3600.0
    )
    profile = ProfileRepository.open(settings)
    recommend_repository = RecommendRepository.open(recommend_settings)
    try:
        profile.upsert_catalog(shop.all_items())
        aggregator = Aggregator(
            profile,
            SegmentRules.from_settings(settings),
            settings.consent_defaults(),
            offline_rows=False,
            clock=DataClock(),
        )
        ingest = IngestService(profile)
        # The item snapshot is built from the catalog in memory: the recommend service's refresh would scan the
        # store's catalog and indexes every simulated day, which costs minutes on a busy shared Redis.
        others = [*shop.banners, *shop.ctas, *shop.messages]
        snapshot = [build_snapshot([*products, *others], {}, {}, {}, now=start.timestamp())]
        messages = MessageService(
            MessageRepository(recommend_repository),
            lambda: snapshot[0],
            config.policy,
            settings.consent_defaults(),
        )
        timeline = _Timeline(sim.history(total_days if config.browsing_during_messages else config.history_days))
        timeline.push(_consent_events(sim, config, start + timedelta(seconds=1)))
        rng = np.random.default_rng([config.seed, 43])

        def ingest_until(ts: float) -> None:
            for batch in batched(timeline.until(ts), 5000):
                ingest.ingest(batch)
                result.events += len(batch)
                while aggregator.run_once(10_000).events:
                    pass

        visitor_ids = [v.visitor_id for v in sim.visitors]
        for day in range(config.message_days):
            decided_at = first_decision + timedelta(days=day)
            ingest_until(decided_at.timestamp())
            _restock(products, rng, config.restock_share, profile)
            snapshot[0] = build_snapshot([*products, *others], {}, {}, {}, now=decided_at.timestamp())
            channels = rng.choice(len(config.channels), size=len(visitor_ids))
            requests = [
                MessageRequest(visitor_id=v, channel=config.channels[int(c)], now=decided_at)
                for v, c in zip(visitor_ids, channels, strict=True)
            ]
            for first in range(0, len(requests), config.batch_size):
                for answer in messages.decide_batch(requests[first : first + config.batch_size]):
                    result.decisions += 1
                    key = answer["action"] if answer["action"] == "send" else answer["reason"]
                    result.answers[key] = result.answers.get(key, 0) + 1
                    timeline.push(_reaction(sim, answer))
                    if answer["recommendation_id"]:
                        result.logged += 1
                        result.sent += answer["action"] == "send"
            recommend_repository.flush()
            if config.train_after_days is not None and day + 1 == config.train_after_days:
                trained = train_message_model(
                    replay_decisions(recommend_repository.logged_events(), recommend_repository.catalog()),
                    MessageTrainConfig(seed=config.seed),
                )
                MessageRepository(recommend_repository).save_model(
                    trained.model.version, trained.model.to_bytes(), trained.model.created_at
                )
                messages.use_model(trained.model)
                result.model_version = trained.model.version
                result.train_metrics = trained.metrics
            progress("simulating message days", (day + 1) / config.message_days)
        ingest_until(float("inf"))
        recommend_repository.flush()
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            result.files["catalog"] = out_dir / CATALOG_FILE
            result.files["events"] = out_dir / EVENTS_FILE
            write_jsonl(recommend_repository.catalog(), result.files["catalog"])
            write_jsonl(recommend_repository.logged_events(), result.files["events"])
    finally:
        recommend_repository.close()
        profile.close()
    result.seconds = time.perf_counter() - began
    return result


def _reaction(sim: Simulator, answer: dict[str, Any]) -> list[Event]:
    """The visitor's reaction to a logged decision (nothing for answers that were not logged)."""
    recommendation_id = answer.get("recommendation_id")
    if not recommendation_id:
        return []
    if answer["action"] == "send":
        product = answer.get("product") or {}
        return sim.respond_message(
            answer["visitor_id"],
            answer["message"]["item_id"],
            product.get("item_id"),
            answer["channel"],
            datetime.fromisoformat(answer["send_at"]),
            recommendation_id,
        )
    planned = datetime.fromisoformat(answer["planned_send_at"])
    return sim.respond_no_message(answer["visitor_id"], planned, recommendation_id)


# ------------------------------------------------------------------------------------------------
# A randomized CRM campaign: hidden customer attributes that change the response, no opens recorded
# ------------------------------------------------------------------------------------------------

SEGMENTS: Final = ("bargain_hunter", "trend_seeker", "regular")
# Declared like a shop declares its CRM attributes (SELARAS_TRAITS): only `crm_segment` changes the response.
CRM_TRAITS: Final = TraitSchema.model_validate(
    {
        "traits": [
            {"name": "crm_segment", "type": "category", "values": list(SEGMENTS)},
            {"name": "spend_12m", "type": "number"},
            {"name": "newbie", "type": "boolean"},
            {"name": "signup_channel", "type": "category", "values": ["web", "app", "store"]},
        ]
    }
)
PROMO_EMAIL, NEW_ARRIVALS_EMAIL = "m012", "m006"  # the demo shop's payday-promo and new-arrivals e-mails
CAMPAIGN_TEMPLATES: Final = (PROMO_EMAIL, NEW_ARRIVALS_EMAIL)
# The one message each segment reacts to. The segment is drawn independently of the visitor's hidden
# behaviour type, so browsing does not reveal it: only the CRM attribute does.
REACTS_TO: Final[dict[str, str | None]] = {
    "bargain_hunter": PROMO_EMAIL,
    "trend_seeker": NEW_ARRIVALS_EMAIL,
    "regular": None,
}
CUSTOMERS_FILE = "customers.csv"
TRAITS_FILE = "traits.json"


@dataclass(frozen=True)
class CampaignConfig:
    visitors: int = 1500
    history_days: int = 3  # browsing before the campaign (behaviour features)
    waves: int = 2  # every visitor is randomized once per wave
    days_between_waves: int = 4
    window_h: float = 72.0  # outcome window after each send
    control_rate: float = 0.1  # random control group (nothing sent); the rest uniform over nothing and the e-mails
    lift: float = 0.3  # visit probability a segment's own message adds; the other message adds nothing
    buy_after_visit: float = 0.3
    segment_shares: tuple[float, float, float] = (0.4, 0.3, 0.3)  # SEGMENTS
    seed: int = 7
    end: datetime | None = None  # the last wave's outcome window ends before this (default: now)


@dataclass
class Campaign:
    catalog: list[CatalogItem]
    events: list[Event]  # time order: browsing history, CRM traits, decisions, outcomes
    traits: TraitSchema
    segments: dict[str, str]  # visitor -> hidden segment
    # The truth per logged decision (recommendation id): visit probability after "none" and each e-mail.
    visit_probability: dict[str, dict[str, float]]
    window_h: float


def _crm_traits(sim: Simulator, config: CampaignConfig) -> dict[str, dict[str, Any]]:
    rng = np.random.default_rng([config.seed, 53])
    traits: dict[str, dict[str, Any]] = {}
    shares = np.array(config.segment_shares) / sum(config.segment_shares)
    for visitor in sim.visitors:
        activity = visitor.visits_per_week / 3.0
        traits[visitor.visitor_id] = {
            "crm_segment": SEGMENTS[int(rng.choice(len(SEGMENTS), p=shares))],
            "spend_12m": round(float(rng.lognormal(13.5, 0.8)) * activity, -3),
            "newbie": bool(rng.random() < 0.2),
            "signup_channel": ("web", "app", "store")[int(rng.integers(0, 3))],
        }
    return traits


def base_visit_probability(visitor: SimVisitor) -> float:
    """Chance of a visit within the outcome window without a message: more for frequent visitors."""
    return min(0.6, 0.05 + 0.035 * visitor.visits_per_week)


def simulate_campaign(config: CampaignConfig | None = None) -> Campaign:
    """A randomized e-mail campaign on the demo shop, in memory (no store needed): every wave, each visitor
    gets nothing (control group, or the uniform draw) or one of two e-mails, logged as `message_sent`
    decisions with their propensities; the outcome is a visit (and maybe a purchase) or nothing, with no
    open or click. Visitors carry CRM traits (`CRM_TRAITS`, as `profile_update` events)."""
    config = config or CampaignConfig()
    end = config.end or SYSTEM_CLOCK.now_datetime().astimezone(WIB).replace(minute=0, second=0, microsecond=0)
    campaign_days = (config.waves - 1) * config.days_between_waves + math.ceil(config.window_h / 24) + 1
    start = end - timedelta(days=config.history_days + campaign_days)
    shop = generate_shop(seed=config.seed, now=end)
    sim = Simulator(shop, n_visitors=config.visitors, seed=config.seed, start=start)
    first_wave = (start + timedelta(days=config.history_days)).astimezone(WIB).replace(hour=9, minute=0, second=0)
    events = list(sim.history(config.history_days))
    traits = _crm_traits(sim, config)
    for visitor in sim.visitors:
        problems = CRM_TRAITS.errors(traits[visitor.visitor_id])
        if problems:
            raise ValueError(f"demo traits do not match CRM_TRAITS: {problems}")
        events.append(
            Event(
                event_id=f"crm-{config.seed}-{visitor.visitor_id}",
                visitor_id=visitor.visitor_id,
                type=EventType.PROFILE_UPDATE,
                timestamp=first_wave - timedelta(hours=2),
                context=EventContext(city=visitor.city, locale=visitor.locale),
                properties=traits[visitor.visitor_id],
            )
        )
    templates = {item.item_id: item for item in shop.messages}
    candidates = encode_candidates([(template, None) for template in CAMPAIGN_TEMPLATES])
    uniform = (1.0 - config.control_rate) / (len(CAMPAIGN_TEMPLATES) + 1)
    rng = np.random.default_rng([config.seed, 59])
    truth: dict[str, dict[str, float]] = {}
    for wave in range(config.waves):
        sent_at = first_wave + timedelta(days=wave * config.days_between_waves)
        for index, visitor in enumerate(sim.visitors):
            control = bool(rng.random() < config.control_rate)
            pick = 0 if control else int(rng.integers(0, len(CAMPAIGN_TEMPLATES) + 1))
            template = CAMPAIGN_TEMPLATES[pick - 1] if pick else None
            recommendation_id = f"crm{config.seed}w{wave}-{visitor.visitor_id}"
            moment = sent_at + timedelta(seconds=index)
            base = base_visit_probability(visitor)
            segment = str(traits[visitor.visitor_id]["crm_segment"])
            chances = {"none": base} | {
                t: min(0.95, base + (config.lift if REACTS_TO[segment] == t else 0.0)) for t in CAMPAIGN_TEMPLATES
            }
            truth[recommendation_id] = chances
            message = templates[template].message if template is not None else None
            entry = DecisionEntry(
                recommendation_id=recommendation_id,
                visitor_id=visitor.visitor_id,
                channel="email",
                city=visitor.city,
                decided_at=moment.timestamp(),
                send_at=moment,
                propensity=uniform + (config.control_rate if pick == 0 else 0.0),
                control=control,
                reason="crm campaign",
                candidates=candidates,
                model_version=None,
                experiment=None,
                persona=None,
                template_id=template,
                trigger=message.trigger if message is not None else None,
            )
            events.append(entry.event())
            if rng.random() < chances[template or "none"]:
                events.extend(
                    sim.respond_visit(
                        visitor.visitor_id, moment, config.window_h, config.buy_after_visit, recommendation_id
                    )
                )
    events.sort(key=lambda event: event.ts)
    return Campaign(
        catalog=shop.all_items(),
        events=events,
        traits=CRM_TRAITS,
        segments={visitor: str(values["crm_segment"]) for visitor, values in traits.items()},
        visit_probability=truth,
        window_h=config.window_h,
    )


def write_campaign(campaign: Campaign, out_dir: Path) -> dict[str, Path]:
    """The campaign as files: catalog and events (JSON Lines), the trait schema (for SELARAS_TRAITS) and the
    customers with their traits (CSV for `selaras import customers`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "catalog": out_dir / CATALOG_FILE,
        "events": out_dir / EVENTS_FILE,
        "traits": out_dir / TRAITS_FILE,
        "customers": out_dir / CUSTOMERS_FILE,
    }
    write_jsonl(campaign.catalog, files["catalog"])
    write_jsonl(campaign.events, files["events"])
    files["traits"].write_text(campaign.traits.model_dump_json(indent=2))
    names = [spec.name for spec in campaign.traits.traits]
    lines = [",".join(["visitor_id", *names])]
    for event in campaign.events:
        if event.type is EventType.PROFILE_UPDATE and "crm_segment" in event.properties:
            values = [event.properties.get(name) for name in names]
            lines.append(
                ",".join([event.visitor_id, *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)])
            )
    files["customers"].write_text("\n".join(lines) + "\n")
    return files


# ------------------------------------------------------------------------------------------------
# Benchmark hook (bench/ is owned by the benchmark suite; it calls this)
# ------------------------------------------------------------------------------------------------


def bench_nbm_batch(
    client: Any,
    visitor_ids: Sequence[str],
    channel: str = "push",
    batch_size: int = 1000,
    rounds: int = 5,
    now: datetime | None = None,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Throughput of `POST /v1/next-best-message:batch` (visitors per second) and batch latencies.

    `client` is an httpx.Client (or FastAPI TestClient) pointing at the recommend service. Requests are
    `dry_run` so that rounds do not use up each other's frequency caps; everything else (bulk Feast read,
    consent, caps, eligibility, one model predict per batch, rendering) runs as in production."""
    if not visitor_ids:
        raise ValueError("bench_nbm_batch needs visitor ids (known visitors make it realistic)")
    extra = {"now": now.isoformat()} if now is not None else {}
    bodies = []
    for start in range(0, len(visitor_ids), batch_size):
        chunk = visitor_ids[start : start + batch_size]
        bodies.append({"requests": [{"visitor_id": v, "channel": channel, "dry_run": True, **extra} for v in chunk]})
    # One warm-up call builds the message catalog and loads the model.
    warm = client.post("/v1/next-best-message:batch", json=bodies[0], headers=headers or {})
    if warm.status_code != 200:
        raise RuntimeError(f"batch endpoint answered {warm.status_code}: {warm.text[:300]}")
    latencies: list[float] = []
    visitors = 0
    sent = 0
    began = time.perf_counter()
    for _ in range(rounds):
        for body in bodies:
            t0 = time.perf_counter()
            response = client.post("/v1/next-best-message:batch", json=body, headers=headers or {})
            latencies.append(time.perf_counter() - t0)
            if response.status_code != 200:
                raise RuntimeError(f"batch endpoint answered {response.status_code}: {response.text[:300]}")
            data = response.json()
            visitors += data["count"]
            sent += data["sent"]
    seconds = time.perf_counter() - began
    ordered = sorted(latencies)
    return {
        "visitors_per_s": round(visitors / seconds, 1),
        "batches": len(latencies),
        "batch_size": batch_size,
        "visitors": visitors,
        "send_share": round(sent / max(visitors, 1), 4),
        "batch_ms_p50": round(statistics.median(ordered) * 1000, 2),
        "batch_ms_p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 2),
    }
