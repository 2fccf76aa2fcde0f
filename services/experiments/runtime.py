"""Experiments at serve time: sticky assignment, exposure recording, reports on demand and their gauges.

- Assignment is GrowthBook's hash v2 (services/experiments/assignment.py): deterministic and sticky per
  visitor, seed and bucket version; a global holdout never gets personalization and is not compared.
- Before the arm: the experiment's namespace range (mutual exclusion) and its targeting (targeting.py). A
  visitor who fails the targeting but was already exposed keeps the arm (frozen at exposure): only then is
  the store asked, for the arm it recorded with the visitor's first exposure.
- Exposures are counted per visitor in the experiment store (services/experiments/store/);
  outcomes are attributed by the profile service (services/experiments/attribution.py).
- Reports are computed from the stored sums by services/experiments/report.py.
- The configuration is the shared record of config_store.py: the refresher thread polls its generation every
  `CONFIG_POLL_S` and swaps the runtime's view (config, by_key, enabled) in one assignment, so every replica
  follows an admin change within seconds, without a restart.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from services.common.clock import SYSTEM_CLOCK, Clock
from services.common.errors import StorageUnavailable
from services.common.settings import CommonSettings
from services.experiments.assignment import HOLDOUT_ARM, assign, in_namespace
from services.experiments.config import ArmChoice, ExperimentConfig, ExperimentsFile, load_config
from services.experiments.config_store import ExperimentConfigStore, StoredConfig
from services.experiments.report import build_report
from services.experiments.store import open_experiment_store
from services.experiments.store.base import ExperimentStore, ExposureWrite
from services.experiments.store.sums import ALL, count_increments, touch_counters
from services.experiments.targeting import UNKNOWN, TargetingContext

log = logging.getLogger(__name__)

# How often every replica reads the stored configuration record (one GET) to pick up admin changes.
CONFIG_POLL_S = 2.0

EXPERIMENT_REQUESTS = Counter(
    "selaras_experiment_requests", "Requests assigned to an experiment arm", ["experiment", "arm"]
)
EXPERIMENT_SERVED = Counter(
    "selaras_experiment_served",
    "Requests of an arm that were answered and recorded (requests - served = failures)",
    ["experiment", "arm"],
)
TARGETING = Counter(
    "selaras_experiment_targeting",
    "Targeted experiments' admission of assigned visitors: matched, frozen (failed the conditions but already"
    " exposed, so kept in the arm), excluded (served the default), unknown (the store could not say)",
    ["experiment", "result"],
)
EXPOSURES_DROPPED = Counter(
    "selaras_experiment_exposures_dropped", "Exposures not recorded (store unavailable, arm conflict)", ["experiment"]
)
RANKING_SECONDS = Histogram(
    "selaras_experiment_ranking_seconds",
    "Time to rank a request, by experiment arm (guardrail: treatment must not be slower)",
    ["experiment", "arm"],
    buckets=(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
# Computed results: every replica computes the same values from the shared store, so take max/avg of
# these across replicas in PromQL, never sum ("mostrecent" does the same across uvicorn workers).
_RESULT_LABELS = ["experiment", "arm", "metric"]


def _result_gauge(name: str, documentation: str) -> Gauge:
    """A computed result per experiment, arm and metric (the most recent value across workers)."""
    return Gauge(name, documentation, _RESULT_LABELS, multiprocess_mode="mostrecent")


UPLIFT = _result_gauge("selaras_experiment_uplift", "Relative uplift of the arm over control")
UPLIFT_LOWER = _result_gauge("selaras_experiment_uplift_ci_lower", "Fixed-horizon CI lower bound")
UPLIFT_UPPER = _result_gauge("selaras_experiment_uplift_ci_upper", "Fixed-horizon CI upper bound")
ALWAYS_VALID_LOWER = _result_gauge(
    "selaras_experiment_uplift_always_valid_lower", "Always-valid (peeking-safe) CI lower bound"
)
ALWAYS_VALID_UPPER = _result_gauge(
    "selaras_experiment_uplift_always_valid_upper", "Always-valid (peeking-safe) CI upper bound"
)
P_VALUE = _result_gauge("selaras_experiment_p_value", "Welch p-value")
CHANCE_TO_WIN = _result_gauge("selaras_experiment_chance_to_win", "Chance the arm beats control")
# CUPED-adjusted results beside the unadjusted ones (NaN when no visitor has a pre-period). The additive sums they
# are computed from are the `selaras_experiment_covariate_*` counters (store/sums.py).
CUPED_UPLIFT = _result_gauge(
    "selaras_experiment_cuped_uplift", "CUPED-adjusted relative uplift of the arm over control"
)
CUPED_LOWER = _result_gauge("selaras_experiment_cuped_ci_lower", "CUPED-adjusted CI lower bound")
CUPED_UPPER = _result_gauge("selaras_experiment_cuped_ci_upper", "CUPED-adjusted CI upper bound")
VARIANCE_REDUCTION = _result_gauge(
    "selaras_experiment_cuped_variance_reduction_ratio",
    "1 - Var(adjusted)/Var(unadjusted) of the uplift (interval widths shrink by its square root)",
)
SRM_P_VALUE = Gauge(
    "selaras_experiment_srm_p_value", "Sample-ratio-mismatch p-value", ["experiment"], multiprocess_mode="mostrecent"
)
SRM_CHI2 = Gauge(
    "selaras_experiment_srm_chi2", "Sample-ratio-mismatch χ²", ["experiment"], multiprocess_mode="mostrecent"
)
SRM_FLAGGED = Gauge(
    "selaras_experiment_srm_flagged", "1 when the SRM check fails", ["experiment"], multiprocess_mode="mostrecent"
)
ARM_WEIGHT = Gauge(
    "selaras_experiment_arm_weight",
    "Configured traffic weight of the arm",
    ["experiment", "arm"],
    multiprocess_mode="max",
)
READY = Gauge(
    "selaras_experiment_ready_to_decide",
    "1 when the report's verdict is final",
    ["experiment"],
    multiprocess_mode="mostrecent",
)


class ExperimentRuntime:
    """Assignment, exposure recording and reports for the configured experiments (the recommend service's
    `ArmChooser`, and the message service's experiments, by shape)."""

    def __init__(
        self,
        config: ExperimentsFile,
        store: ExperimentStore,
        record_ttl_s: int = 8 * 86400,
        clock: Clock = SYSTEM_CLOCK,
        source: ExperimentConfigStore | None = None,
        generation: int = 0,
        poll_interval_s: float = CONFIG_POLL_S,
    ):
        self.clock = clock
        self.store = store
        self.record_ttl_s = record_ttl_s
        # The stored configuration this runtime follows (None: the configuration given here, fixed).
        self.source = source
        self.poll_interval_s = poll_interval_s
        self._registry_published = False
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        self._apply_lock = threading.Lock()  # the poll thread and an admin request may both apply
        self._view = _View(config, generation)
        self._on_new_view()

    # The view is replaced as a whole (one attribute assignment, atomic for readers on other threads): a
    # request reads either the old or the new configuration, never half of each.
    @property
    def config(self) -> ExperimentsFile:
        return self._view.config

    @property
    def by_key(self) -> dict[str, ExperimentConfig]:
        return self._view.by_key

    @property
    def enabled(self) -> list[ExperimentConfig]:
        return self._view.enabled

    @property
    def generation(self) -> int:
        return self._view.generation

    @property
    def targets_messages(self) -> bool:
        """Whether an enabled message experiment is targeted: the message service then builds the visitor's
        targeting context for `assign_message`."""
        return self._view.targets_messages

    def _on_new_view(self) -> None:
        for experiment in self.enabled:
            touch_counters(experiment.key, experiment.arm_names, experiment.goal_metrics, experiment.slot_labels)
            for arm in experiment.arms:
                ARM_WEIGHT.labels(experiment.key, arm.name).set(arm.weight)
        self.publish_registry()

    def apply(self, stored: StoredConfig) -> bool:
        """Serve `stored` from now on, if it is newer than what is served; True when the view changed."""
        with self._apply_lock:
            if stored.generation <= self.generation:
                return False
            self._view = _View(stored.config, stored.generation)
        self._on_new_view()
        log.info("experiments configuration generation %d: %d enabled", stored.generation, len(self.enabled))
        return True

    def poll_config(self) -> bool:
        """Read the stored configuration (one small read) and swap to it when its generation moved."""
        if self.source is None:
            return False
        stored = self.source.load()
        return stored is not None and self.apply(stored)

    def publish_registry(self) -> bool:
        try:
            self.store.publish_registry({e.key: e.registry_entry() for e in self.enabled})
            self._registry_published = True
        except StorageUnavailable:
            log.warning("experiment registry not published (store unavailable); retrying in the background")
        return self._registry_published

    def model_versions(self) -> set[str]:
        """Ranker versions the arms of enabled experiments name: the recommend service keeps them loaded."""
        return {arm.model for experiment in self.enabled for arm in experiment.arms if arm.model is not None}

    # -- assignment ---------------------------------------------------------------------------------
    def _assign(
        self, experiment: ExperimentConfig, visitor_id: str, context: TargetingContext | None
    ) -> ArmChoice | None:
        if experiment.namespace is not None and not in_namespace(
            visitor_id, experiment.namespace, experiment.namespace_range
        ):
            return None
        assignment = assign(
            experiment.key,
            visitor_id,
            experiment.arm_names,
            [arm.weight for arm in experiment.arms],
            experiment.coverage,
            seed=experiment.seed,
            holdout=self.config.holdout,
            holdout_seed=self.config.holdout_seed,
            bucket_version=experiment.bucket_version,
        )
        if assignment is None:
            return None
        if experiment.targeting is not None and not self._admitted(experiment, visitor_id, assignment.arm, context):
            return None
        if assignment.arm == HOLDOUT_ARM:
            chosen = ArmChoice(experiment.key, HOLDOUT_ARM, False)
        else:
            arm = next(a for a in experiment.arms if a.name == assignment.arm)
            sources = tuple(arm.candidate_sources) if arm.candidate_sources is not None else None
            chosen = ArmChoice(experiment.key, arm.name, arm.personalized, arm.model, sources, arm.max_per_category)
        EXPERIMENT_REQUESTS.labels(experiment.key, chosen[1]).inc()
        return chosen

    def _admitted(
        self, experiment: ExperimentConfig, visitor_id: str, arm: str, context: TargetingContext | None
    ) -> bool:
        """Targeting before assignment, frozen at exposure: a visitor who matches enters; one who does not stays
        only if the store already counts them in this arm (the first exposure recorded it, atomically with the
        sums, so the report and the freeze can never disagree). Only the non-matching visitors cost a read."""
        targeting = experiment.targeting
        if targeting is None or targeting.matches(context or UNKNOWN):
            TARGETING.labels(experiment.key, "matched").inc()
            return True
        try:
            head = self.store.visitor_heads([experiment.storage_id], [visitor_id]).get(
                (experiment.storage_id, visitor_id)
            )
        except StorageUnavailable:
            # Unknown: serve the default rather than risk counting a non-matching visitor.
            TARGETING.labels(experiment.key, "unknown").inc()
            return False
        frozen = head is not None and head.arm == arm
        TARGETING.labels(experiment.key, "frozen" if frozen else "excluded").inc()
        return frozen

    def assign_recommend(
        self, visitor_id: str, slot_kinds: Sequence[str], now: float, context: TargetingContext | None = None
    ) -> ArmChoice | None:
        """The arm of the first running experiment covering one of the slot kinds that admits the visitor (its
        namespace range and targeting, with `context`: None = nothing known, which no condition matches)."""
        kinds = set(slot_kinds)
        for experiment in self.enabled:
            if kinds.intersection(experiment.slot_kinds) and experiment.status(now) == "running":
                chosen = self._assign(experiment, visitor_id, context)
                if chosen is not None:
                    return chosen
        return None

    def assign_message(
        self, visitor_id: str, channel: str, now: float | None = None, context: TargetingContext | None = None
    ) -> ArmChoice | None:
        """For `/v1/next-best-message`: (experiment key, arm, personalized) or None (no experiment)."""
        moment = self.clock.now() if now is None else now
        for experiment in self.enabled:
            if channel in experiment.channels and experiment.status(moment) == "running":
                chosen = self._assign(experiment, visitor_id, context)
                if chosen is not None:
                    return chosen
        return None

    # -- exposures ----------------------------------------------------------------------------------
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
        experiment = self.by_key.get(key)
        if experiment is None:
            return
        denominators: dict[str, dict[str, float]] = {ALL: {"ctr": 0.0}}
        slots: dict[str, list[str]] = {}
        for slot_name, (_kind, items) in shown.items():
            label = experiment.slot_label(slot_name)
            group = denominators.setdefault(f"slot:{label}", {"ctr": 0.0})
            group["ctr"] += len(items)
            denominators[ALL]["ctr"] += len(items)
            slots.setdefault(label, []).extend(items)
        record = {"visitor_id": visitor_id, "ts": now, "arm": arm, "kind": "recommend", "slots": slots}
        self._write(experiment, visitor_id, arm, persona, now, denominators, recommendation_id, record, covariates)
        RANKING_SECONDS.labels(key, arm).observe(took_s)

    def record_message_exposure(
        self,
        visitor_id: str,
        key: str,
        arm: str,
        channel: str,
        recommendation_id: str,
        now: float | None = None,
        persona: str | None = None,
        item_id: str | None = None,
        covariates: Mapping[str, float] | None = None,
    ) -> None:
        """One message sent under an experiment arm (its opens and clicks are attributed by the id)."""
        experiment = self.by_key.get(key)
        if experiment is None:
            return
        moment = self.clock.now() if now is None else now
        sent = {"ctr": 1.0, "open_rate": 1.0}
        denominators = {ALL: dict(sent), f"slot:{channel}": dict(sent)}
        record = {
            "visitor_id": visitor_id,
            "ts": moment,
            "arm": arm,
            "kind": "message",
            "slots": {channel: [item_id] if item_id else []},
        }
        self._write(experiment, visitor_id, arm, persona, moment, denominators, recommendation_id, record, covariates)

    def _write(
        self,
        experiment: ExperimentConfig,
        visitor_id: str,
        arm: str,
        persona: str | None,
        now: float,
        denominators: Mapping[str, Mapping[str, float]],
        recommendation_id: str,
        record: Mapping[str, Any],
        covariates: Mapping[str, float] | None = None,
    ) -> None:
        # covariates: metric -> the visitor's pre-exposure value for CUPED (used at the first exposure only), from
        # the request's visitor row (covariates.exposure_covariates); None = a new visitor.
        write = ExposureWrite(
            experiment.storage_id,
            visitor_id,
            arm,
            persona or "unknown",
            now,
            denominators,
            recommendation_id,
            record,
            record_ttl_s=int(experiment.attribution_window_hours * 3600) + self.record_ttl_s,
            covariates=covariates,
        )
        try:
            applied = self.store.record_exposure(write)
        except StorageUnavailable:
            # Never fail a recommendation because the experiment store hiccuped; the drop is counted.
            EXPOSURES_DROPPED.labels(experiment.key).inc()
            return
        if applied.status != "ok":
            EXPOSURES_DROPPED.labels(experiment.key).inc()
            log.warning("exposure not recorded: %s", applied.status)
            return
        count_increments(experiment.key, arm, applied.increments)
        EXPERIMENT_SERVED.labels(experiment.key, arm).inc()

    # -- reports --------------------------------------------------------------------------------------
    def describe(self, experiment: ExperimentConfig, now: float | None = None) -> dict[str, Any]:
        moment = self.clock.now() if now is None else now
        data = experiment.model_dump(mode="json")
        data["status"] = experiment.status(moment)
        data["goal_metrics"] = experiment.goal_metrics
        data["holdout"] = self.config.holdout
        return data

    def report(self, key: str, now: float | None = None) -> dict[str, Any]:
        experiment = self.by_key[key]
        moment = self.clock.now() if now is None else now
        report = build_report(
            experiment, self.store.sums(experiment.storage_id), self.store.days(experiment.storage_id), moment
        )
        if experiment.enabled:
            self._set_gauges(experiment, report)
        return report

    def _set_gauges(self, experiment: ExperimentConfig, report: Mapping[str, Any]) -> None:
        key = experiment.key

        def value(v: float | None) -> float:
            return math.nan if v is None else float(v)

        for result in report["results"]:
            labels = (key, result["arm"], result["metric"])
            UPLIFT.labels(*labels).set(value(result["uplift"]))
            UPLIFT_LOWER.labels(*labels).set(value(result["ci_lower"]))
            UPLIFT_UPPER.labels(*labels).set(value(result["ci_upper"]))
            ALWAYS_VALID_LOWER.labels(*labels).set(value(result["always_valid"]["ci_lower"]))
            ALWAYS_VALID_UPPER.labels(*labels).set(value(result["always_valid"]["ci_upper"]))
            P_VALUE.labels(*labels).set(value(result["p_value"]))
            CHANCE_TO_WIN.labels(*labels).set(value(result["chance_to_win"]))
            cuped = result["cuped"] or {}
            CUPED_UPLIFT.labels(*labels).set(value(cuped.get("uplift")))
            CUPED_LOWER.labels(*labels).set(value(cuped.get("ci_lower")))
            CUPED_UPPER.labels(*labels).set(value(cuped.get("ci_upper")))
            reduction = cuped.get("variance_reduction_pct")
            VARIANCE_REDUCTION.labels(*labels).set(value(None if reduction is None else reduction / 100.0))
        srm = report["srm"]
        SRM_P_VALUE.labels(key).set(value(srm["p_value"]))
        SRM_CHI2.labels(key).set(value(srm["chi2"]))
        SRM_FLAGGED.labels(key).set(1.0 if srm["flagged"] else 0.0)
        READY.labels(key).set(1.0 if report["verdict"]["ready"] else 0.0)

    def refresh_gauges(self) -> None:
        if not self._registry_published:
            self.publish_registry()
        for experiment in self.enabled:
            try:
                self.report(experiment.key)
            except StorageUnavailable:
                log.warning("experiment gauges not refreshed: the store is unavailable")
                return

    def start_refresher(self) -> None:
        """Poll the stored configuration and recompute the result gauges periodically (a daemon thread that
        ends with the runtime)."""
        if self._refresher is not None or (not self.enabled and self.source is None):
            return
        self._refresher = threading.Thread(
            target=_refresh_loop,
            args=(weakref.ref(self), self._stop, self.poll_interval_s, self.config.report_interval_s),
            name="experiment-gauges",
            daemon=True,
        )
        self._refresher.start()

    def close(self) -> None:
        self._stop.set()
        self.store.close()


class _View:
    """One generation of the configuration with its lookups, built once and swapped as a whole."""

    __slots__ = ("by_key", "config", "enabled", "generation", "targets_messages")

    def __init__(self, config: ExperimentsFile, generation: int):
        self.config = config
        self.generation = generation
        self.by_key = {e.key: e for e in config.experiments}
        self.enabled = [e for e in config.experiments if e.enabled]
        self.targets_messages = any(e.channels and e.targeting is not None for e in self.enabled)


def _refresh_loop(
    runtime_ref: weakref.ref[ExperimentRuntime], stop: threading.Event, poll_s: float, report_s: float
) -> None:
    # A weak reference: an app that is thrown away (tests) does not keep its runtime alive through this.
    # Durations, not business time: the gauges are recomputed every `report_s` of real time.
    next_report = time.perf_counter() + report_s
    while not stop.wait(poll_s):
        runtime = runtime_ref()
        if runtime is None:
            return
        try:
            runtime.poll_config()
        except Exception as exc:  # a store hiccup: keep serving the current view and poll again
            log.warning("experiment configuration poll failed: %s", type(exc).__name__)
        if time.perf_counter() >= next_report:
            next_report = time.perf_counter() + runtime.config.report_interval_s
            try:
                runtime.refresh_gauges()
            except Exception as exc:  # keep refreshing after a bad cycle
                log.warning("experiment gauge refresh failed: %s", type(exc).__name__)
        del runtime


def load_experiments(
    path: Path,
    settings: CommonSettings,
    record_ttl_s: int,
    clock: Clock = SYSTEM_CLOCK,
    source: ExperimentConfigStore | None = None,
) -> ExperimentRuntime | None:
    """The experiment runtime for a service, or None when there is no configuration.

    With `source` (the shared store), the file at `path` seeds it when it holds no configuration yet, and the
    runtime follows the stored record from then on (config_store.py: once stored, the store wins). Without
    it, the file alone is read and an empty one means no experiments. `record_ttl_s` is how long exposure
    records outlive the attribution window (the recommendation TTL)."""
    if source is None:
        if not path.exists():
            log.info("no experiments file at %s: experiments are off", path)
            return None
        config = load_config(path)
        if not config.experiments:
            return None
        runtime = ExperimentRuntime(config, open_experiment_store(settings), record_ttl_s, clock)
    else:
        if path.exists():
            _, seeded = source.seed(load_config(path), force=False, actor="experiments-file", now=clock.now())
            log.info("experiments file %s %s", path, "seeded the store" if seeded else "ignored: the store has one")
        stored = source.load()
        if stored is None:
            log.info("no experiments file at %s and none stored: experiments are off", path)
            return None
        runtime = ExperimentRuntime(
            stored.config, open_experiment_store(settings), record_ttl_s, clock, source, stored.generation
        )
    runtime.start_refresher()
    log.info("experiments loaded: %d configured, %d enabled", len(runtime.config.experiments), len(runtime.enabled))
    return runtime
