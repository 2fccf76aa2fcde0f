"""`selaras simulate-ab`: an A/B (and an A/A) experiment on the demo shop, end to end through the services.

The demo simulator's visitors keep shopping after the demo world's history ends. At the start of every
session a visitor asks `POST /v1/recommend` (with `context.now` set to the simulated time), reacts to what
the experiment arm showed (`Simulator.respond`: clicks, add-to-carts, purchases echoing the recommendation
id) and browses on as in the history; the events go to `POST /v1/events`, with the impressions the service
would have logged. After each simulated day the profile service folds the day and the recommend service
reloads, then the next day starts. The command prints the experiment report (uplift, intervals, p-values,
SRM, the CUPED adjustment, verdict).

Experiments: personalized vs generic ("ab"), personalized vs personalized ("aa", must find nothing) and model
vs model ("models": two ranker versions of the registry, one per arm, created through the admin API). Before
the experiments, a pre-period (`pre_days`) serves every visitor the serving model outside any experiment, so
visitors reach their first exposure with recommendation clicks and impressions (and the history's views,
carts and purchases) in their features: the pre-exposure covariates CUPED adjusts on.

Runs are close to reproducible: the simulator's reactions are drawn from a stream keyed by a per-session id
(the real recommendation id is random) and nothing changes the services' state during a simulated day; what
is left is the recommend service's item cache, which decays popularity against the wall clock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

import orjson
import yaml

from services.common.clock import FixedClock, wall_datetime
from services.common.events import Event, EventType
from services.common.models import ModelKind, ModelRegistry
from services.common.settings import CommonSettings
from services.common.storage import Namespace, open_store
from services.demo.reactions import ShownItem
from services.demo.simulator import Simulator
from services.experiments.config import load_config
from services.experiments.config_store import ExperimentConfigStore
from services.features import schema as F

log = logging.getLogger(__name__)
Progress = Callable[[str, float], None]
Mode = Literal["ab", "aa", "both", "models"]
RunKind = Literal["ab", "aa", "models"]
PRE_PERIOD_KEY = "pre-period"

DEFAULT_SLOTS: tuple[dict[str, Any], ...] = (
    {"name": "home_products", "kind": "product", "count": 8},
    {"name": "hero_banner", "kind": "banner", "count": 1},
    {"name": "cta", "kind": "cta", "count": 2},
)
# Store namespaces that make up a demo world (the event log and cursors are not copied: a fork starts a
# fresh log, which is why visitor states forget their applied log position).
FORKED_NAMESPACES = (
    Namespace.CATALOG,
    Namespace.VISITOR_STATE,
    Namespace.ITEM_STATE,
    Namespace.COVISITATION,
    Namespace.POPULARITY,
    Namespace.CONSENT,
    Namespace.PERSONAS,
    Namespace.META,
    Namespace.MODELS,
)
EVENT_BATCH = 1000


class HttpClient(Protocol):
    """What the simulation needs from an HTTP client (httpx.Client and Starlette's TestClient fit)."""

    def get(self, url: str, **kwargs: Any) -> Any: ...

    def post(self, url: str, **kwargs: Any) -> Any: ...


@dataclass
class Services:
    """The two services to drive, and how to wait until the profile service has folded what it got."""

    profile: HttpClient
    recommend: HttpClient
    settle: Callable[[], None]
    headers: dict[str, str] = field(default_factory=dict)
    clock: FixedClock | None = None  # the business clock the simulation moves through its days
    # Loads the ranker versions the experiments' arms name (a replica does it in its background refresh, which
    # a simulation turns off): None when the recommend service is not in this process.
    load_arm_models: Callable[[], None] | None = None


@dataclass
class RunStats:
    days: int = 0
    sessions: int = 0
    requests: int = 0
    events: int = 0
    responses: int = 0
    # (arm, strategy) -> answers: shows that control was served generically and treatment personalized.
    strategies: dict[str, int] = field(default_factory=dict)
    # (arm, ranker version) -> answers: shows which model ranked each arm (model vs model).
    models: dict[str, int] = field(default_factory=dict)


class ArmsError(ValueError):
    """`--arms` is malformed or names a ranker version the demo world does not have."""


def parse_model_arms(text: str) -> tuple[str, str]:
    """`model:<v1>,model:<v2>` -> (v1, v2): control is ranked by v1, treatment by v2."""
    parts = [part.strip() for part in text.split(",")]
    versions = tuple(part.removeprefix("model:") for part in parts)
    if len(parts) != 2 or any(not part.startswith("model:") for part in parts) or not all(versions):
        raise ArmsError(f"--arms takes two arms like model:<v1>,model:<v2>, got {text!r}")
    if versions[0] == versions[1]:
        raise ArmsError(f"both arms name ranker version {versions[0]!r}: a model vs model test needs two")
    return versions[0], versions[1]


def ranker_versions(settings: CommonSettings) -> list[str]:
    """The ranker versions in the model registry of `settings`, oldest first."""
    store = open_store(settings)
    try:
        return [version.version for version in ModelRegistry(store).index(ModelKind.RANKER).versions]
    finally:
        store.close()


def train_ranker(
    settings: CommonSettings, config: Any, progress: Progress | None = None, publish: CommonSettings | None = None
) -> tuple[str, dict[str, Any]]:
    """Train a ranker on the log of `settings` with `config` (a TrainConfig) and publish it there (or to the
    registry of `publish`, e.g. a fork, which has no log to train on): (version, metrics)."""
    # Training is imported here, not at module level, so `selaras --help` stays fast.
    from services.recommend.repository import RecommendRepository
    from services.recommend.training.train import Trainer

    repository = RecommendRepository.open(settings)
    try:
        result = Trainer(repository, config, progress).train()
    finally:
        repository.close()
    repository = RecommendRepository.open(publish or settings)
    try:
        result.publish(repository)
    finally:
        repository.close()
    return result.meta.version, result.metrics


def check_model_arms(models: Sequence[str], available: Sequence[str]) -> None:
    unknown = [version for version in models if version not in available]
    if unknown:
        listed = ", ".join(available) if available else "none"
        raise ArmsError(f"unknown ranker version {unknown[0]!r}; the demo world has: {listed}")


# ------------------------------------------------------------------------------------------------
# Forking a demo world
# ------------------------------------------------------------------------------------------------


def fork_world(
    source: CommonSettings, target: CommonSettings, visitor_ids: Sequence[str], item_ids: Sequence[str]
) -> dict[str, int]:
    """Copy a built demo world (catalog, model, indexes, visitor/item state and online features) to other
    settings (namespace, Feast project, data dir), so a simulation can change it without touching the
    original."""
    # Feast is imported here, not at module level, so `selaras --help` stays fast.
    from services.features.store import FeatureWriter, online_rows, open_feature_store

    copied: dict[str, int] = {}
    source_store, target_store = open_store(source), open_store(target)
    try:
        for namespace in FORKED_NAMESPACES:
            values = dict(source_store.scan(namespace))
            if namespace == Namespace.VISITOR_STATE:
                values = {key: _forget_position(raw) for key, raw in values.items()}
            for start in range(0, len(values), 2000):
                chunk = dict(list(values.items())[start : start + 2000])
                target_store.put_many(namespace, chunk)
            copied[namespace] = len(values)
    finally:
        source_store.close()
        target_store.close()
    source_features, target_features = open_feature_store(source), open_feature_store(target)
    writer = FeatureWriter(target_features, target.offline_dir)
    stamp = wall_datetime()  # online rows stamped with the write time, like the feature writer does
    for view, keys, present in (
        (F.VISITOR_VIEW, visitor_ids, "event_count"),
        (F.ITEM_VIEW, item_ids, None),
    ):
        rows: list[dict[str, Any]] = []
        for start in range(0, len(keys), 1000):
            for row in online_rows(source_features, view, keys[start : start + 1000]):
                known = row.get(present) if present else any(v is not None for k, v in row.items() if k != F.ITEM_KEY)
                if known:
                    rows.append({**row, F.TIMESTAMP_FIELD: stamp})
        writer.write(view, rows, offline=False)
        copied[view] = len(rows)
    return copied


def _forget_position(raw: bytes) -> bytes:
    state = orjson.loads(raw)
    state["applied_position"] = ""
    return orjson.dumps(state)


# ------------------------------------------------------------------------------------------------
# The simulation
# ------------------------------------------------------------------------------------------------


def experiment_spec(
    key: str,
    mode: RunKind,
    start: datetime,
    end: datetime,
    visitors: int,
    models: Sequence[str] = (),
) -> dict[str, Any]:
    """A/B: generic control vs personalized treatment. A/A: both arms personalized (must show nothing).
    Models: both personalized, control ranked by `models[0]` and treatment by `models[1]`."""
    arms: list[dict[str, Any]] = [
        {"name": "control", "weight": 0.5, "personalized": mode != "ab"},
        {"name": "treatment", "weight": 0.5, "personalized": True},
    ]
    if mode == "models":
        arms[0]["model"], arms[1]["model"] = models
        description = f"Ranker {models[0]} (control) vs {models[1]} (treatment)"
    elif mode == "ab":
        description = "Personalized ranking vs the generic popularity-in-context ranking"
    else:
        description = "A/A check: both arms get the same personalized ranking"
    return {
        "key": key,
        "description": description,
        "enabled": True,
        "slot_kinds": ["product", "banner", "cta"],
        "slots": [slot["name"] for slot in DEFAULT_SLOTS],
        "arms": arms,
        "start": start.isoformat(),
        "end": end.isoformat(),
        "attribution_window_hours": 24,
        "primary_metric": "ctr",
        "metrics": ["ctr", "conversion", "revenue", "add_to_cart"],
        "min_visitors_per_arm": max(20, visitors // 10),
        "planned_visitors": visitors,
    }


def _sessions(events: Sequence[Event]) -> list[list[Event]]:
    """Organic events grouped by session, ordered by session start."""
    grouped: dict[str, list[Event]] = {}
    for event in events:
        key = event.context.session_id or f"{event.visitor_id}-{event.timestamp.date()}"
        grouped.setdefault(key, []).append(event)
    return sorted(grouped.values(), key=lambda session: session[0].ts)


def _post_events(services: Services, events: Sequence[Event]) -> None:
    ordered = sorted(events, key=lambda e: e.ts)
    for start in range(0, len(ordered), EVENT_BATCH):
        body = {"events": [e.model_dump(mode="json", exclude_none=True) for e in ordered[start : start + EVENT_BATCH]]}
        response = services.profile.post("/v1/events", json=body, headers=services.headers)
        if response.status_code != 202:
            raise RuntimeError(f"POST /v1/events answered {response.status_code}: {response.text[:300]}")


def _impressions(answer: Mapping[str, Any], first: Event) -> list[Event]:
    """The impression events the recommend service logs for an answer (the simulation turns its log off so
    that nothing changes during a simulated day, and sends them with the day's other events instead)."""
    experiment = answer.get("experiment")
    events = []
    for slot in answer["slots"]:
        for item in slot["items"]:
            properties: dict[str, Any] = {"slot": slot["name"], "slot_kind": slot["kind"], "position": item["position"]}
            if experiment:
                properties["experiment"], properties["arm"] = experiment["key"], experiment["arm"]
            events.append(
                Event(
                    event_id=f"imp-{answer['recommendation_id']}-{slot['name']}-{item['position']}",
                    visitor_id=first.visitor_id,
                    type=EventType.IMPRESSION,
                    item_id=item["item_id"],
                    timestamp=first.timestamp,
                    recommendation_id=answer["recommendation_id"],
                    context=first.context,
                    properties=properties,
                )
            )
    return events


def _reload(services: Services) -> None:
    response = services.recommend.post("/v1/admin/reload", headers=services.headers)
    if response.status_code != 200:
        raise RuntimeError(f"POST /v1/admin/reload answered {response.status_code}: {response.text[:300]}")


def simulate(
    services: Services,
    simulator: Simulator,
    start: datetime,
    days: int,
    run_key: str,
    slots: Sequence[Mapping[str, Any]] = DEFAULT_SLOTS,
    progress: Progress | None = None,
) -> RunStats:
    """Visitors browse for `days` simulated days from `start`, asking for recommendations at each session."""
    stats = RunStats()
    # Same seed and visitors as the world's simulator, continuing at `start`.
    continued = Simulator(simulator.shop, n_visitors=len(simulator.visitors), seed=simulator.seed, start=start)
    organic = list(continued.history(days))
    for day in range(days):
        day_start, day_end = start + timedelta(days=day), start + timedelta(days=day + 1)
        today = [e for e in organic if day_start.timestamp() <= e.ts < day_end.timestamp()]
        outgoing: list[Event] = []
        for number, session in enumerate(_sessions(today)):
            first = session[0]
            outgoing.extend(e.model_copy(update={"event_id": f"{run_key}-{e.event_id}"}) for e in session)
            context = {
                "device": first.context.device.value if first.context.device else None,
                "channel": first.context.channel,
                "city": first.context.city,
                "locale": first.context.locale,
                "now": first.timestamp.isoformat(),
            }
            body = {"visitor_id": first.visitor_id, "context": context, "slots": list(slots)}
            response = services.recommend.post("/v1/recommend", json=body, headers=services.headers)
            if response.status_code != 200:
                raise RuntimeError(f"POST /v1/recommend answered {response.status_code}: {response.text[:300]}")
            answer = response.json()
            stats.requests += 1
            arm = answer["experiment"]["arm"] if answer.get("experiment") else "none"
            served = f"{arm}:{answer['strategy']}"
            stats.strategies[served] = stats.strategies.get(served, 0) + 1
            ranked_by = f"{arm}:{answer['model_version']}"
            stats.models[ranked_by] = stats.models.get(ranked_by, 0) + 1
            outgoing.extend(_impressions(answer, first))
            # The reaction is drawn from a stream keyed by this stable id (the service's id is random), then
            # attributed to the real recommendation id.
            stable_id = f"{run_key}-d{day}-s{number}-{first.visitor_id}"
            for slot in answer["slots"]:
                shown = [ShownItem(item["item_id"], item["position"], slot["kind"]) for item in slot["items"]]
                if not shown:
                    continue
                for reaction in simulator.respond(first.visitor_id, shown, first.timestamp, stable_id, slot["name"]):
                    outgoing.append(reaction.model_copy(update={"recommendation_id": answer["recommendation_id"]}))
                    stats.responses += 1
            stats.sessions += 1
        if services.clock is not None:
            # The day is over (reactions to its last sessions included): none of its events is in the future.
            services.clock.set(max([day_end.timestamp(), *(e.ts for e in outgoing)]))
        _post_events(services, outgoing)
        stats.events += len(outgoing)
        services.settle()
        _reload(services)
        stats.days += 1
        if progress:
            progress(run_key, (day + 1) / days)
    return stats


def fetch_report(services: Services, key: str) -> dict[str, Any]:
    response = services.recommend.get(f"/v1/experiments/{key}/report", headers=services.headers)
    if response.status_code != 200:
        raise RuntimeError(f"report answered {response.status_code}: {response.text[:300]}")
    report: dict[str, Any] = response.json()
    return report


@dataclass
class AbResult:
    key: str
    mode: str
    report: dict[str, Any]
    stats: RunStats
    spec: dict[str, Any] = field(default_factory=dict)  # the experiment as created (arms, models)
    pre_period: RunStats | None = None  # the days served outside any experiment before the experiments

    @property
    def arm_models(self) -> dict[str, str]:
        """arm -> the ranker version it names (model vs model)."""
        return {arm["name"]: arm["model"] for arm in self.spec.get("arms", []) if arm.get("model")}


@contextmanager
def in_process_services(
    profile_settings: Any, recommend_settings: Any, api_key: str | None = None, clock: FixedClock | None = None
) -> Iterator[Services]:
    """Both services as in-process ASGI apps (real HTTP handling, lifespans and background threads), on one
    business clock when given (a simulation drives it)."""
    from starlette.testclient import TestClient

    from services.profile.app import create_app as create_profile_app
    from services.recommend.app import create_app as create_recommend_app

    profile_app = create_profile_app(profile_settings, clock)
    recommend_app = create_recommend_app(recommend_settings, clock)
    with TestClient(profile_app) as profile, TestClient(recommend_app) as recommend:
        state = profile_app.state.profile

        def settle(timeout: float = 300.0) -> None:
            # Folded when nothing is left after the aggregator's cursor (observers run before it moves).
            deadline = time.monotonic() + timeout
            while state.repository.unfolded_partitions():
                if time.monotonic() > deadline:
                    raise RuntimeError("the profile service did not fold the simulated day in time")
                time.sleep(0.05)

        headers = {"X-API-Key": api_key} if api_key else {}
        yield Services(
            profile, recommend, settle, headers, clock, recommend_app.state.recommend.service.load_arm_models
        )


def run_simulation(
    world_settings: CommonSettings,
    simulator: Simulator,
    world_end: datetime,
    target: CommonSettings,
    days: int = 7,
    mode: Mode = "both",
    progress: Progress | None = None,
    models: Sequence[str] = (),
    pre_days: int = 0,
    forked: bool = False,
) -> list[AbResult]:
    """Fork the demo world into `target` (unless `forked`: it holds one already), serve a pre-period of
    `pre_days` days, run the A/B (and/or A/A) or the model vs model experiment back to back through in-process
    services, and return the reports. `models`: the two ranker versions of the "models" mode (ArmsError when
    the world's registry lacks one)."""
    from services.profile.settings import ProfileSettings
    from services.recommend.settings import RecommendSettings

    modes: list[RunKind] = ["ab", "aa"] if mode == "both" else [mode]
    if mode == "models":
        if len(models) != 2:
            raise ArmsError("a model vs model test needs two ranker versions")
        check_model_arms(models, ranker_versions(target if forked else world_settings))
    item_ids = [item.item_id for item in simulator.shop.products]
    if not forked:
        fork_world(world_settings, target, [v.visitor_id for v in simulator.visitors], item_ids)
        if progress:
            progress("fork the demo world", 1.0)
    # The pre-period starts on the next local midnight after the world's history, the experiments after it,
    # each run `days` long.
    before = (world_end + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    start = before + timedelta(days=pre_days)
    specs = [
        experiment_spec(
            f"sim-{kind}",
            kind,
            start + timedelta(days=i * days),
            start + timedelta(days=(i + 1) * days),
            len(simulator.visitors),
            models,
        )
        for i, kind in enumerate(modes)
    ]
    # Model vs model is created through the admin API, as a growth team would; the file seeds the others.
    seeded = [spec for spec in specs if spec["arms"][0].get("model") is None]
    experiments_file = target.data_dir / "simulate-ab-experiments.yaml"
    experiments_file.parent.mkdir(parents=True, exist_ok=True)
    experiments_file.write_text(yaml.safe_dump({"holdout": 0.0, "report_interval_s": 60, "experiments": seeded}))
    shared = target.model_dump(include={"data_dir", "redis_url", "redis_cluster", "namespace", "feast_project"})
    # WARNING: the in-process HTTP client would otherwise log every simulated request.
    profile_settings = ProfileSettings(
        **shared, environment="test", log_level="WARNING", aggregator_idle_s=0.01, offline_rows=False
    )
    # No background cache refresh and no impression log: nothing changes the services during a simulated day,
    # which makes a run reproducible (the day's changes arrive with the reload at its end).
    recommend_settings = RecommendSettings(
        **shared,
        environment="test",
        log_level="WARNING",
        experiments_file=experiments_file,
        refresh_interval_s=24 * 3600.0,
        log_impressions=False,
    )
    results: list[AbResult] = []
    # Simulated days lie after today: the services run on a clock the simulation moves through them.
    clock = FixedClock(before)
    # The stored configuration wins over the file (config_store.py): this run's experiments replace it.
    store = open_store(recommend_settings)
    try:
        ExperimentConfigStore(store).seed(
            load_config(experiments_file), force=True, actor="simulate-ab", now=before.timestamp()
        )
    finally:
        store.close()
    with in_process_services(profile_settings, recommend_settings, clock=clock) as services:
        pre_period = (
            simulate(services, simulator, before, pre_days, PRE_PERIOD_KEY, progress=progress) if pre_days else None
        )
        for i, spec in enumerate(specs):
            if spec not in seeded:
                create_experiment(services, spec)
            stats = simulate(
                services, simulator, start + timedelta(days=i * days), days, spec["key"], progress=progress
            )
            report = fetch_report(services, spec["key"])
            results.append(AbResult(spec["key"], modes[i], report, stats, spec, pre_period))
    return results


def create_experiment(services: Services, spec: Mapping[str, Any]) -> dict[str, Any]:
    """`POST /v1/experiments`; the arms' ranker versions are loaded before any request."""
    response = services.recommend.post("/v1/experiments", json=dict(spec), headers=services.headers)
    if response.status_code != 201:
        raise RuntimeError(f"POST /v1/experiments answered {response.status_code}: {response.text[:300]}")
    if services.load_arm_models is not None:
        services.load_arm_models()
    created: dict[str, Any] = response.json()
    return created
