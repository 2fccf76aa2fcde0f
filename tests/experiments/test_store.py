"""One suite for the experiment store, run against real Redis (Lua) and SQLite: the stored sums must equal
the batch sums of the visitors' final values, whatever the order and repetition of updates."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import redis
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from services.cli import app as cli_app
from services.common.errors import StorageUnavailable
from services.common.settings import CommonSettings
from services.common.storage import event_dedupe_ttl_s, make_redis_client
from services.experiments.stats.capping import covariate_histogram_from_values, histogram_from_values
from services.experiments.stats.intervals import ArmSums
from services.experiments.store import open_experiment_store
from services.experiments.store.base import ErasedVisitor, ExperimentStore, ExposureWrite, OutcomeWrite, Reindexed
from services.experiments.store.redis_store import RedisExperimentStore
from services.experiments.store.sqlite_store import SqliteExperimentStore
from services.experiments.store.sums import count_increments, parse_covariate_histogram, parse_histogram
from tests.conftest import REDIS_URL, RedisServer, clean_namespace, unique_name

EXP = "exp-a@1"
T0 = 1_790_000_000.0


@pytest.fixture(params=["redis", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ExperimentStore]:
    if request.param == "redis":
        namespace = unique_name("es")
        backend: ExperimentStore = RedisExperimentStore(make_redis_client(REDIS_URL, False, 2.0), namespace)
        yield backend
        backend.close()
        clean_namespace(REDIS_URL, namespace)
    else:
        backend = SqliteExperimentStore(tmp_path / "exp.db")
        yield backend
        backend.close()


def expose(store: ExperimentStore, visitor: str, arm: str, ts: float, shown: dict[str, int], **extra: Any) -> Any:
    denominators = {"all": {"ctr": float(sum(shown.values()))}}
    denominators.update({f"slot:{slot}": {"ctr": float(n)} for slot, n in shown.items()})
    return store.record_exposure(
        ExposureWrite(EXP, visitor, arm, extra.pop("segment", "hemat"), ts, denominators, **extra)
    )


def outcome(store: ExperimentStore, visitor: str, event_id: str, ts: float, **values: Any) -> Any:
    slot = values.pop("slot", None)
    options = {k: values.pop(k) for k in ("expected_arm", "lower", "upper", "window_s") if k in values}
    write = OutcomeWrite(EXP, visitor, event_id, ts, values, f"slot:{slot}" if slot else None, **options)
    return store.record_outcomes([write])[0]


def test_random_updates_match_batch_sums_per_group(store: ExperimentStore) -> None:
    rng = random.Random(5)
    visitors = [f"v{i}" for i in range(40)]
    arms = {v: rng.choice(["control", "treatment"]) for v in visitors}
    truth: dict[tuple[str, str], dict[str, float]] = {}  # (visitor, group) -> running values
    exposed_slots: dict[str, set[str]] = {}
    # CUPED covariates: a pre-period for 3 visitors in 4 (the others are new); only the first exposure's
    # values count (later exposures send different ones, which must be ignored).
    first_covariates: dict[str, dict[str, float] | None] = {}
    for step in range(400):
        visitor = rng.choice(visitors)
        ts = T0 + step
        if rng.random() < 0.4 or visitor not in exposed_slots:
            shown = {slot: rng.randint(0, 6) for slot in rng.sample(["home", "hero", "cta"], rng.randint(1, 3))}
            has_pre = int(visitor[1:]) % 4 != 0
            covariates = (
                {"ctr": float(rng.randint(0, 5)), "conversion": float(rng.randint(0, 1)), "revenue": rng.random() * 9}
                if has_pre
                else None
            )
            first_covariates.setdefault(visitor, covariates)
            assert expose(store, visitor, arms[visitor], ts, shown, covariates=covariates).status == "ok"
            exposed_slots.setdefault(visitor, set()).update(shown)
            for group, n in [("all", sum(shown.values())), *((f"slot:{s}", c) for s, c in shown.items())]:
                row = truth.setdefault((visitor, group), {"ctr_x": 0, "ctr_y": 0, "conversion": 0, "revenue": 0})
                row["ctr_y"] += n
        else:
            slot = rng.choice(sorted(exposed_slots[visitor]))
            kind = rng.choice(["click", "purchase"])
            values = (
                {"ctr": 1.0} if kind == "click" else {"conversion": 1.0, "revenue": float(rng.randint(1, 9) * 1000)}
            )
            result = outcome(store, visitor, f"e{step}", ts, slot=slot, **values)
            assert result.status == "ok" and result.arm == arms[visitor]
            for group in ("all", f"slot:{slot}"):
                row = truth[(visitor, group)]
                if kind == "click":
                    row["ctr_x"] += 1
                else:
                    row["conversion"] = 1
                    row["revenue"] += values["revenue"]
            # Re-delivery of the same event (at-least-once) changes nothing.
            assert outcome(store, visitor, f"e{step}", ts, slot=slot, **values).status == "duplicate"

    sums = store.sums(EXP)
    for arm in ("control", "treatment"):
        for group in ("all", "slot:home", "slot:hero", "slot:cta"):
            row_visitors = [v for (v, g) in truth if g == group and arms[v] == arm]
            rows = [truth[(v, group)] for v in row_visitors]
            stored = sums[arm][group]
            assert stored["n"] == len(rows)
            expected = ArmSums.from_values([r["ctr_x"] for r in rows], [r["ctr_y"] for r in rows])
            got = stored["ctr"]
            assert got["y"] == pytest.approx(expected.sum_y) and got["y2"] == pytest.approx(expected.sum_y2)
            assert got.get("x", 0) == pytest.approx(expected.sum_x)
            assert got.get("x2", 0) == pytest.approx(expected.sum_x2)
            assert got.get("xy", 0) == pytest.approx(expected.sum_xy)
            revenue = ArmSums.from_values([r["revenue"] for r in rows])
            assert stored.get("revenue", {}).get("x2", 0) == pytest.approx(revenue.sum_x2)
            assert stored.get("conversion", {}).get("x", 0) == sum(r["conversion"] for r in rows)
            # CUPED sums: Σc, Σc², visitors with a pre-period, Σc·x and Σx over them (Σc·y, Σy for ratios).
            for metric, x_key in (("ctr", "ctr_x"), ("conversion", "conversion"), ("revenue", "revenue")):
                got = stored.get(metric, {})
                pre = [
                    (first_covariates[v][metric], r)
                    for (v, g), r in truth.items()  # type: ignore[index]
                    if g == group and arms[v] == arm and first_covariates[v] is not None
                ]
                assert got.get("cn", 0) == len(pre)
                assert got.get("c", 0) == pytest.approx(sum(c for c, _ in pre))
                assert got.get("c2", 0) == pytest.approx(sum(c * c for c, _ in pre))
                assert got.get("cx", 0) == pytest.approx(sum(c * r[x_key] for c, r in pre))
                assert got.get("cxp", 0) == pytest.approx(sum(r[x_key] for _, r in pre))
                if metric == "ctr":
                    assert got.get("cy", 0) == pytest.approx(sum(c * r["ctr_y"] for c, r in pre))
                    assert got.get("cyp", 0) == pytest.approx(sum(r["ctr_y"] for _, r in pre))
            # Revenue's log-bucket histogram (for capping) equals the batch histogram of the final values;
            # buckets visitors moved out of are empty (float residue of the ± increments aside).
            histogram = parse_histogram(stored.get("revenue", {}))
            expected_histogram = histogram_from_values([r["revenue"] for r in rows])
            assert {k for k, v in histogram.items() if v[0] > 0} == set(expected_histogram)
            for k, (count, sx, sx2) in histogram.items():
                want = expected_histogram.get(k, (0.0, 0.0, 0.0))
                assert count == want[0]
                assert sx == pytest.approx(want[1], abs=1e-6) and sx2 == pytest.approx(want[2], rel=1e-9, abs=1e-3)
            # Its per-bucket covariate sums (CUPED on capped revenue) cover the visitors with a pre-period.
            covariate_histogram = parse_covariate_histogram(stored.get("revenue", {}))
            expected_covariates = covariate_histogram_from_values(
                [r["revenue"] for r in rows],
                [first_covariates[v]["revenue"] if first_covariates[v] else 0.0 for v in row_visitors],
                [first_covariates[v] is None for v in row_visitors],
            )
            assert {k for k, v in covariate_histogram.items() if v[0] > 0} == set(expected_covariates)
            for k, got_bucket in covariate_histogram.items():
                want_bucket = expected_covariates.get(k, (0.0, 0.0, 0.0, 0.0))
                assert got_bucket[0] == want_bucket[0]
                np.testing.assert_allclose(got_bucket[1:], want_bucket[1:], rtol=1e-9, atol=1e-3)
        # The persona group of every visitor here is "hemat": it mirrors the whole arm.
        assert sums[arm]["seg:hemat"] == sums[arm]["all"]

    # The per-day increments add up to the totals (they feed the cumulative chart).
    days = store.days(EXP)
    for arm in ("control", "treatment"):
        assert sum(d[arm]["n"] for d in days.values() if arm in d) == sums[arm]["all"]["n"]
        total_y2 = sum(d[arm]["ctr"]["y2"] for d in days.values() if arm in d)
        assert total_y2 == pytest.approx(sums[arm]["all"]["ctr"]["y2"])


def test_attribution_rules(store: ExperimentStore) -> None:
    assert outcome(store, "ghost", "e0", T0, ctr=1.0).status == "not_exposed"
    applied = expose(store, "v1", "treatment", T0, {"home": 4}, segment="Pemburu diskon")
    assert applied.status == "ok"
    assert applied.increments["all|n"] == 1 and applied.increments["slot:home|ctr|y"] == 4
    # Sticky: the same visitor cannot show up in another arm.
    assert expose(store, "v1", "control", T0 + 1, {"home": 4}).status == "arm_conflict"
    assert outcome(store, "v1", "e1", T0 + 5, ctr=1.0, expected_arm="control").status == "arm_mismatch"
    assert outcome(store, "v1", "e2", T0 + 5, ctr=1.0, lower=T0 + 10).status == "outside_window"
    assert outcome(store, "v1", "e3", T0 + 3 * 3600, conversion=1.0, window_s=3600).status == "outside_window"
    assert outcome(store, "v1", "e4", T0 - 60, conversion=1.0, window_s=3600).status == "outside_window"
    within = outcome(store, "v1", "e5", T0 + 1800, conversion=1.0, window_s=3600)
    assert within.status == "ok" and within.increments["all|conversion|x"] == 1
    # Binary metrics count a visitor once; additive ones keep adding.
    again = outcome(store, "v1", "e6", T0 + 1900, conversion=1.0, revenue=5000.0, window_s=3600)
    assert "all|conversion|x" not in again.increments and again.increments["all|revenue|x"] == 5000
    # The persona is frozen at the first exposure (pre-treatment), later exposures keep it.
    expose(store, "v1", "treatment", T0 + 4000, {"home": 2}, segment="Sultan")
    sums = store.sums(EXP)["treatment"]
    assert "seg:Sultan" not in sums and sums["seg:Pemburu diskon"]["n"] == 1
    assert sums["all"]["ctr"]["y"] == 6
    heads = store.visitor_heads([EXP, "other@1"], ["v1", "v2"])
    assert list(heads) == [(EXP, "v1")]
    assert (heads[(EXP, "v1")].first, heads[(EXP, "v1")].last) == (T0, T0 + 4000)
    assert store.forget_visitor([EXP], "v1") == 1
    assert store.visitor_heads([EXP], ["v1"]) == {}


def test_records_and_registry_round_trip(store: ExperimentStore) -> None:
    record = {"visitor_id": "v1", "ts": T0, "slots": {"home": ["p1", "p2"]}}
    expose(store, "v1", "control", T0, {"home": 2}, recommendation_id="rec-1", record=record)
    assert store.exposure_records(["other@1", EXP], ["rec-1", "rec-2"]) == {"rec-1": (EXP, record)}
    store.publish_registry({"exp-a": {"id": EXP, "window_s": 3600}})
    store.publish_registry({"exp-b": {"id": "exp-b@1"}})
    assert store.registry() == {"exp-b": {"id": "exp-b@1"}}


def test_an_exposure_sent_again_for_the_same_recommendation_adds_nothing(store: ExperimentStore) -> None:
    record = {"visitor_id": "v1", "ts": T0, "slots": {"home": ["p1", "p2"]}}
    assert expose(store, "v1", "control", T0, {"home": 2}, recommendation_id="rec-1", record=record).status == "ok"
    again = expose(store, "v1", "control", T0, {"home": 2}, recommendation_id="rec-1", record=record)
    assert again.status == "duplicate" and again.increments == {}
    assert expose(store, "v1", "control", T0 + 5, {"home": 1}, recommendation_id="rec-2", record=record).status == "ok"
    group = store.sums(EXP)["control"]["all"]
    assert (group["n"], group["ctr"]["y"]) == (1.0, 3.0)


@pytest.mark.parametrize("backend", ["redis", "sqlite"])
def test_counted_outcome_events_are_remembered_for_the_hot_window(
    backend: str, settings_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """The store opened from the settings forgets a counted event id when the log forgets it (the hot window),
    not after a fixed 14 days: here a window of one second."""
    redis_url = REDIS_URL if backend == "redis" else None
    short: CommonSettings = settings_factory(
        redis_url=redis_url, data_dir=tmp_path / "short", hot_window_days=1 / 86400
    )
    default: CommonSettings = settings_factory(redis_url=redis_url, data_dir=tmp_path / "default")
    assert event_dedupe_ttl_s(short) == 1 and event_dedupe_ttl_s(default) == 8 * 86400
    stores = [open_experiment_store(short), open_experiment_store(default)]
    try:
        for store in stores:
            assert expose(store, "v1", "treatment", T0, {"home": 1}).status == "ok"
            assert outcome(store, "v1", "e1", T0 + 5, revenue=10.0).status == "ok"
            assert outcome(store, "v1", "e1", T0 + 5, revenue=10.0).status == "duplicate"
        time.sleep(1.3)
        short_store, default_store = stores
        # Past the window the log would take the event again and fold it again: so does this store.
        assert outcome(short_store, "v1", "e1", T0 + 5, revenue=10.0).status == "ok"
        assert outcome(default_store, "v1", "e1", T0 + 5, revenue=10.0).status == "duplicate"
    finally:
        for store in stores:
            store.close()


def test_a_timed_out_exposure_script_is_counted_once(redis_server: RedisServer) -> None:
    """A stalled Redis (SIGSTOP) makes the exposure script time out on the client while Redis keeps it queued.
    The client must not send it again (a retry after a timeout ran it twice), and an exposure re-sent with the
    same recommendation id (a caller that retries what it saw fail) adds nothing."""
    store = RedisExperimentStore(make_redis_client(redis_server.url, False, 0.2), unique_name("es"))
    # Connected, the script loaded (a stalled EVALSHA of an unknown script would only fail with NOSCRIPT) and the
    # experiment's id registered (its first exposure in a process adds it to the experiment ids first).
    store.record_exposure(ExposureWrite(EXP, "v0", "a", "s", T0, {"all": {"ctr": 1.0}}))
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(StorageUnavailable):
            expose(store, "v1", "treatment", T0, {"home": 3}, recommendation_id="rec-slow")
        took = time.monotonic() - started
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    # Whatever was queued has run once Redis answers again.
    assert store.visitor_heads([EXP], ["v1"])[(EXP, "v1")].arm == "treatment"
    assert expose(store, "v1", "treatment", T0 + 1, {"home": 3}, recommendation_id="rec-slow").status == "duplicate"
    group = store.sums(EXP)["treatment"]["all"]
    assert (group["n"], group["ctr"]["y"]) == (1.0, 3.0), "the exposure was counted more than once"
    assert took < 0.35, f"the client waited {took:.2f} s: the timed-out script was sent again"
    assert expose(store, "v1", "treatment", T0 + 2, {"home": 2}, recommendation_id="rec-next").status == "ok"
    assert store.sums(EXP)["treatment"]["all"]["ctr"]["y"] == 5.0
    store.close()


def test_concurrent_writers_lose_nothing(store: ExperimentStore) -> None:
    """Atomic updates: 4 threads updating the same visitors give the same sums as one thread would."""
    visitors = [f"c{i}" for i in range(10)]
    for v in visitors:
        expose(store, v, "control", T0, {"home": 1})

    def work(worker: int) -> None:
        for i in range(50):
            visitor = visitors[(worker + i) % len(visitors)]
            expose(store, visitor, "control", T0 + i, {"home": 1})
            outcome(store, visitor, f"w{worker}-{i}", T0 + i, ctr=1.0)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Every visitor got 20 more impressions and 20 clicks: y = 21, x = 20 each.
    ctr = store.sums(EXP)["control"]["all"]["ctr"]
    expected = ArmSums.from_values([20.0] * 10, [21.0] * 10)
    assert (ctr["x"], ctr["y"]) == (expected.sum_x, expected.sum_y)
    assert ctr["x2"] == pytest.approx(expected.sum_x2) and ctr["y2"] == pytest.approx(expected.sum_y2)
    assert ctr["xy"] == pytest.approx(expected.sum_xy)


def test_applied_cuped_increments_reach_the_prometheus_counters(store: ExperimentStore) -> None:
    """The CUPED sums are exported as counters, so Prometheus can recompute the adjustment."""
    experiment = unique_name("cuped")

    def value(name: str, metric: str) -> float:
        labels = {"experiment": experiment, "arm": "treatment", "metric": metric, "slot": "all"}
        return REGISTRY.get_sample_value(name, labels) or 0.0

    applied = expose(store, "v1", "treatment", T0, {"home": 3}, covariates={"revenue": 2.0, "ctr": 4.0})
    count_increments(experiment, "treatment", applied.increments)
    applied = outcome(store, "v1", "e1", T0 + 1, revenue=5000.0, ctr=1.0)
    count_increments(experiment, "treatment", applied.increments)
    assert value("selaras_experiment_covariate_sum_total", "revenue") == 2.0
    assert value("selaras_experiment_covariate_squares_sum_total", "revenue") == 4.0
    assert value("selaras_experiment_covariate_visitors_total", "revenue") == 1.0
    assert value("selaras_experiment_covariate_cross_sum_total", "revenue") == 10000.0
    assert value("selaras_experiment_value_sum_with_pre_period_total", "revenue") == 5000.0
    assert value("selaras_experiment_covariate_denominator_cross_sum_total", "ctr") == 12.0
    assert value("selaras_experiment_denominator_sum_with_pre_period_total", "ctr") == 3.0


def test_erasure_reaches_every_experiment_and_its_exposure_records(store: ExperimentStore) -> None:
    """Running values and exposure records of the visitor in any experiment (in the registry or not) go; an
    id with glob characters is matched literally; other visitors' records stay, even one that starts with the
    same id."""
    visitor = "v[1]*"
    for experiment_id in (EXP, "removed@3"):
        for who in (visitor, "v[1]*x", "v11"):
            record = {"visitor_id": who, "ts": T0, "slots": {}}
            store.record_exposure(
                ExposureWrite(experiment_id, who, "a", "s", T0, {"all": {"ctr": 1.0}}, f"{experiment_id}-{who}", record)
            )
    erased = store.erase_visitor(visitor)
    assert (erased.running_values, erased.exposure_records) == (2, 2)
    assert store.visitor_heads([EXP, "removed@3"], [visitor]) == {}
    assert len(store.visitor_heads([EXP, "removed@3"], ["v[1]*x", "v11"])) == 4
    ids = [f"{e}-{w}" for e in (EXP, "removed@3") for w in (visitor, "v[1]*x", "v11")]
    kept = store.exposure_records([EXP, "removed@3"], ids)
    assert sorted(kept) == sorted(i for i in ids if not i.endswith(f"-{visitor}"))
    assert store.sums(EXP)["a"]["all"]["n"] == 3  # the anonymous sums stay
    assert store.erase_visitor(visitor) == erased.__class__(0, 0)  # idempotent


def expose_with_record(store: ExperimentStore, experiment_id: str, visitor: str, recommendation_id: str) -> None:
    record = {"visitor_id": visitor, "ts": T0, "slots": {"home": ["p1"]}}
    write = ExposureWrite(experiment_id, visitor, "a", "s", T0, {"all": {"ctr": 1.0}}, recommendation_id, record)
    assert store.record_exposure(write).status == "ok"


def test_erasure_and_export_find_exactly_the_visitors_data_in_every_experiment(store: ExperimentStore) -> None:
    """Three experiments (one in the registry, one disabled, one removed from the config): the visitor has
    running values in all three and exposure records in two; others (one whose id extends the visitor's, one
    with "}:v:" in it) have their own. Export lists exactly the visitor's experiments, erasure removes exactly
    the visitor's values and records, and everybody else's stay."""
    visitor, others = "shopper-7", ["shopper-77", "x}:v:shopper-7", "other"]
    running, disabled, removed = "running@1", "disabled@2", "removed@3"
    store.publish_registry({"running": {"id": running}})
    for n in range(3):
        expose_with_record(store, running, visitor, f"run-{visitor}-{n}")
    store.record_exposure(ExposureWrite(disabled, visitor, "a", "s", T0, {"all": {"ctr": 1.0}}))
    expose_with_record(store, removed, visitor, f"rem-{visitor}")
    for other in others:
        expose_with_record(store, running, other, f"run-{other}")
        expose_with_record(store, removed, other, f"rem-{other}")
    store.record_exposure(ExposureWrite(disabled, "other", "a", "s", T0, {"all": {"ctr": 1.0}}))

    assert store.visitor_experiments(visitor) == [disabled, removed, running]
    assert store.visitor_experiments("shopper-77") == [removed, running]
    assert store.visitor_experiments("nobody") == []

    assert store.erase_visitor(visitor) == ErasedVisitor(running_values=3, exposure_records=4)
    assert store.visitor_experiments(visitor) == []
    assert store.visitor_heads([running, disabled, removed], [visitor]) == {}
    everyone = [running, disabled, removed]
    assert store.visitor_experiments("other") == [disabled, removed, running]
    assert len(store.visitor_heads(everyone, others)) == 7  # 3 visitors x 2 experiments + "other" in disabled
    kept_ids = [f"{prefix}-{w}" for prefix in ("run", "rem") for w in others]
    erased_ids = [f"run-{visitor}-{n}" for n in range(3)] + [f"rem-{visitor}"]
    found = store.exposure_records(everyone, kept_ids + erased_ids)
    assert sorted(found) == sorted(kept_ids)
    assert all(record["visitor_id"] == found_id.split("-", 1)[1] for found_id, (_, record) in found.items())
    assert store.erase_visitor(visitor) == ErasedVisitor(0, 0)
    # The visitor exposed again after the erasure is a new visitor, found again.
    expose_with_record(store, removed, visitor, f"rem-{visitor}-again")
    assert store.visitor_experiments(visitor) == [removed]
    assert store.erase_visitor(visitor) == ErasedVisitor(1, 1)


def test_an_exposure_record_must_name_the_exposed_visitor(store: ExperimentStore) -> None:
    """Records are indexed under the exposure's visitor: one naming another visitor would escape that
    visitor's erasure."""
    record = {"visitor_id": "someone-else", "ts": T0, "slots": {}}
    with pytest.raises(ValueError, match="must name the exposed visitor"):
        store.record_exposure(ExposureWrite(EXP, "v1", "a", "s", T0, {"all": {"ctr": 1.0}}, "rec-1", record))
    assert store.visitor_experiments("v1") == []


