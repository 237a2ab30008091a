"""RateLimitMiddleware and the rate_limit dependency over real Redis, on every topology."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any, get_args

import httpx
import pytest
import pytest_asyncio
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from redis.asyncio import Redis

from app.api.problems import install_problem_handlers
from app.api.routes import rate_limit as demo
from app.core import redis as core_redis
from app.core.redis import scan_keys
from app.middleware.rate_limit import APIKey, ClientIP, RateLimitRule, first_of
from app.services.rate_limit import Algorithm
from app.testing.servers import RedisServer
from app.testing.waiting import eventually
from tests.unit.middleware.test_rate_limit import build_app, check_ratelimit_headers, statuses

ALL: tuple[Algorithm, ...] = get_args(Algorithm)
Serve = Callable[..., Any]


@pytest.fixture
def redis(topology_client: Any) -> Any:
    """Standalone, Cluster or Sentinel, bytes or decoded replies."""
    return topology_client


async def _serve(stack: AsyncExitStack, started: dict[int, Any], app: FastAPI, **kw: Any) -> Any:
    if id(app) not in started:
        started[id(app)] = await stack.enter_async_context(LifespanManager(app))
    peer = kw.pop("peer", ("127.0.0.1", 50000))
    transport = httpx.ASGITransport(app=started[id(app)].app, client=peer, **kw)
    return await stack.enter_async_context(
        httpx.AsyncClient(transport=transport, base_url="http://testserver")
    )


@pytest_asyncio.fixture
async def serve(redis: Any) -> AsyncIterator[Serve]:
    """``await serve(app, peer=(host, port))``: an httpx client for *app* over real Redis."""
    core_redis.redis_client = redis
    started: dict[int, Any] = {}
    async with AsyncExitStack() as stack:

        async def make(app: FastAPI, **kw: Any) -> httpx.AsyncClient:
            client: httpx.AsyncClient = await _serve(stack, started, app, **kw)
            return client

        yield make


async def test_every_algorithm_behind_rules_emits_draft_headers(serve: Serve) -> None:
    rules = [
        RateLimitRule(f"/items/{algorithm}", "burst=2/minute;daily=4/day", algorithm=algorithm)
        for algorithm in ALL
    ]
    client = await serve(build_app(*rules))
    for algorithm in ALL:
        responses = [await client.get(f"/items/{algorithm}") for _ in range(3)]
        assert [r.status_code for r in responses] == [200, 200, 429], algorithm
        for response in responses:
            check_ratelimit_headers(response)
        policies, limits = check_ratelimit_headers(responses[1])
        assert policies == {"burst": {"q": 2, "w": 60}, "daily": {"q": 4, "w": 86400}}
        assert (limits["burst"]["r"], limits["daily"]["r"]) == (0, 2), algorithm
        refused = responses[2]
        assert refused.json()["violated-policies"] == ["burst"]
        assert 1 <= int(refused.headers["retry-after"]) <= 120, algorithm


async def test_retry_after_is_rounded_up_and_waiting_it_out_works(serve: Serve) -> None:
    app = build_app(
        RateLimitRule("/items/{item_id}", "1 per 1200ms", algorithm="fixed_window"),
        RateLimitRule("/admin/*", "1 per 300ms", algorithm="fixed_window"),
    )
    client = await serve(app)
    assert (await client.get("/items/1")).status_code == 200
    refused = await client.get("/items/1")
    _, limits = check_ratelimit_headers(refused)
    assert refused.headers["retry-after"] == "2"  # 1.1x s rounded up, never truncated to 1
    assert limits["1-per-1.2s"]["t"] == 2

    assert (await client.get("/admin/x")).status_code == 200
    short = await client.get("/admin/x")
    assert short.status_code == 429 and short.headers["retry-after"] == "1"  # never 0
    await asyncio.sleep(0.31)
    assert (await client.get("/admin/x")).status_code == 200


async def test_a_spoofed_forwarded_for_from_an_untrusted_peer_does_not_change_identity(
    serve: Serve, redis: Any
) -> None:
    app = build_app(RateLimitRule("*", "2/minute"), trusted_proxies=["10.0.0.0/8"])
    attacker = await serve(app, peer=("203.0.113.9", 1))
    spoofs = ["1.1.1.1", "2.2.2.2", "10.0.0.1", "3.3.3.3, 10.1.1.1", "4.4.4.4"]
    codes = [
        (await attacker.get("/items/1", headers={"x-forwarded-for": s})).status_code for s in spoofs
    ]
    assert codes == [200, 200, 429, 429, 429]
    keys = [k async for k in scan_keys(redis, "app:ratelimit:*")]
    assert len(keys) == 1 and "203.0.113.9" in str(keys[0])

    proxy = await serve(app, peer=("10.0.0.7", 2))
    for client_ip in ("198.51.100.1", "198.51.100.2"):
        chain = {"x-forwarded-for": f"6.6.6.6, {client_ip}, 10.0.0.8"}
        assert await statuses(proxy, "/items/1", 3, headers=chain) == [200, 200, 429]


async def test_concurrency_rule_under_real_concurrency_admits_exactly_the_limit(
    serve: Serve, redis: Any
) -> None:
    release = asyncio.Event()
    app = build_app(RateLimitRule("/slow", "slots=3 concurrent"))

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        await release.wait()
        return {"ok": True}

    client = await serve(app)
    pending = [asyncio.create_task(client.get("/slow")) for _ in range(20)]
    # every refusal answers at once, while the three admitted requests are held
    await eventually(lambda: sum(task.done() for task in pending) == 17, "17 refusals")
    release.set()
    responses = await asyncio.gather(*pending)
    assert sorted(r.status_code for r in responses) == [200] * 3 + [429] * 17
    for response in responses:
        check_ratelimit_headers(response)
    assert [k async for k in scan_keys(redis, "app:ratelimit:*")] == []  # every slot returned


async def test_stacked_dependencies(serve: Serve) -> None:
    from tests.unit.middleware.test_rate_limit import dependency_app

    client = await serve(dependency_app(headers_middleware=True))
    first = await client.get("/things/1", headers={"x-user": "ann"})
    policies, limits = check_ratelimit_headers(first)
    assert set(policies) == {"ip", "user"} and limits["user"]["r"] == 1
    assert (await client.get("/decision")).json() == {"remaining": [4, 8]}
    failing = await client.get("/fails")
    assert failing.status_code == 409 and check_ratelimit_headers(failing)[1]["f"]["r"] == 4


def demo_app() -> FastAPI:
    """The demo's rate-limit routes and middleware alone (other capabilities left out)."""
    app = FastAPI()
    install_problem_handlers(app)
    app.include_router(demo.router)
    demo.setup(app)
    return app


