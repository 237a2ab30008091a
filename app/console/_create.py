"""``create_console``: the console app, its error answers and its routes put together."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import Response
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from app.console._app import AuthDependency, Console, ConsoleLimiter, Refused, SecurityHeaders
from app.console._routes import add_routes
from app.core.config import Settings, get_settings
from app.core.errors import ConfigurationError, RedisUnavailable
from app.core.redis import AnyRedis, get_redis
from app.services.sessions import SessionStore

__all__ = ["create_console"]

log = logging.getLogger("app.console")


def create_console(
    *,
    auth: AuthDependency | None = None,
    token: str | None = None,
    read_only: bool | None = None,
    limiters: Sequence[ConsoleLimiter] = (),
    cache_namespaces: Sequence[str] = ("cache",),
    sessions: Callable[[AnyRedis], SessionStore] | None = None,
    redis: Callable[[], AnyRedis] = get_redis,
    settings: Settings | None = None,
) -> FastAPI:
    """The operator console, to mount with ``app.mount("/console", create_console(...))``.

    Args:
        auth: a FastAPI dependency that returns the operator's name (None or
            False: 401). When given, it is the only way in.
        token: the access token (default ``CONSOLE_TOKEN``); checked like a
            secret (32+ characters, constant-time compare). With neither *auth*
            nor a token, every console URL answers 404.
        read_only: refuse every action with 403 (default ``CONSOLE_READ_ONLY``).
        limiters: the rate limiters the Rate limits page can inspect and reset.
        cache_namespaces: ``CacheService`` namespaces the Cache page shows
            (through ``get_cache``, so this worker's registered services and stats).
        sessions: builds the ``SessionStore`` the app's session middleware uses
            (default ``SessionStore(client)``: namespace ``session``, subject ``user``).
        redis: where the client comes from (default ``get_redis``, per request).
        settings: default ``get_settings()``.

    The console makes Redis calls only when a page is opened or an action
    posted, each bounded (SCAN/XRANGE pages, fixed round trips); the live
    overview makes two calls every 2 s per open page, at most 4 pages per process.
    """
    settings = settings or get_settings()
    if token is None and settings.console_token is not None:
        token = settings.console_token.get_secret_value()
    if token is not None:
        Settings.model_validate({"console_token": token})  # the same strength rules
    if not all(cache_namespaces):
        raise ConfigurationError("cache_namespaces must be non-empty names")
    console = Console(
        settings=settings,
        auth=auth,
        token=token,
        read_only=settings.console_read_only if read_only is None else read_only,
        limiters=limiters,
        cache_namespaces=cache_namespaces,
        sessions=sessions,
        redis=redis,
    )
    app = FastAPI(title="Operator console", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.console = console

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused) -> Response:
        return console.refusal(request, exc)

    @app.exception_handler(RedisUnavailable)
    async def _unavailable(request: Request, exc: RedisUnavailable) -> Response:
        return console.refusal(request, Refused(503, "Redis is unavailable; try again shortly"))

    @app.exception_handler(RedisError)
    async def _redis_error(request: Request, exc: RedisError) -> Response:
        log.warning("console: Redis refused a command: %s", exc)
        return console.refusal(request, Refused(503, "Redis refused the request; see the logs"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        return console.refusal(request, Refused(exc.status_code, str(exc.detail)))

    if console.enabled:
        app.mount("/static", StaticFiles(packages=[("app.console", "static")]), name="static")
    add_routes(app, console)
    app.add_middleware(SecurityHeaders)
    return app