def command_calls(client: redis.Redis) -> dict[str, int]:
    stats = cast(dict[str, dict[str, Any]], client.info("commandstats"))
    # The measuring itself (CONFIG RESETSTAT, INFO) and connection set-up are not the store's work.
    skip = {"config|resetstat", "info", "client|setinfo", "hello", "ping"}
    calls = {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()}
    return {name: n for name, n in calls.items() if name not in skip}


def test_erasure_and_export_cost_what_the_visitor_has_not_what_redis_holds(redis_server: RedisServer) -> None:
    """On a database of 5,000 unrelated keys and 300 other visitors' exposure records, export and erasure
    issue no SCAN or KEYS, and exactly the commands the visitor's own data calls for."""
    client = redis.Redis.from_url(redis_server.url)
    store = RedisExperimentStore(make_redis_client(redis_server.url, False, 2.0), unique_name("es"))
    for start in range(0, 5_000, 1_000):
        client.mset({f"unrelated:{i}": "x" for i in range(start, start + 1_000)})
    experiments = ["one@1", "two@1", "three@1"]
    for i in range(300):
        expose_with_record(store, experiments[i % 3], f"other-{i}", f"rec-other-{i}")
    for experiment_id in experiments[:2]:
        expose_with_record(store, experiment_id, "v1", f"rec-{experiment_id}-a")
        expose_with_record(store, experiment_id, "v1", f"rec-{experiment_id}-b")
    assert cast(int, client.dbsize()) > 5_900

    client.config_resetstat()
    assert store.visitor_experiments("v1") == ["one@1", "two@1"]
    # One SMEMBERS, one EXISTS per experiment.
    assert command_calls(client) == {"smembers": 1, "exists": 3}

    client.config_resetstat()
    assert store.erase_visitor("v1") == ErasedVisitor(running_values=2, exposure_records=4)
    # One SMEMBERS, per experiment a ZRANGE of the visitor's records and a DEL of their values, per record a
    # DEL and a ZREM: 3 experiments and 4 records.
    assert command_calls(client) == {"smembers": 1, "zrange": 3, "del": 3 + 4, "zrem": 4}
    assert store.visitor_experiments("v1") == []
    assert len(store.visitor_heads(experiments, [f"other-{i}" for i in range(300)])) == 300
    assert client.get("unrelated:4999") == b"x"
    store.close()
    client.close()


