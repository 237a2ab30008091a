"""The lease deadline the watchdog enforces, on a real redis-server behind a stalled link.

The holder talks to Redis through a ``TcpProxy``; its client waits up to
``socket_timeout`` (longer than the lease) per attempt and retries, as the
production client does. The test stalls the link while the holder's guarded
block runs. A rival connected directly polls for the lock and takes it as soon
as the holder's lease ends in Redis. Every time is read from the event loop's
monotonic clock, in one process, so the two owners' intervals can be compared.

Overlap of two owners = the moment the holder's guarded block stopped running
(it was cancelled) minus the moment the rival's winning attempt was *sent* (the
earliest it can own the lock: a conservative bound). By design the holder stops
``drift`` *before* its lease can end in Redis, so the overlap is normally
negative; the assertion allows up to ``+drift``, which leaves twice the drift
margin (0.2 s) for the event loop to run a timer late on a loaded machine.

The holder's code sees ``LockLost`` as soon as the block has unwound (the exit
does not wait for a release past the deadline), so the same bound holds for it.

Before the deadline was enforced locally, the holder ran until its renewal call
gave up: seconds (socket timeout x attempts) of two owners.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from redis.asyncio import Redis

from app.api.deps import request_lock
from app.api.problems import install_problem_handlers
from app.core.errors import LockLost
from app.core.redis import build_client
from app.services.locks import RedisLock, Redlock, Semaphore
from app.testing.plugin import AppClientFactory
from app.testing.proxy import TcpProxy
from app.testing.servers import RedisServer, redis_server_binary

pytestmark = pytest.mark.integration

LEASE = 1.5
"""The holder's lease (seconds): shorter than one socket timeout of its client."""
DRIFT = 0.1
"""The configured drift margin (seconds): the holder stops this long before its lease ends."""
SOCKET_TIMEOUT = 2.0
"""The holder's client waits this long per attempt (and retries twice): longer than the lease."""
BOUND = 30.0
"""Deadline for every wait in these tests (proves "no hang", not speed)."""


class _Stallable(Protocol):
    def stall(self) -> None: ...


@dataclass
class _Holder:
    """What the holder's guarded block saw, in loop time."""

    entered: asyncio.Event
    stopped: float | None = None  # the block stopped running (cancelled)
    lost_at: float | None = None  # the holder's code saw LockLost
    error: BaseException | None = None


@pytest_asyncio.fixture
async def stalling_client(
    tcp_proxy: Callable[..., TcpProxy], settings_override: Callable[..., None]
) -> AsyncIterator[tuple[TcpProxy, Any]]:
    """A client built as the app builds it (socket timeout 2 s, 2 retries), through a proxy."""
    settings_override(redis_socket_timeout=SOCKET_TIMEOUT, redis_retry_attempts=2)
    proxy = tcp_proxy()
    client = build_client(url=proxy.url)
    try:
        yield proxy, client
    finally:
        proxy.resume()
        await client.aclose()


def _hold(lease: Any) -> tuple[_Holder, Callable[[], Coroutine[Any, Any, None]]]:
    """A guarded block under *lease* (``async with``) that works until it is stopped."""
    seen = _Holder(entered=asyncio.Event())

    async def run() -> None:
        loop = asyncio.get_running_loop()
        try:
            async with lease:
                seen.entered.set()
                try:
                    await asyncio.Event().wait()  # the guarded work: runs until cancelled
                finally:
                    seen.stopped = loop.time()
        except LockLost as exc:
            seen.lost_at = loop.time()
            seen.error = exc

    return seen, run


