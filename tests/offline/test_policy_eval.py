"""Off-policy evaluation: estimator calibration on synthetic data, slate bookkeeping, and the validation on
the simulator (log with exploration, estimate offline, run the target policy, compare)."""

from __future__ import annotations

import gzip
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from services.cli import app as cli
from services.common.clock import Clock
from services.common.events import Event, EventType
from services.common.storage import Namespace, RedisStore, make_redis_client
from services.demo.reactions import ShownItem
from services.offline.estimators import cluster_se, doubly_robust, effective_sample_size, ips, snips
from services.offline.policy import (
    ItemLists,
    LoggingPolicy,
    ModelRanking,
    UniformRandom,
    evaluate_file,
    evaluate_policies,
    popular_lists,
)
from services.offline.slates import LoggedSlate, SlateLog, load_slates
from services.recommend.ranking.exploration import Exploration, explore
from services.recommend.repository import RecommendRepository
from services.recommend.schemas import RecommendRequest, RequestContext, SlotRequest
from services.recommend.service import RecommendService
from services.recommend.settings import RecommendSettings
from tests.conftest import REDIS_URL, SessionWorld, clean_namespace, unique_name
from tests.factories import make_event, make_item

# ---------------------------------------------------------------------------------------------------------
# Generic estimators
# ---------------------------------------------------------------------------------------------------------


def test_estimators_cover_the_truth_95_percent_of_the_time() -> None:
    """A contextual bandit with known value: 1,000 replications of 600 logged decisions."""
    rng = np.random.default_rng(11)
    reps, n, arms = 1000, 600, 5
    covered = {"ips": 0, "snips": 0, "dr": 0}
    for _ in range(reps):
        context = rng.random(n)
        means = np.clip(0.05 + 0.4 * np.outer(context, np.linspace(0, 1, arms)), 0, 1)  # P(click | x, a)
        logging = np.full(arms, 1 / arms)  # uniform logging
        target = np.array([0.05, 0.05, 0.1, 0.2, 0.6])
        actions = rng.integers(arms, size=n)
        rewards = (rng.random(n) < means[np.arange(n), actions]).astype(float)
        weights = target[actions] / logging[actions]
        truth = float(0.05 + 0.4 * 0.5 * (target * np.linspace(0, 1, arms)).sum())
        # A deliberately rough reward model: the arm's mean over all contexts.
        arm_mean = 0.05 + 0.4 * 0.5 * np.linspace(0, 1, arms)
        estimates = {
            "ips": ips(rewards, weights),
            "snips": snips(rewards, weights),
            "dr": doubly_robust(rewards, weights, arm_mean[actions], np.full(n, (target * arm_mean).sum())),
        }
        for name, estimate in estimates.items():
            covered[name] += estimate.covers(truth)
    for name, count in covered.items():
        assert abs(count / reps - 0.95) <= 0.025, (name, count / reps)


def test_weights_of_one_give_the_plain_mean_and_full_sample_size() -> None:
    rewards = np.array([0, 1, 0, 0, 1, 1, 0, 0.0])
    for estimate in (ips(rewards, np.ones(8)), snips(rewards, np.ones(8))):
        assert estimate.value == pytest.approx(rewards.mean())
        assert estimate.ess == pytest.approx(8)
        assert estimate.max_weight == 1.0
    dr = doubly_robust(rewards, np.ones(8), np.full(8, 0.3), np.full(8, 0.3))
    assert dr.value == pytest.approx(rewards.mean())
    assert effective_sample_size(np.array([4.0, 0, 0, 0])) == pytest.approx(1.0)


def test_clustered_errors_count_a_visitor_once() -> None:
    rng = np.random.default_rng(2)
    z = rng.normal(size=300)
    psi = (z - z.mean()) / len(z)
    independent, clusters = cluster_se(psi)
    assert clusters == 300
    # Every observation duplicated inside its own cluster: no new information, the same standard error.
    doubled = np.repeat(z, 2)
    clustered, count = cluster_se((doubled - doubled.mean()) / len(doubled), np.repeat(np.arange(300), 2))
    assert count == 300
    assert clustered == pytest.approx(independent)
    naive, _ = cluster_se((doubled - doubled.mean()) / len(doubled))
    assert naive < 0.75 * clustered  # treating duplicates as independent would overstate precision


# ---------------------------------------------------------------------------------------------------------
# Slates: per-decision weights on synthetic rankings (exploration as the service does it)
# ---------------------------------------------------------------------------------------------------------


