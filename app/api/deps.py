"""FastAPI dependencies as ``Annotated`` aliases.

Every dependency resolves the client through ``get_redis()`` when a request
arrives, so replacing ``app.core.redis.redis_client`` (a test's fakeredis
client) redirects all of them.
"""

from __future__ import annotations

import inspect
import string
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from starlette.requests import HTTPConnection

from app.core.config import Settings, get_settings
from app.core.errors import ConfigurationError
from app.core.guard import Duration, PerClient, as_seconds
from app.core.redis import AnyRedis, get_redis
from app.middleware.idempotency import (
    DEFAULT_HEADER,
    IDEMPOTENCY_RESPONSES,
    guard_request,
)
from app.middleware.rate_limit import rate_limit
from app.middleware.sessions import Session, load_session
from app.services.cache import CacheService, get_cache
from app.services.http_cache import HttpResponseCache
from app.services.locks import Permit, RedisLock, Semaphore, lease_drift
from app.services.pubsub import Broadcaster
from app.services.sessions import SessionStore
from app.services.streams import StreamProducer

__all__ = [
    "IDEMPOTENCY_RESPONSES",
    "LOCK_RESPONSES",
    "BroadcasterDep",
    "CacheDep",
    "HttpCacheDep",
    "IdempotencyKeyDep",
    "RedisDep",
    "SessionDep",
    "SessionStoreDep",
    "SettingsDep",
    "broadcaster_dependency",
    "cache_dependency",
    "http_response_cache",
    "idempotency_key",
    "rate_limit",
    "redis_dependency",
    "request_lock",
    "request_semaphore",
    "session_store_dependency",
    "stream_producer",
]


async def redis_dependency() -> AnyRedis:
    """The global client (async so FastAPI does not hop to its thread pool)."""
    return get_redis()


async def settings_dependency() -> Settings:
    return get_settings()


RedisDep = Annotated[AnyRedis, Depends(redis_dependency)]
SettingsDep = Annotated[Settings, Depends(settings_dependency)]

# Dependencies by capability.

# --- cache ---


async def cache_dependency() -> CacheService:
    """The default ``CacheService`` (namespace ``cache``) of the global client.

    The one registered with ``set_default_cache`` (the demo's lifespan registers one
    with a local tier), else a plain one built on first use. Redis down: its reads
    miss and ``get_or_set`` runs the factory (fail-open, ``cache_failure_mode``).
    """
    return get_cache()


CacheDep = Annotated[CacheService, Depends(cache_dependency)]
"""``cache: CacheDep`` in a route: ``await cache.get_or_set(key, load, ttl=60)``."""

# --- http cache ---


async def http_response_cache() -> HttpResponseCache:
    """The HTTP response cache (namespace ``httpcache``) over the global client.

    For handlers that change data: ``await http_cache.invalidate(str(request.url_for(...)))``
    drops every cached variant of that URL (raises ``RedisUnavailable`` if it cannot).
    """
    return HttpResponseCache(get_redis())


HttpCacheDep = Annotated[HttpResponseCache, Depends(http_response_cache)]

# --- idempotency ---


async def _no_principal() -> None:
    return None


