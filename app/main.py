"""The demo service: ``create_app()`` and ``app = create_app()`` (for uvicorn).

Run it with ``make run`` (embedded in-process Redis when ``REDIS_URL`` is
unset) or ``uvicorn app.main:app``. Each capability's routes, middleware and
lifespan come from its module under ``app.api.routes``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from types import ModuleType
from typing import Any

from fastapi import FastAPI

from app.api.problems import install_problem_handlers
from app.api.routes import (
    cache,
    health,
    http_cache,
    idempotency,
    locks,
    pubsub,
    rate_limit,
    sessions,
    streams,
)
from app.api.routes.metrics import install_metrics
from app.console import ConsoleLimiter, create_console
from app.core.config import get_settings
from app.core.redis import redis_lifespan
from app.middleware.stack import install_toolkit
from app.services.rate_limit import RateLimiter

__all__ = ["CAPABILITIES", "app", "create_app"]

CAPABILITIES: tuple[ModuleType, ...] = (
    cache,
    http_cache,
    idempotency,
    locks,
    rate_limit,
    pubsub,
    streams,
    sessions,
)


@asynccontextmanager
async def _capabilities_lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with AsyncExitStack() as stack:
        for module in CAPABILITIES:
            if module.lifespan is not None:
                await stack.enter_async_context(module.lifespan(app))
        yield


def create_app(**fastapi_kwargs: Any) -> FastAPI:
    """Build the demo app: Redis lifespan, problem+json errors, every capability's routes.

    With ``TELEMETRY_ENABLED=1`` it also serves Prometheus ``GET /metrics`` and reports
    traces and metrics through OpenTelemetry while it runs. Each capability's
    ``setup`` adds its middleware; ``install_toolkit`` then puts them in the one
    safe order (rate limiting, idempotency, HTTP cache, sessions, outermost
    first), whatever order the modules were set up in. The operator console is
    mounted at ``/console`` (404 until ``CONSOLE_TOKEN`` is set).
    """
    fastapi_kwargs.setdefault("title", "FastAPI Redis toolkit demo")
    app = FastAPI(**fastapi_kwargs)
    inner: Any = _capabilities_lifespan
    if get_settings().telemetry_enabled:  # GET /metrics, and OpenTelemetry while the app runs
        inner = install_metrics(app, inner)
    app.router.lifespan_context = redis_lifespan(inner)
    install_problem_handlers(app)
    app.include_router(health.router)
    for module in CAPABILITIES:
        app.include_router(module.router)
        module.setup(app)
    install_toolkit(app)
    app.mount("/console", create_console(limiters=[_DEMO_USER_LIMIT]))  # 404 until CONSOLE_TOKEN
    return app


_DEMO_USER_LIMIT = ConsoleLimiter(
    "demo user",
    lambda redis: RateLimiter(redis, policies="user=5/minute"),
    lambda user: f"demo-user|{user}",
    "the X-User header of GET /limits/user",
)


app = create_app()
