"""Profile service: `create_app(settings)` with a lifespan that builds the repository and aggregator once."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.common.api import add_metrics_route, install_error_handlers, install_openapi_components
from services.common.auth import ApiKeyAuth
from services.common.clock import Clock, clock_for
from services.common.observability import MetricsMiddleware, configure_logging
from services.common.security import install_security
from services.common.storage import check_redis_durability, hot_window_s
from services.features.aggregations import SegmentRules
from services.profile.aggregator.archive import PeriodicArchiver
from services.profile.aggregator.observers import build_batch_observers
from services.profile.aggregator.worker import Aggregator
from services.profile.compaction import compact_history
from services.profile.deps import ProfileState
from services.profile.endpoints import router
from services.profile.ingest import IngestService
from services.profile.persona_jobs import PersonaAssigner
from services.profile.privacy.repository import PrivacyRepository
from services.profile.privacy.service import PrivacyService, privacy_holders
from services.profile.privacy_endpoints import router as privacy_router
from services.profile.repository import ProfileRepository
from services.profile.settings import ProfileSettings

log = logging.getLogger(__name__)


def build_state(
    settings: ProfileSettings, clock: Clock | None = None, aggregator_clock: Clock | None = None
) -> ProfileState:
    """The service's parts. `clock`: business time (default: from the settings, `clock_for`); a simulation
    passes the clock it drives. `aggregator_clock`: the fold's business time when it is not the service clock
    (a bulk import of history folds at the time of its events, `DataClock`)."""
    repository = ProfileRepository.open(settings)
    clock = clock or clock_for(settings.clock_start)
    rules = SegmentRules.from_settings(settings)
    defaults = settings.consent_defaults()
    personas = PersonaAssigner(repository.store)
    aggregator = Aggregator(
        repository,
        rules,
        defaults,
        persona_assigner=personas,
        offline_rows=settings.offline_rows,
        retention_s=settings.retention_days * 86400,
        observers=build_batch_observers(settings, repository),
        clock=aggregator_clock or clock,
        max_skew_s=settings.max_clock_skew_s,
        lease_s=settings.aggregator_lease_s,
    )
    return ProfileState(
        settings,
        repository,
        IngestService(repository, clock, settings.max_clock_skew_s, settings.trait_schema()),
        aggregator,
        ApiKeyAuth(settings.api_keys),
        defaults,
        rules,
        PrivacyService(
            PrivacyRepository(repository.store, repository.feature_store, settings.offline_dir),
            defaults,
            aggregator.fold_lock,
            privacy_holders(settings),
            clock,
        ),
        personas,
        clock,
    )


def periodic_archiver(settings: ProfileSettings, state: ProfileState) -> PeriodicArchiver:
    """Archives what the state's aggregator folds (the partitions it holds), every archive interval, and
    compacts the offline feature history (unless PROFILE_COMPACT_TARGET_ROWS is 0)."""
    aggregator = state.aggregator
    target_rows = settings.compact_target_rows
    return PeriodicArchiver(
        state.repository.store,
        hot_window_s(settings),
        settings.archive_interval_s,
        aggregator.holder,
        aggregator.held_partitions,
        (lambda: compact_history(state.repository, settings.offline_dir, target_rows)) if target_rows else None,
    )


def create_app(settings: ProfileSettings | None = None, clock: Clock | None = None) -> FastAPI:
    """The profile app. `clock` replaces the settings' business clock (simulations that drive time)."""
    settings = settings or ProfileSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_level)
        state = build_state(settings, clock)
        check_redis_durability(state.repository.store, settings.environment)
        app.state.profile = state
        archiver = periodic_archiver(settings, state)
        if settings.aggregator_enabled:
            state.aggregator.start(settings.aggregator_batch, settings.aggregator_idle_s, settings.aggregator_linger_s)
            archiver.start()
        log.info("profile service ready (store=%s)", state.repository.store.backend)
        try:
            yield
        finally:
            archiver.stop()
            state.aggregator.stop()
            state.repository.close()

    app = FastAPI(
        title="Selaras profile service",
        version="0.1.0",
        description="Ingests behaviour events, keeps real-time visitor features, segments, personas and consent.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    add_metrics_route(app)
    install_openapi_components(app)
    app.include_router(router)
    app.include_router(privacy_router)
    install_security(app, settings)
    app.add_middleware(MetricsMiddleware, service="profile")
    return app