def synthetic_log(
    exploration: Exploration, slates: int, fixed: int = 0, seed: int = 0, visitors: int = 400
) -> tuple[SlateLog, dict[str, float]]:
    """Slates of 3 from a pool of 25 ranked items; click probability by item appeal and position."""
    rng = np.random.default_rng(seed)
    exam = (1 + np.arange(3)) ** -0.6
    logged: list[LoggedSlate] = []
    truth = {"model": 0.0, "uniform": 0.0, "logging": 0.0}
    for i in range(slates):
        scores = np.sort(rng.normal(size=25))[::-1]
        appeal = 1 / (1 + np.exp(-(scores - 1.5)))
        placement = explore(scores, 3, exploration, rng, fixed)
        clicks = (rng.random(3) < appeal[placement.order] * exam).astype(float)
        logged.append(
            LoggedSlate(
                f"r{i}",
                "home",
                f"v{i % visitors}",
                float(i),
                [f"i{row}" for row in placement.order],
                placement.propensities,
                placement.order.tolist(),
                placement.pool,
                clicks,
            )
        )
        truth["model"] += float(np.mean(appeal[:3] * exam))
        uniform = [appeal[p] if p < fixed else appeal[fixed:].mean() for p in range(3)]
        truth["uniform"] += float(np.mean(np.array(uniform) * exam))
        truth["logging"] += float(np.mean(appeal[placement.order] * exam))
    return SlateLog(slates=logged), {k: v / slates for k, v in truth.items()}


@pytest.mark.parametrize(
    ("exploration", "fixed"),
    [
        (Exploration(mode="epsilon_greedy", epsilon=0.3), 0),
        (Exploration(mode="softmax", temperature=0.7), 0),
        (Exploration(mode="softmax", temperature=0.7), 1),  # a pinned first position
    ],
    ids=["epsilon", "softmax", "softmax-pinned"],
)
def test_slate_estimates_are_unbiased_for_the_served_and_the_uniform_ranking(
    exploration: Exploration, fixed: int
) -> None:
    log, truth = synthetic_log(exploration, 3000, fixed)
    reports = {r.name: r for r in evaluate_policies(log, [ModelRanking(), UniformRandom(), LoggingPolicy()])}
    for name, report in reports.items():
        assert report.slates == 3000 and report.skipped == 0
        for estimator, estimate in report.estimates.items():
            assert abs(estimate.value - truth[name]) <= 4 * estimate.se, (name, estimator, estimate, truth[name])
    logging = reports["logging"].estimates["ips"]
    assert logging.max_weight == 1.0 and logging.ess == pytest.approx(9000)
    assert reports["model"].estimates["ips"].ess < 9000  # the deterministic ranking is further away


def slate(items: list[str], propensities: list[float], ranks: list[int] | None, pool: int | None) -> LoggedSlate:
    return LoggedSlate("r1", "home", "v1", 0.0, items, np.array(propensities), ranks, pool, np.zeros(len(items)))


def test_target_probabilities_follow_the_logged_prefix() -> None:
    explored = slate(["a", "b", "c"], [0.5, 0.4, 0.3], [0, 2, 1], 10)
    assert ModelRanking().probabilities(explored).tolist() == [1.0, 0.0, 1.0]  # b was not the best remaining
    assert ModelRanking(0.2, "epsilon:0.2").probabilities(explored) == pytest.approx(
        [0.8 + 0.2 / 10, 0.2 / 9, 0.8 + 0.2 / 8]
    )
    assert UniformRandom().probabilities(explored) == pytest.approx([1 / 10, 1 / 9, 1 / 8])
    pinned = slate(["pin", "b", "c"], [1.0, 0.4, 0.3], [0, 1, 3], 10)
    assert pinned.fixed == 1
    assert UniformRandom().probabilities(pinned) == pytest.approx([1.0, 1 / 9, 1 / 8])
    popular = ItemLists({("r1", "home"): ["pin", "b", "x", "c"]})
    assert popular.probabilities(pinned).tolist() == [1.0, 1.0, 0.0]
    # A deterministic slate logged without ranks is the ranked list itself; uniform cannot be evaluated on it.
    served = slate(["a", "b"], [1.0, 1.0], None, None)
    assert ModelRanking().supports(served) and ModelRanking().probabilities(served).tolist() == [1.0, 1.0]
    assert not UniformRandom().supports(served)
    assert served.fixed == 0


