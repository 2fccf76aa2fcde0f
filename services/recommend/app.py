"""Recommend service: `create_app(settings)` with a lifespan that loads the model and item cache once."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.common.api import add_metrics_route, install_error_handlers, install_openapi_components
from services.common.auth import ApiKeyAuth
from services.common.breaker import CircuitBreaker, StoreGuard
from services.common.clock import Clock, clock_for
from services.common.observability import MetricsMiddleware, configure_logging
from services.common.security import install_security
from services.common.storage import check_redis_durability
from services.messages.endpoints import router as message_router
from services.messages.repository import MessageRepository
from services.messages.service import MessageService
from services.messages.settings import MessageSettings
from services.recommend.deps import RecommendState
from services.recommend.endpoints import router
from services.recommend.experiment_endpoints import router as experiment_router
from services.recommend.experiments import load_experiments
from services.recommend.repository import RecommendRepository
from services.recommend.service import RecommendService
from services.recommend.settings import RecommendSettings

log = logging.getLogger(__name__)


def build_state(settings: RecommendSettings, clock: Clock | None = None) -> RecommendState:
    """Every part of the service, built once: one store, one clock and one experiment runtime shared by
    ranking and next-best messages (messages decide on the ranking's item snapshot)."""
    repository = RecommendRepository.open(settings)
    clock = clock or clock_for(settings.clock_start)
    consent_defaults = settings.consent_defaults()
    experiments = load_experiments(settings, repository, clock)
    service = RecommendService(settings, repository, consent_defaults, experiments=experiments, clock=clock)
    messages = MessageService(
        MessageRepository(repository),
        lambda: service.snapshot,
        MessageSettings(),
        consent_defaults,
        experiments=experiments,
        recommendation_ttl_s=settings.recommendation_ttl_s,
        clock=clock,
        simulation=settings.simulation,
    )
    executor = ThreadPoolExecutor(max_workers=settings.ranking_threads, thread_name_prefix="rank")
    breaker = CircuitBreaker("store", settings.breaker_failures, settings.breaker_reset_s)
    guard = StoreGuard(breaker, settings.store_budget_s, settings.store_io_threads)
    return RecommendState(settings, repository, service, messages, ApiKeyAuth(settings.api_keys), executor, guard)


def create_app(settings: RecommendSettings | None = None, clock: Clock | None = None) -> FastAPI:
    """The recommend app. `clock` replaces the settings' business clock (simulations that drive time)."""
    settings = settings or RecommendSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_level)
        state = build_state(settings, clock)
        check_redis_durability(state.repository.store, settings.environment)
        app.state.recommend = state
        state.service.start()
        log.info(
            "recommend service started (store=%s, items=%d, model=%s)",
            state.repository.store.backend,
            state.service.snapshot.size,
            state.service.model.meta.version if state.service.model else None,
        )
        try:
            yield
        finally:
            state.service.stop()
            state.executor.shutdown(wait=True)
            state.store_guard.close()
            state.repository.close()

    app = FastAPI(
        title="Selaras recommend service",
        version="0.1.0",
        description="Ranks products, banners and CTAs per visitor (candidates -> LightGBM -> rules), with experiments.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    add_metrics_route(app)
    install_openapi_components(app)
    app.include_router(router)
    app.include_router(experiment_router)
    app.include_router(message_router)
    install_security(app, settings)
    app.add_middleware(MetricsMiddleware, service="recommend")
    return app
