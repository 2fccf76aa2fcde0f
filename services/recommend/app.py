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
from services.demo_shop import DemoShopConfig, check_browser_key, demo_shop_router
from services.experiments.config_store import ExperimentConfigStore
from services.experiments.deps import ExperimentsState
from services.experiments.endpoints import router as experiment_router
from services.experiments.runtime import load_experiments
from services.messages.deps import MessagesState
from services.messages.endpoints import router as message_router
from services.messages.repository import MessageRepository
from services.messages.service import MessageService
from services.messages.settings import MessageSettings
from services.recommend.catalog_endpoints import router as catalog_router
from services.recommend.deps import RecommendState
from services.recommend.endpoints import router
from services.recommend.model_endpoints import router as model_router
from services.recommend.ranking.candidates import SOURCES
from services.recommend.repository import RecommendRepository
from services.recommend.service import RecommendService
from services.recommend.settings import RecommendSettings
from services.reports.endpoints import ReportsState
from services.reports.endpoints import router as reports_router
from services.reports.store import ReportStore

log = logging.getLogger(__name__)


def build_state(settings: RecommendSettings, clock: Clock | None = None) -> RecommendState:
    """Every part of the service, built once: one store, one clock and one experiment runtime shared by
    ranking and next-best messages (messages decide on the ranking's item snapshot)."""
    repository = RecommendRepository.open(settings)
    clock = clock or clock_for(settings.clock_start)
    consent_defaults = settings.consent_defaults()
    # The experiments configuration is a shared record every replica follows (the file only seeds it).
    config_store = ExperimentConfigStore(repository.store)
    experiments = load_experiments(
        settings.experiments_file, settings, settings.recommendation_ttl_s, clock, config_store
    )
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
    auth = ApiKeyAuth(settings.api_keys)
    experiment_state = ExperimentsState(
        experiments, settings.experiments_file, auth, config_store, repository.models, clock, SOURCES
    )
    breaker = CircuitBreaker("store", settings.breaker_failures, settings.breaker_reset_s)
    guard = StoreGuard(breaker, settings.store_budget_s, settings.store_io_threads)
    message_state = MessagesState(messages, auth, executor, settings.max_body_bytes)
    return RecommendState(settings, repository, service, message_state, auth, executor, experiment_state, guard)


def create_app(settings: RecommendSettings | None = None, clock: Clock | None = None) -> FastAPI:
    """The recommend app. `clock` replaces the settings' business clock (simulations that drive time)."""
    settings = settings or RecommendSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_level)
        state = build_state(settings, clock)
        check_redis_durability(state.repository.store, settings.environment)
        app.state.recommend = state
        app.state.experiments = state.experiments  # the experiment routes' own state (services/experiments/deps.py)
        app.state.messages = state.messages  # the message routes' own state (services/messages/deps.py)
        app.state.reports = ReportsState(ReportStore(state.repository.store), state.auth)  # /reports/
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
            if state.experiments.runtime is not None:  # its refresher thread and its store connection
                state.experiments.runtime.close()
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
    app.include_router(catalog_router)
    app.include_router(experiment_router)
    app.include_router(message_router)
    app.include_router(model_router)
    app.include_router(reports_router)
    if settings.demo_shop:
        # The demo shop front (`selaras demo`): static pages with a public browser key, checked here.
        key = check_browser_key(ApiKeyAuth(settings.api_keys), settings.demo_shop_key)
        app.include_router(demo_shop_router(DemoShopConfig(settings.demo_shop_profile_url, key, settings.sdk_dir)))
    install_security(app, settings)
    app.add_middleware(MetricsMiddleware, service="recommend")
    return app