# ---------------------------------------------------------------------------------------------------------
# Reading logs
# ---------------------------------------------------------------------------------------------------------


def impression(rec: str, item: str, position: int, propensity: float = 0.5, **properties: Any) -> Event:
    return make_event(
        type="impression",
        item_id=item,
        recommendation_id=rec,
        visitor_id="v1",
        properties={"slot": "home", "position": position, "propensity": propensity, "rank": position, "pool": 20}
        | properties,
    )


def click(rec: str, item: str, at: datetime, slot: str | None = "home") -> Event:
    return make_event(
        type="click",
        item_id=item,
        recommendation_id=rec,
        visitor_id="v1",
        timestamp=at.isoformat(),
        properties={"slot": slot} if slot else {},
    )


def test_slates_group_impressions_and_attribute_clicks() -> None:
    shown = [impression("r1", "a", 0), impression("r1", "b", 1), impression("r1", "c", 2)]
    at = shown[0].timestamp
    events = [
        *shown,
        click("r1", "b", at + timedelta(minutes=5)),
        click("r1", "b", at + timedelta(minutes=6)),  # a second click on the same item: one reward
        click("r1", "c", at + timedelta(hours=30)),  # outside the 24 h window
        click("r1", "a", at + timedelta(minutes=1), slot="other"),  # another slot of the same response
        click("r1", "zz", at + timedelta(minutes=1)),  # not shown
        impression("r2", "a", 0),
        impression("r2", "b", 2),  # position 1 is missing: malformed
        impression("r3", "a", 0, propensity=0.0),  # an impossible propensity: malformed
    ]
    log = load_slates(events)
    assert len(log.slates) == 1 and log.malformed == 2
    only = log.slates[0]
    assert only.items == ["a", "b", "c"] and only.rewards.tolist() == [0.0, 1.0, 0.0]
    assert (only.ranks, only.pool) == ([0, 1, 2], 20)
    assert (log.impressions, log.clicks, log.clicks_attributed) == (6, 5, 1)
    with pytest.raises(ValueError, match="no usable slates"):
        evaluate_file(events[6:], ["model"], [])


def test_most_popular_is_replayed_as_of_each_impression_with_the_serving_rules() -> None:
    base = datetime(2026, 3, 1, tzinfo=UTC)
    catalog = [
        make_item(item_id="hot", category="a"),
        make_item(item_id="warm", category="a"),
        make_item(item_id="cool", category="b"),
        make_item(item_id="gone", category="b", stock=0),
        make_item(item_id="late", category="b"),
    ]

    def view(item: str, minutes: float, kind: str = "product_view", visitor: str = "x") -> Event:
        return make_event(
            type=kind, item_id=item, visitor_id=visitor, timestamp=(base + timedelta(minutes=minutes)).isoformat()
        )

    history = [view("hot", 1), view("hot", 2), view("gone", 3), view("gone", 4), view("gone", 5)]
    history += [view("warm", 6), view("warm", 6.5), view("cool", 7), view("hot", 8, "purchase", visitor="v1")]
    history += [view("late", 100 + i) for i in range(8)]  # after the first slate
    first = slate(["?", "?"], [1, 1], None, None)
    first.ts = (base + timedelta(minutes=50)).timestamp()
    at = (base + timedelta(minutes=200)).timestamp()
    second = LoggedSlate("r2", "home", "v2", at, ["?"] * 3, np.ones(3), None, None, np.zeros(3))
    lists = popular_lists([first, second], history, catalog, max_per_category=1)
    # v1 bought "hot"; "gone" is out of stock; one item per category.
    assert lists[("r1", "home")] == ["warm", "cool"]
    assert lists[("r2", "home")] == ["late", "hot"]


# ---------------------------------------------------------------------------------------------------------
# Validation on the simulator: log with exploration, estimate offline, run the targets, compare
# ---------------------------------------------------------------------------------------------------------

SLOT_COUNT = 3
REQUESTS = 600
LOGGING = Exploration(mode="softmax", temperature=0.5, top_n=10)


