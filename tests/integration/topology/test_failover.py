"""Sentinel failover: what keeps working, and what a failover can lose.

1. The demo app, under a running workload of HTTP-cache reads, rate-limit
   checks and session reads (plus a pub/sub subscriber), loses its primary
   (SIGKILL). Sentinels promote the replica; the same app and the same client
   (no restart) serve every kind of request correctly again, never answered
   500 meanwhile, and data replicated before the crash is still there.
2. Writes the replica had not received when the primary died are gone after
   the failover, because Redis replication is asynchronous: an idempotency
   record (the payment would run twice), rate-limit hits (the window resets),
   a session and a stream entry. The replica is paused (SIGSTOP) while they are
   written (its replication link cut) so the loss is certain, not a race.

Every loop is bounded in time. Afterwards the killed server is restarted (it
rejoins as a replica) and the tests wait until the setup has a synced replica
again, so later tests (and a second failover) find it whole.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from redis import Redis as SyncRedis

from app.core.redis import build_client
from app.services.idempotency import IdempotencyService
from app.services.pubsub import Broadcaster, Message, Reconnected
from app.services.rate_limit import RateLimiter
from app.services.sessions import SessionStore
from app.services.streams import StreamProducer
from app.testing.servers import RedisServer
from app.testing.topologies import SERVICE, LocalSentinel, wait_until
from app.testing.waiting import eventually

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MakeClient = Callable[..., Awaitable[httpx.AsyncClient]]


def _ready_for_failover(sentinel: LocalSentinel) -> bool:
    """The primary streams to an online replica, and a quorum of sentinels could promote it."""
    _, port = sentinel.master_address()
    with SyncRedis(port=port, socket_timeout=1) as primary:
        info = primary.info("replication")
        if info.get("role") != "master" or info.get("slave0", {}).get("state") != "online":
            return False
    agreeing = 0  # sentinels that could promote a replica now (a quorum is needed)
    for node in sentinel.sentinels:
        with SyncRedis(port=node.port, socket_timeout=1) as r:
            replicas = r.sentinel_slaves(SERVICE)
            agreeing += any(
                rep["is_slave"] and not rep["is_sdown"] and not rep["is_disconnected"]
                for rep in replicas
            )
    return agreeing >= 2


def _replica(sentinel: LocalSentinel) -> RedisServer:
    primary = sentinel.current_primary()
    [replica] = [s for s in (sentinel.primary, sentinel.replica) if s is not None and s != primary]
    return replica


@pytest.fixture
def sentinel(redis_sentinel: LocalSentinel) -> Iterator[LocalSentinel]:
    """The session's Sentinel setup with a synced replica; made whole again afterwards."""
    for node in redis_sentinel.sentinels:
        # a sentinel waits 2 x failover-timeout before it fails the same primary over again
        with SyncRedis(port=node.port, socket_timeout=2) as r:
            r.sentinel_set(SERVICE, "failover-timeout", 2000)
    wait_until("a synced replica (a previous failover may still be healing)",
          lambda: _ready_for_failover(redis_sentinel))  # fmt: skip
    redis_sentinel.flushall()
    yield redis_sentinel
    host, port = redis_sentinel.master_address()
    with SyncRedis(port=port, socket_timeout=2) as primary:
        primary.config_set("repl-diskless-sync-delay", 0)  # full sync now, not in 5 s
    for server in (redis_sentinel.primary, redis_sentinel.replica):
        if server is not None and not server.is_running():
            server.start()  # empty; made a replica at once (the sentinels would, in ~10 s)
            with SyncRedis(port=server.port, socket_timeout=2) as restarted:
                restarted.replicaof(host, port)
    wait_until("the killed server to rejoin as a synced replica",
          lambda: _ready_for_failover(redis_sentinel))  # fmt: skip
    redis_sentinel.flushall()


@pytest_asyncio.fixture
async def client(sentinel: LocalSentinel) -> AsyncIterator[Any]:
    """A client built from the ``redis+sentinel://`` URL, exactly as the app builds it."""
    made = build_client(url=sentinel.url)
    try:
        yield made
    finally:
        await made.aclose()


