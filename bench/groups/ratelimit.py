"""Rate-limit checks: ours (one and three policies) against limits, fastapi-limiter (0.1.6
and 0.2), fastapi-redis-sdk and fastapi-alcazaba.

Baseline: a raw ``EVALSHA`` of a one-line ``INCR`` script, the least a
one-round-trip atomic check can cost. Every limiter is configured so that
every check is admitted (10^9 per minute, or the highest rate GCRA takes) and
checks one identity, as one busy client would. limits runs on redis-py
(``implementation="redispy"``: its default is coredis). The two
fastapi-limiter versions and alcazaba's limiter are FastAPI dependencies:
they are called as FastAPI calls them, with a request on an app whose route
declares them (0.1.6 and 0.2 scan ``app.routes`` on every call).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from bench.common import closing, fastapi_limiter_016, raw_client, toolkit_client
from bench.harness import Case, Op

INCR_SCRIPT = "return redis.call('INCR', KEYS[1])"
HUGE = 10**9
THREE = "burst=1000000/second;minute=100000000/minute;day=1000000000/day"


@asynccontextmanager
async def raw_evalsha(url: str) -> AsyncIterator[Op]:
    r = raw_client(url)
    sha = await r.script_load(INCR_SCRIPT)
    async with closing(r):
        yield lambda: r.evalsha(sha, 1, "bench:raw:n")


def ours(
    *, policies: str | None = None, algorithm: str = "gcra", plain: bool = False, full: bool = False
) -> Callable[[str], Any]:
    @asynccontextmanager
    async def make(url: str) -> AsyncIterator[Op]:
        from app.services.rate_limit import RateLimiter

        r = raw_client(url) if plain else toolkit_client(url)
        if policies is None:
            limiter = RateLimiter(r, max_requests=1_000_000, window_seconds=1, algorithm=algorithm)
        else:
            limiter = RateLimiter(r, policies=policies, algorithm=algorithm)
        async with closing(r):
            yield (
                (lambda: limiter.hit("user-1")) if full else (lambda: limiter.is_allowed("user-1"))
            )

    return make


def limits_strategy(name: str) -> Callable[[str], Any]:
    @asynccontextmanager
    async def make(url: str) -> AsyncIterator[Op]:
        from limits import parse
        from limits.aio import strategies
        from limits.aio.storage import RedisStorage

        parts = urlsplit(url)
        storage = RedisStorage(
            f"async+redis://{parts.hostname}:{parts.port}", implementation="redispy"
        )
        limiter = getattr(strategies, name)(storage)
        item = parse(f"{HUGE}/minute")
        identity = f"user-1-{name}"  # each strategy keeps its own key type
        try:
            yield lambda: limiter.hit(item, identity)
        finally:
            await storage.bridge.storage.aclose()

    return make


def _request_on(path: str, dependency: Any) -> tuple[Any, Any]:
    """A request on an app whose route *path* declares *dependency*, and a response."""
    from fastapi import Depends, FastAPI
    from starlette.requests import Request
    from starlette.responses import Response

    app = FastAPI()

    @app.get(path, dependencies=[Depends(dependency)])
    async def endpoint() -> dict[str, bool]:
        return {"ok": True}

    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"bench")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "scheme": "http",
        "app": app,
    }
    return Request(scope), Response()


@asynccontextmanager
async def fastapi_limiter_016_check(url: str) -> AsyncIterator[Op]:
    lib = fastapi_limiter_016()
    r = raw_client(url)
    await lib.FastAPILimiter.init(r)
    dependency = lib.RateLimiter(times=HUGE, minutes=1)
    request, response = _request_on("/limited", dependency)
    async with closing(r):
        yield lambda: dependency(request, response)


@asynccontextmanager
async def fastapi_limiter_02_check(url: str) -> AsyncIterator[Op]:
    from fastapi_limiter.depends import RateLimiter
    from pyrate_limiter import Duration, Limiter, Rate
    from pyrate_limiter.buckets.redis_bucket import RedisBucket

    r = raw_client(url)
    bucket = await RedisBucket.init([Rate(HUGE, Duration.MINUTE)], r, "bench:pyrate")
    limiter = Limiter(bucket)
    dependency = RateLimiter(limiter=limiter)
    request, response = _request_on("/limited", dependency)
    async with closing(r):
        try:
            yield lambda: dependency(request, response)
        finally:
            limiter.close()


@asynccontextmanager
async def sdk_hit(url: str) -> AsyncIterator[Op]:
    from redis_fastapi import RateLimitBackend

    r = raw_client(url)
    backend = RateLimitBackend(r, scope="bench")
    async with closing(r):
        yield lambda: backend.hit("user-1", limit=HUGE, window=60)


@asynccontextmanager
async def alcazaba_check(url: str) -> AsyncIterator[Op]:
    from fastapi_alcazaba import Cache, FastAPIRateLimiter
    from fastapi_alcazaba.backends.redis import RedisBackend

    r = raw_client(url)
    cache = Cache(RedisBackend(r), prefix="bench-alcazaba")
    dependency = FastAPIRateLimiter(times=HUGE, minutes=1, cache=cache)
    request, response = _request_on("/limited", dependency)
    async with closing(r):
        yield lambda: dependency(request, response)


def cases() -> list[Case]:
    base = "raw EVALSHA"
    return [
        Case(base, raw_evalsha),
        Case("ours is_allowed, 1 policy", ours(), base, note="GCRA (default); one EVALSHA"),
        Case("ours is_allowed, 1 policy, plain redis.asyncio client", ours(plain=True), base,
             note="the service alone: same client as the baseline"),
        Case("ours is_allowed, 3 policies", ours(policies=THREE), base,
             note="three policies, all-or-nothing, one EVALSHA"),
        Case("ours hit (full decision), 1 policy", ours(full=True), base,
             note="what the middleware uses: remaining/reset per policy"),
        Case("ours is_allowed, fixed window", ours(algorithm="fixed_window"), base),
        Case("ours is_allowed, sliding counter", ours(algorithm="sliding_counter"), base),
        Case("limits fixed window hit", limits_strategy("FixedWindowRateLimiter"), base),
        Case("limits moving window hit", limits_strategy("MovingWindowRateLimiter"), base),
        Case("limits sliding window counter hit", limits_strategy("SlidingWindowCounterRateLimiter"), base),
        Case("fastapi-limiter 0.1.6 RateLimiter check", fastapi_limiter_016_check, base,
             note="side copy in bench/.vendor (make bench installs it)"),
        Case("fastapi-limiter 0.2 RateLimiter check", fastapi_limiter_02_check, base,
             note="pyrate-limiter RedisBucket; its Limiter holds one asyncio lock around every check"),
        Case("fastapi-redis-sdk RateLimitBackend.hit", sdk_hit, base,
             note="Redis 7.0 here: its Lua path (INCREX needs Redis 8.8+)"),
        Case("alcazaba FastAPIRateLimiter check", alcazaba_check, base),
    ]  # fmt: skip