def copy_serving_state(world: SessionWorld) -> RecommendSettings:
    """A private namespace with the world's catalog, indexes and model (Feast rows are shared read-only), so
    logged impressions never touch the shared world's event log. Only the demo shop's own items are copied:
    other tests upsert items the simulator cannot judge."""
    namespace = unique_name("ope")
    client = make_redis_client(REDIS_URL, False, 5.0)
    source, target = RedisStore(client, world.settings.namespace), RedisStore(client, namespace)
    shop_items = set(world.world.shop.by_id())
    for kind in (Namespace.CATALOG, Namespace.COVISITATION, Namespace.POPULARITY, Namespace.META, Namespace.MODELS):
        rows = dict(source.scan(kind))
        if kind == Namespace.CATALOG:
            rows = {item_id: row for item_id, row in rows.items() if item_id in shop_items}
        if rows:
            target.put_many(kind, rows)
    client.close()
    return RecommendSettings(
        data_dir=world.settings.data_dir,
        redis_url=REDIS_URL,
        namespace=namespace,
        feast_project=world.settings.feast_project,
        environment="test",
        redis_timeout_s=5.0,
    )


@dataclass
class Validation:
    report: dict[str, Any]
    truth: dict[str, float]
    logged: list[Event]


def _service(
    settings: RecommendSettings, repository: RecommendRepository, exploration: Exploration | None, clock: Clock
) -> RecommendService:
    tuned = settings.model_copy(
        update={
            "exploration": {"product": exploration} if exploration else {},
            "exploration_seed": 3,
            "log_impressions": exploration is LOGGING,
        }
    )
    service = RecommendService(tuned, repository, clock=clock)
    service.refresh_cache()
    service.reload_model()
    assert service.model is not None
    return service