def idempotency_key(
    *,
    required: bool = False,
    header_name: str = DEFAULT_HEADER,
    principal: Callable[..., Any] | None = None,
) -> Callable[..., Awaitable[str | None]]:
    """A dependency that makes one route idempotent (needs ``IdempotencyMiddleware``).

    ``@router.post("/orders", dependencies=[Depends(idempotency_key(required=True))],
    responses=IDEMPOTENCY_RESPONSES)``: the header appears in OpenAPI; a missing
    (when *required*) or malformed key answers 400, a retry replays the first
    response, a concurrent one 409, another payload under the same key 422; the
    handler runs at most once per key. The route template (``/orders/{id}``)
    scopes the key. *principal* is an optional dependency returning the caller's
    id (str or bytes) to scope keys by, instead of the middleware's ``principal``
    callable. If the middleware already guards the request (its ``paths``), this
    only documents the route. The dependency returns the key, or None.
    """
    description = ("Required. " if required else "") + (
        "Unique key of this request: a quoted string or a token, 1-255 printable ASCII "
        "characters (a UUID). Retrying with the same key and payload replays the first "
        "response with `Idempotent-Replayed: true`."
    )

    async def dependency(request: Request, key: str | None, caller: Any) -> str | None:
        return await guard_request(
            request, header_name=header_name, required=required, principal=caller
        )

    # Built by hand: this module's string annotations cannot see the closure's values.
    keyword = inspect.Parameter.KEYWORD_ONLY
    dependency.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter("request", keyword, annotation=Request),
            inspect.Parameter(
                "key",
                keyword,
                default=None,
                annotation=Annotated[
                    str | None, Header(alias=header_name, description=description)
                ],
            ),
            inspect.Parameter(
                "caller",
                keyword,
                default=None,
                annotation=Annotated[Any, Depends(principal or _no_principal)],
            ),
        ],
        return_annotation=str | None,
    )
    return dependency


IdempotencyKeyDep = Annotated[str | None, Depends(idempotency_key())]
"""The request's Idempotency-Key (validated) with the route protected; None without one."""

# --- locks ---


LOCK_RESPONSES: dict[int | str, dict[str, Any]] = {
    409: {
        "description": "The resource is locked by another request (problem+json; "
        "`Retry-After` says when the current holder's lease ends)."
    },
    503: {"description": "Redis is unavailable (problem+json); locks never fail open."},
}
"""OpenAPI ``responses=`` for routes guarded by ``request_lock``/``request_semaphore``."""


def _lock_name(template: str) -> Callable[[Mapping[str, Any]], str]:
    """Validate a ``"jobs:{job_id}"`` template now; render it from path parameters later."""
    fields: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigurationError(f"lock name template {template!r}: {exc}") from exc
    for _literal, field, spec, conversion in parsed:
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            raise ConfigurationError(
                f"lock name template {template!r}: use plain path parameter names like "
                f"{{job_id}}, not {{{field}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}}"
            )
        fields.append(field)
    if not template:
        raise ConfigurationError("a lock name template must not be empty")

    def render(params: Mapping[str, Any]) -> str:
        missing = [f for f in fields if f not in params]
        if missing:
            raise ConfigurationError(
                f"lock name template {template!r} needs path parameter(s) {missing}; "
                f"this route has {sorted(params)}"
            )
        return template.format_map({f: params[f] for f in fields})

    return render


def request_lock(
    name_template: str,
    *,
    timeout: Duration = 30,
    blocking_timeout: Duration = 0,
    auto_renew: bool = True,
    fair: bool = False,
    drift: Duration | None = None,
) -> Any:
    """Hold a ``RedisLock`` for the duration of the request handler.

    ``lock: Annotated[RedisLock, request_lock("jobs:{job_id}")]`` (or in
    ``dependencies=[...]``): the lock name is the template filled from the
    route's path parameters (escaped into the key, so any value is safe).
    When another request (in any worker) holds it, the route answers 409
    problem+json with ``Retry-After`` after waiting *blocking_timeout*
    (default: not at all). The lock is released when the handler returns,
    before the response is sent. With *auto_renew* (default) the lease is
    renewed every ``timeout/3``; if it is lost anyway, or no renewal is
    confirmed before the lease ends (minus the *drift* margin, as for
    ``RedisLock``), the handler is cancelled at once and the request answers
    409 ``lock-lost``. A sync (``def``) handler runs in a thread, which cannot
    be cancelled: use an ``async def`` handler. Redis down: 503.
    """
    render = _lock_name(name_template)
    lease = as_seconds(timeout, "timeout")
    as_seconds(blocking_timeout, "blocking_timeout", allow_zero=True)
    lease_drift(lease, drift, renew_interval=lease / 3 if auto_renew else None)

    async def dependency(request: Request) -> AsyncIterator[RedisLock]:
        lock = RedisLock(
            get_redis(),
            render(request.path_params),
            timeout,
            blocking_timeout=blocking_timeout,
            auto_renew=auto_renew,
            fair=fair,
            drift=drift,
        )
        async with lock:
            yield lock

    return Depends(dependency, scope="function")