async def test_the_app_keeps_serving_through_a_failover_without_a_restart(
    sentinel: LocalSentinel, client: Any, make_app_client: MakeClient
) -> None:
    http = await make_app_client(None, client)
    assert (await http.post("/session/login", json={"user": "alice"})).status_code == 200
    assert (await http.get("/http-cache/items/1")).headers["x-cache"] == "MISS"
    assert await client.wait(1, 2000) == 1  # replicated: it must survive the failover

    async def cache_read() -> str:
        r = await http.get("/http-cache/items/1")
        return f"{r.status_code} {r.headers.get('x-cache')}"

    async def rate_limit_check() -> str:  # 20/minute: 200 then 429, headers while Redis counts
        r = await http.get("/limits/plan", headers={"x-plan": "pro"})
        return f"{r.status_code} {'counted' if 'ratelimit' in r.headers else 'uncounted'}"

    async def session_read() -> str:
        r = await http.get("/session/profile")
        return f"{r.status_code} {r.json().get('user') if r.status_code == 200 else ''}".strip()

    healthy = {
        "cache": lambda o: o == "200 HIT",
        "limit": lambda o: o in ("200 counted", "429 counted"),
        "session": lambda o: o == "200 alice",
    }
    calls = {"cache": cache_read, "limit": rate_limit_check, "session": session_read}
    # (sent, answered, outcome): a request in flight when the primary dies is neither
    # "before" (answered before the kill) nor "during" (sent while there was no primary)
    seen: dict[str, list[tuple[float, float, str]]] = {kind: [] for kind in calls}
    stop = asyncio.Event()
    clock = asyncio.get_running_loop().time

    async def workload(kind: str) -> None:
        while not stop.is_set():
            sent = clock()
            outcome = await calls[kind]()
            seen[kind].append((sent, clock(), outcome))
            await asyncio.sleep(0.01)

    broadcaster = Broadcaster(
        client, ping_interval=0.2, ping_timeout=0.5, connect_timeout=0.5, backoff_cap=0.2
    )
    try:
        async with broadcaster.subscribe("news") as sub:
            workers = [asyncio.create_task(workload(kind)) for kind in calls]
            try:
                await eventually(
                    lambda: all(len(seen[k]) >= 2 for k in calls), "answers of every kind"
                )
                killed_at = clock()
                await asyncio.to_thread(sentinel.kill_primary_and_wait_for_failover)
                promoted_at = clock()

                async def recovered() -> bool:
                    return all(
                        len(after := [o for t, _, o in seen[k] if t > promoted_at]) >= 3
                        and all(map(healthy[k], after[-3:]))
                        for k in calls
                    )

                await eventually(
                    recovered,
                    "every kind of request is served correctly again",
                    errors_mean_not_yet=True,
                )
            finally:
                stop.set()
                await asyncio.gather(*workers)

            event = await sub.get(10)
            assert isinstance(event, Reconnected) and event.may_have_missed
            got: list[Any] = []

            async def delivered() -> bool:
                await broadcaster.publish("news", "after the failover")
                got.append(await sub.get(0.5))
                return isinstance(got[-1], Message)

            await eventually(
                delivered,
                "a message published after the failover is delivered",
                errors_mean_not_yet=True,
            )
    finally:
        await broadcaster.aclose(drain_timeout=0.5)

    for kind, outcomes in seen.items():
        before = [o for _, answered, o in outcomes if answered < killed_at]
        assert before and all(map(healthy[kind], before)), (kind, before)
        # while there was no primary: cache and rate limits fail open, sessions answer 503;
        # nothing is ever a 500
        assert all(o.split()[0] in ("200", "304", "429", "503") for *_, o in outcomes), outcomes
    # the outage was seen, and each service degraded as configured: the cache and the rate
    # limiter fail open (a miss, an uncounted request), sessions fail closed (503)
    during = {kind: {o for t, _, o in seen[kind] if killed_at < t < promoted_at} for kind in seen}
    assert "200 MISS" in during["cache"] and {o for *_, o in seen["cache"]} <= {
        "200 HIT",
        "200 MISS",
    }
    assert "200 uncounted" in during["limit"]
    assert "503" in during["session"]


async def test_writes_the_replica_had_not_received_are_lost_in_a_failover(
    sentinel: LocalSentinel, client: Any
) -> None:
    idempotency = IdempotencyService(client)
    limiter = RateLimiter(client, max_requests=2, window_seconds=3600)
    sessions = SessionStore(client)
    producer = StreamProducer(client, "orders")

    kept_session = await sessions.create(data={"user": "kept"})
    await idempotency.store_request("replicated", {"ok": 1})
    assert await client.wait(1, 2000) == 1

    old = sentinel.current_primary()
    replica = _replica(sentinel)
    replica.pause()  # SIGSTOP, then cut its replication link: it receives nothing from now on
    try:
        with SyncRedis(port=old.port, socket_timeout=2) as primary:
            assert primary.client_kill_filter(_type="replica") == 1
        await idempotency.store_request("pay-1", {"charged": True})
        assert await idempotency.is_duplicate("pay-1")
        assert [await limiter.is_allowed("u") for _ in range(3)] == [True, True, False]
        lost_session = await sessions.create(data={"user": "lost"})
        await producer.add({"order": 1})
        assert await client.wait(1, 100) == 0  # acknowledged by no replica
        old.kill()
    finally:
        replica.resume()
    await asyncio.to_thread(
        wait_until, "the sentinels to promote the replica",
        lambda: sentinel.master_address()[1] == replica.port,
    )  # fmt: skip

    async def answers() -> bool:
        return bool(await idempotency.get_result("replicated") == {"ok": 1})

    await eventually(answers, "the client reaches the new primary", errors_mean_not_yet=True)
    # the completed payment is unknown again: a retry of the request would charge twice
    assert await idempotency.get_result("pay-1") is None
    assert (await idempotency.claim("pay-1")).status == "new"
    # the rate-limit window restarted: the refused caller is admitted again
    assert await limiter.is_allowed("u") is True
    assert await sessions.get(lost_session.id) is None
    assert await sessions.get(kept_session.id) is not None
    assert await producer.length() == 0