@pytest.fixture(scope="module")
def validation(world: SessionWorld, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Validation]:
    settings = copy_serving_state(world)
    simulator = world.world.simulator
    repository = RecommendRepository.open(settings)
    try:
        logging = _service(settings, repository, LOGGING, world.clock)
        greedy = _service(settings, repository, None, world.clock)
        uniform = _service(
            settings, repository, Exploration(mode="epsilon_greedy", epsilon=1.0, top_n=LOGGING.top_n), world.clock
        )
        rng = np.random.default_rng(5)
        contexts = []
        for _ in range(REQUESTS):
            visitor = simulator.visitors[int(rng.integers(len(simulator.visitors)))]
            contexts.append((visitor, world.world.end + timedelta(hours=float(rng.uniform(0, 72)))))

        def serve(service: RecommendService, visitor: Any, now: datetime) -> dict[str, Any]:
            request = RecommendRequest(
                visitor_id=visitor.visitor_id,
                context=RequestContext(device=visitor.device, channel=visitor.channel, city=visitor.city, now=now),
                slots=[SlotRequest(name="home", count=SLOT_COUNT)],
            )
            return service.recommend(request)

        def expected_ctr(visitor: Any, now: datetime, items: list[str]) -> float:
            probabilities = [simulator.click_probability(visitor.visitor_id, it, p, now) for p, it in enumerate(items)]
            return float(np.mean(probabilities))

        clicks: list[Event] = []
        truth = {"logging": 0.0, "model": 0.0, "uniform": 0.0}
        for number, (visitor, now) in enumerate(contexts):
            response = serve(logging, visitor, now)
            items = [item["item_id"] for item in response["slots"][0]["items"]]
            shown = [ShownItem(item, position) for position, item in enumerate(items)]
            # The reaction is drawn from a stream keyed by a stable id (the service's id is random, which made
            # every run draw other clicks), then attributed to the real recommendation id.
            reaction = simulator.respond(visitor.visitor_id, shown, now, f"ope-{number}", "home")
            clicks += [
                event.model_copy(update={"recommendation_id": response["recommendation_id"]})
                for event in reaction
                if event.type is EventType.CLICK
            ]
            # The truth: expected clicks per impression of each policy on the same requests.
            truth["logging"] += expected_ctr(visitor, now, items) / REQUESTS
            for name, service in (("model", greedy), ("uniform", uniform)):
                ranked = [item["item_id"] for item in serve(service, visitor, now)["slots"][0]["items"]]
                truth[name] += expected_ctr(visitor, now, ranked) / REQUESTS
        repository.flush(30)
        impressions = list(repository.logged_events())
        assert len(impressions) == REQUESTS * SLOT_COUNT

        # The file a shop would hand over: behaviour history, impressions and clicks, in time order.
        world_store = RedisStore(make_redis_client(REDIS_URL, False, 5.0), world.settings.namespace)
        # Behaviour only: other tests serve from the shared world and log impressions of their own there.
        history = [
            event
            for event in RecommendRepository(world_store, repository.feature_store).logged_events()
            if event.type not in (EventType.IMPRESSION, EventType.CLICK)
        ]
        world_store.close()
        logged = sorted([*impressions, *clicks], key=lambda e: e.ts)
        path = tmp_path_factory.mktemp("ope") / "logged.jsonl.gz"
        with gzip.open(path, "wb") as handle:
            for event in [*history, *logged]:
                handle.write(orjson.dumps(event.model_dump(mode="json", exclude_none=True)) + b"\n")
        out = path.parent / "report.json"
        env = {
            "REDIS_URL": REDIS_URL,
            "SELARAS_NAMESPACE": settings.namespace,
            "SELARAS_FEAST_PROJECT": settings.feast_project,
            "SELARAS_ENVIRONMENT": "test",
            "SELARAS_DATA_DIR": str(settings.data_dir),  # the CLI sets it; listing it here restores it after
        }
        args = ["evaluate", "policy", str(path), "--data-dir", str(settings.data_dir), "--out", str(out)]
        for target in ("model", "uniform", "popular", "logging"):
            args += ["--target", target]
        result = CliRunner().invoke(cli, args, env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "off-policy CTR" in result.output
        yield Validation(orjson.loads(out.read_bytes()), truth, logged)
    finally:
        repository.close()
        clean_namespace(REDIS_URL, settings.namespace)


@pytest.mark.slow
def test_off_policy_estimates_agree_with_running_the_policy(validation: Validation) -> None:
    report, truth = validation.report, validation.truth
    policies = {policy["policy"]: policy for policy in report["policies"]}
    assert report["slates"] == REQUESTS and report["explored_slates"] > REQUESTS / 2  # the rest: pins fill the slot
    covered = 0
    for name in ("model", "uniform", "logging"):
        for estimator in ("ips", "snips", "dr"):
            estimate = policies[name][estimator]
            low, high = estimate["ci95"]
            covered += low <= truth[name] <= high
            # Never further than three standard errors; the 95% interval covers it almost every time.
            assert abs(estimate["value"] - truth[name]) <= 3 * estimate["se"], (name, estimator, estimate, truth)
    assert covered >= 7, (covered, policies, truth)
    # The logging policy evaluates itself with weights of one: the observed CTR.
    assert policies["logging"]["ips"]["value"] == pytest.approx(report["logged_ctr"])
    assert policies["logging"]["ips"]["max_weight"] == 1.0
    # The served ranking is close to the logging policy: a usable effective sample. Most popular is
    # estimated too, with its (smaller) support shown rather than hidden.
    assert policies["model"]["dr"]["ess"] > 40
    popular = policies["popular"]["ips"]
    assert 0 < popular["ess"] < REQUESTS * SLOT_COUNT and popular["max_weight"] > 1
    print({name: round(value, 4) for name, value in truth.items()}, {n: p["dr"]["value"] for n, p in policies.items()})


@pytest.mark.slow
def test_logged_impressions_carry_position_propensity_rank_and_pool(validation: Validation) -> None:
    by_slate: dict[str, list[Event]] = {}
    for event in validation.logged:
        if event.type is EventType.IMPRESSION:
            by_slate.setdefault(event.recommendation_id or "", []).append(event)
    assert len(by_slate) == REQUESTS
    for events in by_slate.values():
        events.sort(key=lambda e: int(str(e.properties["position"])))
        assert [e.properties["position"] for e in events] == list(range(SLOT_COUNT))
        ranks = [e.properties["rank"] for e in events]
        assert len(set(ranks)) == SLOT_COUNT
        for event in events:
            propensity = event.properties["propensity"]
            assert isinstance(propensity, float) and 0 < propensity <= 1
            pool = event.properties["pool"]
            assert isinstance(pool, int) and 0 <= int(str(event.properties["rank"])) < pool <= 10 + 8  # + pins


def test_intervals_cluster_by_visitor_or_by_recommendation() -> None:
    log, _ = synthetic_log(Exploration(mode="epsilon_greedy", epsilon=0.5), 300, visitors=30)
    by_visitor = evaluate_policies(log, [ModelRanking()], cluster="visitor")[0].estimates["ips"]
    by_recommendation = evaluate_policies(log, [ModelRanking()], cluster="recommendation")[0].estimates["ips"]
    assert by_visitor.value == by_recommendation.value
    assert (by_visitor.clusters, by_recommendation.clusters) == (30, 300)
    assert math.isfinite(by_visitor.se) and by_visitor.se != by_recommendation.se