def test_reindex_finds_what_an_earlier_version_wrote(redis_server: RedisServer) -> None:
    """An upgraded namespace: running values and records written before the indexes existed (simulated by
    removing the indexes) are invisible to erasure and export until `reindex` has walked the keyspace once;
    then they are found exactly, each record under the visitor it names."""
    namespace = unique_name("es")
    client = redis.Redis.from_url(redis_server.url)
    old = RedisExperimentStore(make_redis_client(redis_server.url, False, 2.0), namespace)
    for experiment_id in ("kept@1", "removed@2"):
        for visitor in ("v1", "v1*", "v2"):
            expose_with_record(old, experiment_id, visitor, f"{experiment_id}-{visitor}")
    old.record_exposure(ExposureWrite("values-only@1", "v1", "a", "s", T0, {"all": {"ctr": 1.0}}))
    old.close()
    indexes = list(client.scan_iter(match="{" + namespace + ":exp:*}:vrecs:*"))
    assert len(indexes) == 6
    client.delete(f"{namespace}:experiments:ids", *indexes)

    store = RedisExperimentStore(make_redis_client(redis_server.url, False, 2.0), namespace)
    assert store.visitor_experiments("v1") == []
    assert store.reindex() == Reindexed(experiments=3, exposure_records=6)
    # The index outlives the record it lists (read first: both only shrink).
    index_ttl = cast(int, client.pttl("{" + namespace + ":exp:kept@1}:vrecs:v1"))
    assert index_ttl >= cast(int, client.pttl("{" + namespace + ":exp:kept@1}:rec:kept@1-v1")) > 0
    assert store.visitor_experiments("v1") == ["kept@1", "removed@2", "values-only@1"]
    assert store.erase_visitor("v1") == ErasedVisitor(running_values=3, exposure_records=2)
    assert sorted(store.exposure_records(["kept@1", "removed@2"], ["kept@1-v1*", "removed@2-v1*", "kept@1-v2"])) == [
        "kept@1-v1*",
        "kept@1-v2",
        "removed@2-v1*",
    ]
    # Safe to run again: it lists the 4 records left under the same visitors.
    assert store.reindex() == Reindexed(experiments=3, exposure_records=4)
    store.close()
    client.close()


