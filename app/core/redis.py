"""THE process-wide Redis client: its lifecycle, lifespan and health.

``redis_client`` is THE client of the process (``redis.asyncio.Redis``, or
``RedisCluster``). Nothing connects at import time:

* ``init_redis()`` builds it from settings (unless one was already set, e.g. a
  fakeredis client put there by a test) and pings it, retrying with capped,
  jittered exponential backoff for ``REDIS_INIT_TIMEOUT`` seconds, then raises
  ``RedisUnavailable`` naming the URL with its password masked.
* ``get_redis()`` returns it, building it on first use (without pinging).
* ``close_redis()`` closes a client this module built; a client someone else
  assigned is theirs to close.
* ``lifespan`` / ``redis_lifespan(inner)`` run init and close around a FastAPI app.

Every dependency and middleware calls ``get_redis()`` per request, so assigning
``app.core.redis.redis_client = fakeredis.FakeAsyncRedis()`` redirects an app.

The rest of the foundation lives beside this module and is re-exported here
for the import paths code already uses: ``app.core.urls`` (URL schemes,
``parse_redis_url``, ``mask_url``), ``app.core.pool`` (``build_client``, the
waiting pools, ``scan_keys``, ...) and ``app.core.breaker`` (``CircuitBreaker``,
``breaker_for``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeAlias

from redis import exceptions as redis_exc

from app.core.background import drain
from app.core.breaker import (
    CONNECTION_ERRORS,
    REFUSED_FOR_NOW,
    BreakerState,
    CircuitBreaker,
    breaker_for,
)
from app.core.config import Settings, get_settings
from app.core.errors import RedisUnavailable
from app.core.pool import (
    AnyRedis,
    SentinelManagedRedis,
    WaitingConnectionPool,
    WaitingRedisCluster,
    WaitingSentinelConnectionPool,
    build_client,
    client_decodes_responses,
    is_cluster,
    scan_keys,
    unlink_matching,
)
from app.core.urls import RedisTarget, mask_url, parse_redis_url

__all__ = [
    "CONNECTION_ERRORS",
    "REFUSED_FOR_NOW",
    "AnyRedis",
    "BreakerState",
    "CircuitBreaker",
    "Lifespan",
    "RedisTarget",
    "SentinelManagedRedis",
    "WaitingConnectionPool",
    "WaitingRedisCluster",
    "WaitingSentinelConnectionPool",
    "breaker_for",
    "build_client",
    "client_decodes_responses",
    "close_redis",
    "describe_client",
    "get_redis",
    "health",
    "init_redis",
    "is_cluster",
    "lifespan",
    "mask_url",
    "parse_redis_url",
    "redis_client",
    "redis_lifespan",
    "scan_keys",
    "unlink_matching",
]

log = logging.getLogger("app.redis")

redis_client: AnyRedis | None = None
"""The process-wide client. Tests may assign a fakeredis client here."""

_owned_client: AnyRedis | None = None  # the client this module built (and will close)

_INIT_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, redis_exc.RedisError)


def get_redis() -> AnyRedis:
    """The process-wide client, built on first use (no network I/O happens here)."""
    global redis_client, _owned_client
    client = redis_client
    if client is None:
        client = redis_client = _owned_client = build_client()
    return client


async def init_redis(settings: Settings | None = None, *, timeout: float | None = None) -> AnyRedis:
    """Build (if needed) and ping the global client, retrying with capped backoff.

    Raises ``RedisUnavailable`` after ``timeout`` (default ``REDIS_INIT_TIMEOUT``)
    seconds without an answer; a client this call built is closed first.
    """
    global redis_client, _owned_client
    s = settings or get_settings()
    if redis_client is None:
        redis_client = _owned_client = build_client(s)
    client = redis_client
    bound = s.redis_init_timeout if timeout is None else timeout
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    delay, attempts = s.redis_retry_backoff_base, 0
    url = mask_url(s.effective_redis_url) if client is _owned_client else "<assigned client>"
    while True:
        attempts += 1
        try:
            remaining = max(0.05, deadline - loop.time())
            async with asyncio.timeout(remaining):
                await client.ping()
            if attempts > 1:
                log.info("Redis at %s answered after %d attempts", url, attempts)
            return client
        except _INIT_ERRORS as exc:
            now = loop.time()
            if now + delay > deadline:
                if client is _owned_client:
                    await close_redis()
                raise RedisUnavailable(
                    f"Redis at {url} did not answer within {bound:.1f}s "
                    f"({attempts} attempts; last error: {exc or type(exc).__name__})",
                    url=url,
                ) from exc
            log.warning("Redis at %s not ready (%s); retrying in %.2fs", url, exc, delay)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, s.redis_retry_backoff_cap * 4)


def describe_client(client: Any, settings: Settings | None = None) -> str:
    """The masked URL of *client* if this module built it, else ``"<assigned client>"``."""
    if client is not None and client is _owned_client:
        return mask_url((settings or get_settings()).effective_redis_url)
    return "<assigned client>"


async def close_redis() -> None:
    """Close the global client if this module built it; forget it either way if built here.

    Waits first (at most ``DRAIN_TIMEOUT`` s) for clean-ups still running in the
    background, such as a lock released after its holder was cancelled.
    """
    global redis_client, _owned_client
    client = _owned_client
    if client is None:
        return
    # Drain while the client is still the global one: a clean-up that looks it up with
    # get_redis() must find it, not build (and leave open) a new one.
    still_running = await drain()
    if _owned_client is not client:
        return  # another close_redis() closed it meanwhile
    _owned_client = None
    if redis_client is client:
        redis_client = None
    if still_running:
        log.warning("closing the Redis client with %d clean-up(s) still running", still_running)
    try:
        await client.aclose()
    except Exception as exc:  # pragma: no cover - closing a dead connection
        log.debug("error while closing Redis client: %s", exc)


async def health(client: Any | None = None, *, details: bool = True) -> dict[str, Any]:
    """Ping latency, and with *details* server version, role and breaker state.

    Raises ``RedisUnavailable`` when Redis is down. With ``details=False`` only
    ``PING`` is sent and the report is ``{"status", "latency_ms"}``: what a
    public health probe may show. Servers without ``INFO``/``ROLE`` (the
    embedded fakeredis) report ``version`` ``None`` and role ``"embedded"``.
    """
    c = client if client is not None else get_redis()
    try:
        start = time.perf_counter()
        await c.ping()
        latency_ms = (time.perf_counter() - start) * 1000
        if not details:
            return {"status": "ok", "latency_ms": round(latency_ms, 3)}
        version, role = await _version_and_role(c)
    except CONNECTION_ERRORS as exc:
        raise RedisUnavailable(f"Redis health check failed: {exc}") from exc
    return {
        "status": "ok",
        "latency_ms": round(latency_ms, 3),
        "version": version,
        "role": role,
        "breaker": breaker_for(c).state,
    }


async def _version_and_role(client: Any) -> tuple[str | None, str]:
    try:
        info = await client.info("server")
    except redis_exc.ResponseError:
        return None, "embedded"
    if is_cluster(client):
        versions = {v.get("redis_version") for v in info.values() if isinstance(v, dict)}
        return (
            versions.pop() if len(versions) == 1 else ",".join(sorted(map(str, versions)))
        ), "cluster"
    try:
        reply = await client.execute_command("ROLE")
        first = reply[0]
        role = first.decode() if isinstance(first, bytes) else str(first)
    except redis_exc.ResponseError:
        role = "unknown"
    return info.get("redis_version"), role


Lifespan: TypeAlias = Callable[[Any], AbstractAsyncContextManager[Any]]


def redis_lifespan(inner: Lifespan | None = None) -> Lifespan:
    """A FastAPI lifespan that runs ``init_redis`` / ``close_redis`` around *inner*.

    ``FastAPI(lifespan=redis_lifespan(my_lifespan))``: Redis is up before
    *my_lifespan* starts and closed after it ends; whatever *my_lifespan*
    yields (the lifespan state) is passed through.
    """

    @asynccontextmanager
    async def _lifespan(app: Any) -> AsyncIterator[Any]:
        await init_redis()
        try:
            if inner is None:
                yield None
            else:
                async with inner(app) as state:
                    yield state
        finally:
            await close_redis()

    return _lifespan


lifespan = redis_lifespan()
"""The plain lifespan: ``FastAPI(lifespan=lifespan)``."""