async def _owned_from(take: Callable[[], Awaitable[bool]]) -> float:
    """Poll *take* (a non-blocking acquire) until it wins; when the winning attempt was sent."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(BOUND):
        while True:
            sent = loop.time()
            if await take():
                return sent
            await asyncio.sleep(0.002)  # poll pacing; the deadline above bounds the wait


async def _overlap_after_stall(
    proxy: _Stallable, lease: Any, rival: Callable[[], Awaitable[bool]]
) -> tuple[_Holder, float]:
    """Hold *lease*, stall the link, let *rival* take over; (what the holder saw, overlap)."""
    seen, run = _hold(lease)
    holder = asyncio.create_task(run())
    async with asyncio.timeout(BOUND):
        await seen.entered.wait()
    proxy.stall()
    rival_from = await _owned_from(rival)
    async with asyncio.timeout(BOUND):
        await holder
    assert seen.stopped is not None and seen.lost_at is not None, "the holder was never stopped"
    assert seen.lost_at - rival_from <= DRIFT, f"LockLost {seen.lost_at - rival_from:.3f} s late"
    return seen, seen.stopped - rival_from


async def _evalsha_calls(client: Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def _deliver_the_stalled_calls(proxy: TcpProxy, direct: Redis) -> None:
    """Resume the link and wait until the holder's late renewal and release ran in Redis.

    Both are scripts (``EVALSHA``); nobody else runs one meanwhile (the rival holds).
    """
    before = await _evalsha_calls(direct)
    proxy.resume()
    async with asyncio.timeout(BOUND):
        while await _evalsha_calls(direct) < before + 2:
            await asyncio.sleep(0.01)  # poll pacing; the deadline above bounds the wait


async def test_a_stalled_link_stops_the_lock_holder_before_a_rival_takes_the_lock(
    stalling_client: tuple[TcpProxy, Any], real_redis: Redis
) -> None:
    proxy, slow = stalling_client
    lock = RedisLock(slow, "jobs:stalled", timeout=LEASE, auto_renew=True, drift=DRIFT)
    rival = RedisLock(real_redis, "jobs:stalled", timeout=30)

    seen, overlap = await _overlap_after_stall(proxy, lock, rival.acquire)

    assert overlap <= DRIFT, f"two owners for {overlap:.3f} s"
    assert seen.stopped is not None and seen.lost_at is not None
    assert seen.stopped <= seen.lost_at
    assert isinstance(seen.error, LockLost) and seen.error.lock_name == "jobs:stalled"
    assert "no renewal was confirmed" in str(seen.error)
    # the holder's renewal and release reach Redis late: compare-and-act leaves the rival alone
    await _deliver_the_stalled_calls(proxy, real_redis)
    assert await rival.owned()
    assert await real_redis.pttl(rival.key) > 25_000
    await rival.release()


async def test_a_stalled_link_stops_the_permit_holder_before_a_rival_takes_the_slot(
    stalling_client: tuple[TcpProxy, Any], real_redis: Redis
) -> None:
    proxy, slow = stalling_client
    sem = Semaphore(slow, "exports", 1, timeout=LEASE, auto_renew=True, drift=DRIFT)
    rival = Semaphore(real_redis, "exports", 1, timeout=30)
    permits: list[Any] = []

    async def take() -> bool:
        permit = await rival.acquire()
        if permit is not None:
            permits.append(permit)
        return permit is not None

    seen, overlap = await _overlap_after_stall(proxy, sem, take)

    assert overlap <= DRIFT, f"two holders of a 1-permit semaphore for {overlap:.3f} s"
    assert isinstance(seen.error, LockLost) and "no renewal was confirmed" in str(seen.error)
    await _deliver_the_stalled_calls(proxy, real_redis)
    assert await rival.count() == 1 and await permits[0].owned()
    await permits[0].release()


@pytest.fixture
def three_servers() -> Iterator[list[RedisServer]]:
    """Three independent redis-server processes (Redlock masters)."""
    if redis_server_binary() is None:
        pytest.fail("these tests need redis-server on PATH")
    started: list[RedisServer] = []
    try:
        for _ in range(3):
            started.append(RedisServer().start())
        yield started
    finally:
        for server in started:
            server.cleanup()


async def test_a_stalled_quorum_stops_the_redlock_holder_before_a_rival_takes_the_lock(
    three_servers: list[RedisServer], tcp_proxy: Callable[..., TcpProxy]
) -> None:
    proxies = [tcp_proxy(s.host, s.port) for s in three_servers]
    slow = [Redis.from_url(p.url, socket_timeout=SOCKET_TIMEOUT) for p in proxies]
    direct = [Redis.from_url(s.url, socket_timeout=SOCKET_TIMEOUT) for s in three_servers]
    try:
        # a master's reply may take as long as a socket timeout (longer than the lease)
        lock = Redlock(
            slow,
            "billing",
            timeout=LEASE,
            auto_renew=True,
            node_timeout=SOCKET_TIMEOUT,
            drift_factor=DRIFT / LEASE,  # drift = DRIFT + 2 ms
        )
        rival = Redlock(direct, "billing", timeout=30, node_timeout=0.5)

        seen, overlap = await _overlap_after_stall(_Links(proxies), lock, rival.acquire)

        assert overlap <= lock.drift, f"two owners for {overlap:.3f} s"
        assert isinstance(seen.error, LockLost) and "no renewal was confirmed" in str(seen.error)
        for proxy in proxies:
            proxy.resume()
        assert await rival.owned()
        await rival.release()
    finally:
        for client in (*slow, *direct):
            await client.aclose()


class _Links:
    """Several proxies stalled as one link."""

    def __init__(self, proxies: list[TcpProxy]) -> None:
        self.proxies = proxies

    def stall(self) -> None:
        for proxy in self.proxies:
            proxy.stall()


async def test_a_stalled_link_cancels_a_locked_request_before_a_rival_takes_the_lock(
    stalling_client: tuple[TcpProxy, Any], real_redis: Redis, make_app_client: AppClientFactory
) -> None:
    proxy, slow = stalling_client
    seen = _Holder(entered=asyncio.Event())
    app = FastAPI()
    install_problem_handlers(app)

    @app.post("/work/{job}")
    async def work(
        job: str,
        lock: Annotated[RedisLock, request_lock("work:{job}", timeout=LEASE, drift=DRIFT)],
    ) -> dict[str, Any]:
        seen.entered.set()
        try:
            await asyncio.Event().wait()  # the handler's work: runs until cancelled
        finally:
            seen.stopped = asyncio.get_running_loop().time()
        return {"fence": lock.fence}

    client: httpx.AsyncClient = await make_app_client(app, slow)
    request = asyncio.create_task(client.post("/work/1"))
    async with asyncio.timeout(BOUND):
        await seen.entered.wait()
    proxy.stall()
    rival = RedisLock(real_redis, "work:1", timeout=30)
    rival_from = await _owned_from(rival.acquire)
    async with asyncio.timeout(BOUND):
        response = await request
    answered = asyncio.get_running_loop().time()

    assert seen.stopped is not None and seen.stopped <= answered
    assert answered - rival_from <= DRIFT, f"two owners for {answered - rival_from:.3f} s"
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith("/lock-lost")
    await _deliver_the_stalled_calls(proxy, real_redis)
    assert await rival.owned()
    assert await real_redis.pttl(rival.key) > 25_000
    await rival.release()