def test_sqlite_indexes_the_records_of_an_older_file_by_visitor(tmp_path: Path) -> None:
    """A file written before exp_records had its visitor id: opening it adds the column and fills it from the
    stored records, and a record a process of the previous version writes afterwards (no visitor id) is still
    erased."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE exp_records (exp TEXT NOT NULL, rec_id TEXT NOT NULL, data TEXT NOT NULL,"
        " expires_at REAL NOT NULL, PRIMARY KEY (exp, rec_id))"
    )
    old_rows = [("e@1", f"r-{who}", json.dumps({"visitor_id": who}), 9e9) for who in ("v1", "v1%", "v2")]
    conn.executemany("INSERT INTO exp_records VALUES (?, ?, ?, ?)", [*old_rows, ("e@1", "broken", "{not json", 9e9)])
    conn.commit()
    conn.close()

    store = SqliteExperimentStore(path)
    store.close()
    store = SqliteExperimentStore(path)  # a second open has nothing left to fill
    assert store.reindex() == Reindexed(experiments=1, exposure_records=0)
    late = sqlite3.connect(path)
    late.execute("INSERT INTO exp_records (exp, rec_id, data, expires_at) VALUES (?, ?, ?, ?)", (
        "gone@1", "r-late", json.dumps({"visitor_id": "v1"}), 9e9))  # fmt: skip
    late.commit()
    late.close()
    assert store.erase_visitor("v1") == ErasedVisitor(running_values=0, exposure_records=2)
    kept = store.exposure_records(["e@1", "gone@1"], ["r-v1", "r-v1%", "r-v2", "r-late"])
    assert sorted(kept) == ["r-v1%", "r-v2"]
    store.close()
    rows = sqlite3.connect(path).execute("SELECT rec_id, visitor_id FROM exp_records ORDER BY rec_id").fetchall()
    assert rows == [("broken", None), ("r-v1%", "v1%"), ("r-v2", "v2")]


def test_the_reindex_command_indexes_the_configured_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`selaras experiments reindex` reaches the store the services use (REDIS_URL, SELARAS_NAMESPACE)."""
    namespace = unique_name("es")
    store = RedisExperimentStore(make_redis_client(REDIS_URL, False, 2.0), namespace)
    expose_with_record(store, "old@1", "v1", "rec-1")
    # As an earlier version left it: no experiment ids, no index of the visitor's records.
    store.client.delete(store.ids_key, "{" + namespace + ":exp:old@1}:vrecs:v1")
    assert store.visitor_experiments("v1") == []
    for name, value in {"REDIS_URL": REDIS_URL, "SELARAS_NAMESPACE": namespace}.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(cli_app, ["experiments", "reindex", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "1 experiments known to erasure and export, 1 exposure records indexed" in " ".join(result.output.split())
    assert store.erase_visitor("v1") == ErasedVisitor(running_values=1, exposure_records=1)
    store.close()
    clean_namespace(REDIS_URL, namespace)


def test_sqlite_erasure_and_export_read_no_whole_table(tmp_path: Path) -> None:
    """Every statement erasure and export run on SQLite is an index search: none reads a whole table."""
    store = SqliteExperimentStore(tmp_path / "exp.db")
    for i in range(20):
        expose_with_record(store, f"e{i % 3}@1", f"v{i % 5}", f"rec-{i}")
    statements: list[str] = []
    store._conn.set_trace_callback(statements.append)
    assert store.visitor_experiments("v1") == ["e0@1", "e1@1", "e2@1"]
    assert store.erase_visitor("v1") == ErasedVisitor(running_values=3, exposure_records=4)
    store._conn.set_trace_callback(None)
    reads = [s for s in statements if s.split()[0] in ("SELECT", "DELETE", "UPDATE")]
    assert len(reads) == 4
    for statement in reads:
        plan = " ".join(row[3] for row in store._conn.execute("EXPLAIN QUERY PLAN " + statement))
        assert "SCAN" not in plan and "SEARCH" in plan, (statement, plan)
    store.close()