def request_semaphore(
    name_template: str,
    *,
    limit: int,
    timeout: Duration = 30,
    blocking_timeout: Duration = 0,
    auto_renew: bool = True,
    fair: bool = False,
    drift: Duration | None = None,
) -> Any:
    """Hold one of *limit* ``Semaphore`` permits for the duration of the request handler.

    ``permit: Annotated[Permit, request_semaphore("exports", limit=2)]``: at
    most *limit* handlers run at once across every worker; the others wait
    *blocking_timeout* (default: not at all) and then answer 409 problem+json
    with ``Retry-After``. Same template, renewal and failure rules as
    ``request_lock``.
    """
    render = _lock_name(name_template)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ConfigurationError(f"limit must be an integer >= 1, got {limit!r}")
    lease = as_seconds(timeout, "timeout")
    as_seconds(blocking_timeout, "blocking_timeout", allow_zero=True)
    lease_drift(lease, drift, renew_interval=lease / 3 if auto_renew else None)

    async def dependency(request: Request) -> AsyncIterator[Permit]:
        semaphore = Semaphore(
            get_redis(),
            render(request.path_params),
            limit,
            timeout,
            blocking_timeout=blocking_timeout,
            auto_renew=auto_renew,
            fair=fair,
            drift=drift,
        )
        async with semaphore as permit:
            yield permit

    return Depends(dependency, scope="function")


# --- rate limiting ---


# --- pubsub ---


async def broadcaster_dependency(connection: HTTPConnection) -> Broadcaster:
    """The app's ``Broadcaster`` (``app.state.broadcaster``), for HTTP and WebSocket routes.

    The demo's lifespan (``app.api.routes.pubsub.lifespan``) starts it and drains it on
    shutdown. Without that lifespan, one is built over the global client on first use and
    started lazily (its connection then lives until the process ends).
    """
    state = connection.app.state
    broadcaster: Broadcaster | None = getattr(state, "broadcaster", None)
    if broadcaster is None:
        broadcaster = state.broadcaster = Broadcaster(get_redis())
        await broadcaster.start()
    return broadcaster


BroadcasterDep = Annotated[Broadcaster, Depends(broadcaster_dependency)]
"""The process's one ``Broadcaster``: ``async with broadcaster.subscribe("room") as sub``."""

# --- streams ---


def stream_producer(
    stream: str, *, maxlen: int | None = None, approximate: bool = True
) -> Callable[[], Awaitable[StreamProducer]]:
    """A dependency giving a ``StreamProducer`` for *stream* over the global client.

    ``EventsProducer = Annotated[StreamProducer, Depends(stream_producer("events",
    maxlen=10_000))]``. One producer per client is built on first use and reused (no
    per-request allocation). Redis down: ``add`` raises ``RedisUnavailable`` (503).
    """
    producers: PerClient[StreamProducer] = PerClient(
        lambda redis: StreamProducer(redis, stream, maxlen=maxlen, approximate=approximate)
    )

    async def dependency() -> StreamProducer:
        return producers(get_redis())

    return dependency


# --- sessions ---


async def session_store_dependency(redis: RedisDep) -> SessionStore:
    """A ``SessionStore`` over the global client (default TTLs), for admin routes.

    Routes behind ``SessionMiddleware`` usually want ``SessionDep`` instead; a
    store with other options is ``SessionStore(redis, idle_ttl=..., ...)``.
    """
    return SessionStore(redis)


SessionDep = Annotated[Session, Depends(load_session)]
"""The request's session, loaded from Redis (needs ``SessionMiddleware``).

Declaring it is what makes a route read the session: routes without it make no
Redis call for sessions. Redis down: 503 problem+json (``sessions_failure_mode``)."""
SessionStoreDep = Annotated[SessionStore, Depends(session_store_dependency)]
