"""CacheService and RedisLock across a Sentinel failover: what survives, what is lost.

One failover, provoked under a cache with local tiers in two "processes" and
locks held by two owners. The replica is paused (SIGSTOP) and its replication
link cut while the last writes are made, so those writes are certainly lost,
then the primary is SIGKILLed and the sentinels promote the replica. The same
clients (no restart) then reach the new primary.

* Cache: while there is no primary, calls fail open (the factory runs, nothing
  raises); afterwards replicated entries are served, unreplicated ones are
  misses, and the local tiers, resubscribed and flushed, are kept coherent
  again by the invalidation channel.
* Locks: while there is no primary, ``acquire`` raises ``RedisUnavailable``; a
  lock whose acquisition was replicated is still held by its owner; one whose
  acquisition was not is gone: a second owner gets it, with the *same* fencing
  token, and the first owner's release raises ``LockNotOwned``.

Afterwards the killed server rejoins as a synced replica, so later tests (and a
later failover) find the setup whole.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio
from redis import Redis as SyncRedis
from redis.exceptions import RedisError

from app.core.errors import LockNotOwned, RedisUnavailable
from app.core.redis import build_client
from app.services.cache import MISSING, CacheService, LocalCache
from app.services.locks import RedisLock
from app.testing.clients import twin
from app.testing.servers import RedisServer
from app.testing.topologies import SERVICE, LocalSentinel
from app.testing.waiting import eventually
from tests.unit.services import test_cache_local as unit_local

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _answers(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except (RedisError, OSError):
        return False


def _wait(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not _answers(check):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def _ready_for_failover(sentinel: LocalSentinel) -> bool:
    """The primary streams to an online replica, and a quorum of sentinels could promote it."""
    _, port = sentinel.master_address()
    with SyncRedis(port=port, socket_timeout=1) as primary:
        info = primary.info("replication")
        if info.get("role") != "master" or info.get("slave0", {}).get("state") != "online":
            return False
    agreeing = 0
    for node in sentinel.sentinels:
        with SyncRedis(port=node.port, socket_timeout=1) as r:
            agreeing += any(
                rep["is_slave"] and not rep["is_sdown"] and not rep["is_disconnected"]
                for rep in r.sentinel_slaves(SERVICE)
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
        with SyncRedis(port=node.port, socket_timeout=2) as r:
            r.sentinel_set(SERVICE, "failover-timeout", 2000)  # may fail over again soon
    _wait("a synced replica", lambda: _ready_for_failover(redis_sentinel))
    redis_sentinel.flushall()
    yield redis_sentinel
    host, port = redis_sentinel.master_address()
    with SyncRedis(port=port, socket_timeout=2) as primary:
        primary.config_set("repl-diskless-sync-delay", 0)
    for server in (redis_sentinel.primary, redis_sentinel.replica):
        if server is not None and not server.is_running():
            server.start()  # empty; a replica at once (the sentinels would take ~10 s)
            with SyncRedis(port=server.port, socket_timeout=2) as restarted:
                restarted.replicaof(host, port)
    _wait("the killed server to rejoin as a synced replica",
          lambda: _ready_for_failover(redis_sentinel))  # fmt: skip
    redis_sentinel.flushall()


@pytest_asyncio.fixture
async def clients(sentinel: LocalSentinel) -> AsyncIterator[list[Any]]:
    """Two clients (two "processes") built from the ``redis+sentinel://`` URL as the app does."""
    first = build_client(url=sentinel.url)
    made = [first, twin(first)]
    try:
        yield made
    finally:
        for client in made:
            await client.aclose()


async def test_cache_and_locks_across_a_sentinel_failover(
    sentinel: LocalSentinel, clients: list[Any]
) -> None:
    client, other = clients
    writer = CacheService(client, local=LocalCache(ttl=60))
    reader = CacheService(other, local=LocalCache(ttl=60))
    kept = RedisLock(client, "kept", timeout=30)
    lost = RedisLock(client, "lost", timeout=30)
    try:
        assert await writer.start() and await reader.start()
        await writer.set("replicated", "v1", ttl=60)
        await unit_local.prime(reader, "replicated", "v1")
        assert await kept.acquire()
        assert await lost.acquire()
        await lost.release()  # its fence counter is replicated; the next acquire is not
        assert await client.wait(1, 2000) == 1

        old = sentinel.current_primary()
        replica = _replica(sentinel)
        replica.pause()  # it receives nothing from now on
        try:
            with SyncRedis(port=old.port, socket_timeout=2) as primary:
                assert primary.client_kill_filter(_type="replica") == 1
            await writer.set("unreplicated", "x", ttl=60)
            assert await lost.acquire()
            assert await client.wait(1, 100) == 0  # acknowledged by no replica
            old.kill()

            # No primary now (the sentinels need a second to notice): fail open, or raise.
            async def origin() -> str:
                return "from the origin"

            assert await writer.get_or_set("during", origin, ttl=60) == "from the origin"
            with pytest.raises(RedisUnavailable):
                await RedisLock(client, "during", timeout=5).acquire()
        finally:
            replica.resume()
        await asyncio.to_thread(
            _wait, "the sentinels to promote the replica",
            lambda: sentinel.master_address()[1] == replica.port,
        )  # fmt: skip

        async def served() -> bool:
            return bool(await writer.get("replicated", MISSING) == "v1")

        await eventually(served, "the cache reaches the new primary", errors_mean_not_yet=True)
        assert await writer.get("unreplicated", MISSING) is MISSING  # lost: a miss, recomputed
        assert writer.stats()["fail_open"] >= 1

        # The local tiers resubscribed (flushed: nothing missed is served) and hear writes again.
        async def resubscribed() -> bool:
            local = reader.stats()["local"]
            return bool(local["subscriptions"] >= 2 and local["active"])

        await eventually(
            resubscribed, "the reader's invalidation channel is back", errors_mean_not_yet=True
        )
        await writer.set("replicated", "v2", ttl=60)
        await eventually(lambda: unit_local._equals(reader, "replicated", "v2"))

        async def kept_owned() -> bool:
            return await kept.owned()

        await eventually(
            kept_owned, "the replicated lock is still held by its owner", errors_mean_not_yet=True
        )
        await kept.release()
        second = RedisLock(other, "lost", timeout=30)
        assert await second.acquire()  # the unreplicated acquisition is gone: a second owner
        assert second.fence == lost.fence  # and the same fencing token was issued twice
        with pytest.raises(LockNotOwned):
            await lost.release()
        await second.release()
    finally:
        await reader.aclose()
        await writer.aclose()