async def test_demo_routes_on_every_topology(serve: Serve) -> None:
    real_app_client = await serve(demo_app())
    assert await statuses(real_app_client, "/limits/ip", 6) == [200] * 5 + [429]
    refused = await real_app_client.get("/limits/ip")
    _, limits = check_ratelimit_headers(refused)
    assert limits["ip"]["t"] == 2 and int(refused.headers["retry-after"]) >= 2
    stacked = [await real_app_client.get("/limits/stacked") for _ in range(3)]
    assert [r.status_code for r in stacked] == [200, 200, 429]
    slow = [real_app_client.get("/limits/concurrency", params={"seconds": 0.3}) for _ in range(4)]
    assert sorted(r.status_code for r in await asyncio.gather(*slow)) == [200, 200, 429, 429]


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_a_dead_redis_fails_open_or_closed(settings_override: Any, mode: str) -> None:
    settings_override(rate_limit_failure_mode=mode, breaker_failure_threshold=1)
    server = RedisServer().start()
    client = Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    core_redis.redis_client = client
    try:
        app = build_app(RateLimitRule("*", "1/minute"))
        async with AsyncExitStack() as stack:
            http = await _serve(stack, {}, app)
            assert await statuses(http, "/items/1", 2) == [200, 429]
            server.kill()
            down = [await http.get("/items/1") for _ in range(3)]  # breaker opens on the 1st
            if mode == "open":
                assert [r.status_code for r in down] == [200, 200, 200]
                assert "ratelimit" not in down[0].headers
            else:
                assert [r.status_code for r in down] == [503, 503, 503]
                assert down[0].json()["type"].endswith("redis-unavailable")
    finally:
        await client.aclose()
        server.cleanup()


async def test_random_api_keys_never_buy_fresh_quotas(serve: Serve) -> None:
    """Issue 16, attack 8: ``first_of(APIKey(), ClientIP())`` gave every random key a quota."""
    valid = {"live-key"}

    async def validator(key: str) -> bool:
        return key in valid

    rule = RateLimitRule("*", "3/minute", key=first_of(APIKey(validator=validator), ClientIP()))
    client = await serve(build_app(rule))
    answers = [
        (await client.get("/items/1", headers={"X-API-Key": secrets.token_urlsafe(12)}))
        for _ in range(10)
    ]
    assert [r.status_code for r in answers] == [200] * 3 + [429] * 7
    assert answers[-1].headers["content-type"] == "application/problem+json"
    live = [await client.get("/items/1", headers={"X-API-Key": "live-key"}) for _ in range(4)]
    assert [r.status_code for r in live] == [200, 200, 200, 429]  # its own quota
