"""CacheService, the local tier and @cached on real servers: standalone, Cluster, Sentinel.

The behaviour tests of ``tests/unit/services/test_cache.py`` (everything taking
``cache_client``) and the two-process local-tier tests of
``tests/unit/services/test_cache_local.py`` (everything taking ``pair``) are
re-run here on every topology (``TOPOLOGY_CLIENTS``: standalone, a 3-primary
Cluster and Sentinel, with clients built as the app builds them; decoded
replies on standalone and Cluster). So are the topology tests at the end: a
stampede woken by ``BLPOP``, pattern and tag invalidation over keys on every
primary, local tiers kept coherent over pub/sub on a Cluster. The tests in
between need a standalone server of their own: several OS processes, a killed
subscriber connection, a server stopped mid-test, a crashed lease holder.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from types import ModuleType
from typing import Any

import pytest
import pytest_asyncio
from pydantic import BaseModel
from redis.asyncio import Redis

from app.core.keys import escape_glob
from app.core.redis import breaker_for, build_client, is_cluster, scan_keys
from app.services.cache import MISSING, CacheService, LocalCache, cached
from app.testing.clients import ready, twin
from app.testing.plugin import RedisServerInfo
from app.testing.servers import RedisServer
from app.testing.waiting import DEFAULT_DEADLINE, eventually
from tests.unit.services import test_cache as unit_behaviour
from tests.unit.services import test_cache_local as unit_local

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
WORKER = "tests.integration.services._cache_worker"


def _tests_taking(module: ModuleType, fixture: str) -> dict[str, Callable[..., Any]]:
    """The tests of *module* that take *fixture*, to be collected here once more.

    pytest collects every ``test_*`` function in a module's namespace, defined there
    or not, and resolves its fixtures from the module it is collected in: here
    ``cache_client`` and ``pair`` are this module's, which run on every topology.
    The functions themselves are shared, unchanged, with the unit modules.
    """
    return {
        name: test
        for name, test in vars(module).items()
        if name.startswith("test_") and fixture in inspect.signature(test).parameters
    }


globals().update(_tests_taking(unit_behaviour, "cache_client"))
globals().update(_tests_taking(unit_local, "pair"))


async def warmed(client: Any) -> Any:
    """*client* ready, its pool holding connections like that of an app that has served a while.

    A Sentinel-managed pool asks a sentinel for the primary on every new
    connection; on a cold pool 50 concurrent first calls would spend longer
    connecting than the unit tests' 50 ms factories take to run.
    """
    await ready(client)
    if not is_cluster(client):
        await asyncio.gather(*(client.ping() for _ in range(50)))
    return client


@pytest_asyncio.fixture
async def cache_client(topology_client: Any) -> Any:
    """A client of the topology (flushed per test), as the app builds it, or its decoded twin."""
    return await warmed(topology_client)


@pytest_asyncio.fixture
async def pair(
    topology_redis: Any, decode_responses: bool
) -> AsyncIterator[tuple[CacheService, CacheService]]:
    """Two CacheServices with local tiers, each on its own client (own connections) of the
    topology, like two worker processes."""
    clients = [twin(topology_redis, decode_responses=decode_responses) for _ in range(2)]
    services = [CacheService(c, local=LocalCache(ttl=60)) for c in clients]
    try:
        for service in services:
            assert await service.start()
        yield services[0], services[1]
    finally:
        for service in services:
            await service.aclose()
        for client in clients:
            await client.aclose()


async def spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        WORKER,
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": ROOT},
    )


async def read_json(proc: asyncio.subprocess.Process, timeout: float = 30) -> dict[str, Any]:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    if not line:
        stderr = await proc.stderr.read() if proc.stderr is not None else b""
        raise AssertionError(f"worker exited: {stderr.decode(errors='replace')[-2000:]}")
    parsed: dict[str, Any] = json.loads(line)
    return parsed


# -- stampede protection across OS processes ------------------------------------------


async def test_200_calls_over_4_processes_run_the_factory_once(
    real_redis: Redis, redis_server: RedisServerInfo
) -> None:
    run_id = uuid.uuid4().hex[:8]
    processes, calls, instances = 4, 50, 4
    procs = [
        await spawn("stampede", redis_server.url, str(calls), str(instances), run_id)
        for _ in range(processes)
    ]
    try:
        await eventually(lambda: _ready(real_redis, f"test:{run_id}:ready", processes), timeout=60)
        await real_redis.config_resetstat()
        await real_redis.rpush(f"test:{run_id}:go", *["go"] * processes)
        reports = [await read_json(p, timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.returncode is None:
                await p.wait()
    assert int(await real_redis.get(f"test:{run_id}:factory_runs") or 0) == 1
    results = [r for report in reports for r in report["results"]]
    assert len(results) == processes * calls == 200
    assert len({json.dumps(r, sort_keys=True) for r in results}) == 1
    assert len({report["pid"] for report in reports}) == processes
    assert sum(report["stats"]["factory_calls"] for report in reports) == 1
    waits = sum(report["stats"]["stampede_waits"] for report in reports)
    assert waits >= processes - 1  # the other processes waited on the lease holder
    wakeups = sum(report["stats"]["wakeups"] for report in reports)
    assert wakeups == waits  # every waiter was woken by the write, none by a timeout
    assert sum(report["stats"]["wait_timeouts"] for report in reports) == 0

    # Woken, not polling: each Redis-level contender (5 per process) ran the lock
    # script about once or twice and blocked in BLPOP about once.
    contenders = processes * (instances + 1)
    commands = await real_redis.info("commandstats")
    evalsha = commands.get("cmdstat_evalsha", {}).get("calls", 0)
    blpop = commands.get("cmdstat_blpop", {}).get("calls", 0)
    assert 0 < blpop <= 2 * contenders
    assert evalsha <= 3 * contenders + 2


async def _ready(client: Redis, key: str, count: int) -> bool:
    return int(await client.get(key) or 0) >= count


# -- the local tier across OS processes ----------------------------------------------------


async def test_local_tiers_of_other_processes_are_invalidated_within_milliseconds(
    real_redis: Redis, redis_server: RedisServerInfo
) -> None:
    writer = CacheService(real_redis)
    await writer.set("k", "v0", ttl=60, tags=["t"])
    reader = await spawn("reader", redis_server.url)
    latencies: list[float] = []
    try:
        assert (await read_json(reader)).get("ready")
        version = 0
        for _ in range(3):
            for change in ("set", "delete", "invalidate_tags", "invalidate"):
                primed = await read_json(reader)
                assert primed["primed"] == f"v{version}" and primed["local_hits"] > 0
                if change == "set":
                    await writer.set("k", f"v{version + 1}", ttl=60, tags=["t"])
                elif change == "delete":
                    await writer.delete("k")
                elif change == "invalidate_tags":
                    await writer.invalidate_tags("t")
                else:
                    await writer.invalidate("k*")
                done = asyncio.get_running_loop().time()
                evicted = await read_json(reader)
                latencies.append(max(0.0, evicted["evicted_at"] - done))
                assert evicted["after"] != f"v{version}"  # the old value is never served again
                version += 1
                if change != "set":
                    await writer.set("k", f"v{version}", ttl=60, tags=["t"])
        await read_json(reader)
        await writer.set("k", "stop", ttl=60)
        assert (await read_json(reader))["after"] == "stop"
    finally:
        if reader.returncode is None:
            reader.kill()
        await reader.wait()
    # The invalidation message, not the local TTL (60 s), evicted every copy. How fast it
    # does is measured in bench/ (the cache group), never asserted here: a loaded machine
    # may not schedule the reader for a while.
    assert max(latencies) < 30, latencies


async def test_a_reconnected_subscription_flushes_the_local_tier(
    real_redis: Redis, redis_server: RedisServerInfo
) -> None:
    client = Redis.from_url(redis_server.url)
    cache = CacheService(client, local=LocalCache(ttl=60))
    silent = CacheService(real_redis, broadcast=False)  # its writes tell nobody: a lost message
    try:
        assert await cache.start()
        await cache.set("k", "v1", ttl=60)
        await unit_local.prime(cache, "k", "v1")
        killed = await real_redis.client_kill_filter(_type="pubsub")
        assert killed >= 1
        await silent.set("k", "v2", ttl=60)
        await eventually(lambda: _subscriptions(cache, 2))
        assert await cache.get("k") == "v2"  # the copy cached before the drop is gone
    finally:
        await cache.aclose()
        await client.aclose()


async def _subscriptions(cache: CacheService, count: int) -> bool:
    local = cache.stats()["local"]
    return bool(local["subscriptions"] >= count and local["active"])


# -- Redis down ------------------------------------------------------------------------------


class Report(BaseModel):
    n: int
    source: str


async def test_redis_stopped_mid_test(
    settings_override: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    settings_override(breaker_reset_timeout=0.3, redis_socket_timeout=0.5)
    server = RedisServer().start()
    client = build_client(url=server.url)  # exactly as the app builds its client
    cache = CacheService(client, local=LocalCache(ttl=60))
    origin_calls = 0

    async def origin() -> Report:
        nonlocal origin_calls
        origin_calls += 1
        return Report(n=origin_calls, source="origin")

    @cached(ttl=60, cache=cache)
    async def report(day: str) -> Report:
        return await origin()

    try:
        assert await cache.start()
        assert await cache.get_or_set("k", origin, ttl=60, type_=Report) == Report(
            n=1, source="origin"
        )
        assert await report("mon") == Report(n=2, source="origin")
        assert await report("mon") == Report(n=2, source="origin")  # cached
        server.stop()
        with caplog.at_level(logging.WARNING, logger="app.cache"):
            for i in range(30):
                value = await cache.get_or_set("fresh", origin, ttl=60, type_=Report)
                assert value.source == "origin"
                assert (await report(f"day-{i}")).source == "origin"
                assert await cache.get("fresh", MISSING) is MISSING
        assert origin_calls == 2 + 60
        breaker = breaker_for(client)
        assert breaker.stats()["state"] in ("open", "half_open")
        ours = [r for r in caplog.records if r.name == "app.cache" and "failed" in r.message]
        assert 1 <= len(ours) <= breaker.transitions + 2  # per transition, not per call
        stats = cache.stats()
        assert stats["fail_open"] == 60 and stats["errors"] >= 60

        server.start()  # same port: the breaker's trial call finds it again
        await eventually(lambda: cache.set("back", 1, ttl=60), timeout=15)
        assert await cache.get("back") == 1
        assert breaker.stats()["state"] == "closed"
    finally:
        await cache.aclose()
        await client.aclose()
        server.cleanup()


async def test_a_crashed_lease_holder_is_taken_over_when_its_lease_ends(
    real_redis: Redis, redis_server: RedisServerInfo
) -> None:
    holder = await spawn("hold", redis_server.url)
    try:
        assert (await read_json(holder)).get("holding")
        cache = CacheService(real_redis)

        async def own() -> str:
            return "taken over"

        waiting = asyncio.create_task(cache.get_or_set("held", own, ttl=60, wait_timeout=30))
        await eventually(lambda: cache.stats()["stampede_waits"] == 1, "the caller to wait")
        assert not waiting.done()  # the lease is kept alive while the holder runs
        os.kill(holder.pid, signal.SIGKILL)
        assert await asyncio.wait_for(waiting, DEFAULT_DEADLINE) == "taken over"
        stats = cache.stats()
        assert stats["stampede_waits"] == 1 and stats["wait_timeouts"] == 0
    finally:
        if holder.returncode is None:
            holder.kill()
        await holder.wait()


# -- scale ---------------------------------------------------------------------------------


async def test_a_tag_larger_than_one_drain_is_removed_completely(real_redis: Redis) -> None:
    cache = CacheService(real_redis)
    items = {f"item:{i}": i for i in range(6000)}
    for start in range(0, 6000, 1000):
        chunk = dict(list(items.items())[start : start + 1000])
        assert await cache.set_many(chunk, ttl=60, tags=["big"])
    assert await cache.invalidate_tags("big") == 6000
    assert [k async for k in real_redis.scan_iter("*")] == []


async def test_decorator_on_real_redis(real_redis: Redis, redis_server: RedisServerInfo) -> None:
    text = Redis.from_url(redis_server.url, decode_responses=True)
    calls = 0

    @cached(ttl=60, cache=CacheService(text), tags=["reports"])
    async def build(day: str, *, region: str = "eu") -> Report:
        nonlocal calls
        calls += 1
        return Report(n=calls, source=f"{day}/{region}")

    try:
        first = await build("mon")
        assert await build("mon", region="eu") == first == Report(n=1, source="mon/eu")
        assert isinstance(await build("mon"), Report)
        assert await build.invalidate("mon")
        assert (await build("mon")).n == 2
        assert await build.cache.invalidate_tags("reports") == 1
        assert (await build("mon")).n == 3
    finally:
        await text.aclose()


async def test_demo_app_on_real_redis(real_app_client: Any) -> None:
    from app.api.routes.cache import ORIGIN_CALLS

    before = ORIGIN_CALLS["reports"]
    responses = await asyncio.gather(
        *[real_app_client.get("/cache/reports/weekly", params={"delay": 0.1}) for _ in range(20)]
    )
    assert {r.status_code for r in responses} == {200}
    assert ORIGIN_CALLS["reports"] == before + 1
    assert (await real_app_client.get("/cache/users/7")).json()["id"] == 7
    assert (await real_app_client.put("/cache/users/7", json={"name": "x"})).json()["invalidated"]
    stats = (await real_app_client.get("/stats")).json()
    assert stats["local"]["active"] and stats["coalesced"] >= 19


# -- every topology ---------------------------------------------------------------------------


def _primaries_holding(client: Any, rkeys: list[str]) -> set[str]:
    """Names of the Cluster primaries that own these keys' slots."""
    return {client.get_node_from_key(k).name for k in rkeys}


async def test_a_stampede_runs_the_factory_once_and_the_write_wakes_every_waiter(
    topology_redis: Any, decode_responses: bool
) -> None:
    """80 callers on one key: 8 services (each one Redis-level contender) over two clients."""
    second = twin(topology_redis, decode_responses=decode_responses)
    clients = [await ready(topology_redis), await ready(second)]
    # Leases and waits far longer than any loaded machine needs: the factory returns only
    # once the 7 other services are all waiting on it.
    services = [CacheService(clients[i % 2], lease=60, wait_timeout=60) for i in range(8)]
    calls = 0

    def waiting() -> int:
        return sum(int(svc.stats()["stampede_waits"]) for svc in services)

    async def slow() -> dict[str, int]:
        nonlocal calls
        calls += 1
        await eventually(lambda: waiting() == 7, "the 7 other services to wait on the lease")
        return {"computed": calls}

    try:
        results = await asyncio.gather(
            *[svc.get_or_set("hot", slow, ttl=60) for svc in services for _ in range(10)]
        )
        stats = [svc.stats() for svc in services]
    finally:
        await second.aclose()
    assert results == [{"computed": 1}] * 80 and calls == 1

    def total(name: str) -> int:
        return sum(int(s[name]) for s in stats)

    assert total("factory_calls") == 1 and total("coalesced") == 72
    # The 7 other services waited on the lease holder's BLPOP wake list (on a Cluster: on
    # the node of the key's slot) and were each woken by the write's push, none by a timeout.
    assert total("stampede_waits") == 7
    assert total("wakeups") == 7 and total("wait_timeouts") == 0 and total("errors") == 0


async def test_pattern_and_tag_invalidation_reach_keys_on_every_primary(
    topology_redis: Any, decode_responses: bool
) -> None:
    client: Any = twin(topology_redis, decode_responses=decode_responses)
    cache = CacheService(client)  # 16 shards (hash tags) on a Cluster, 1 elsewhere
    items = {f"item:{i}": i for i in range(200)}
    try:
        await ready(client)
        assert await cache.set_many(items, ttl=60, tags=["items"])
        await cache.set("other:1", 1, ttl=60, tags=["others"])
        if is_cluster(client):
            rkeys = [cache.redis_key(k) for k in items]
            assert _primaries_holding(client, rkeys) == {n.name for n in client.get_primaries()}
        # SCAN on every primary: item:1, item:10..19 and item:100..199
        assert await cache.invalidate("item:1*") == 111
        assert len(await cache.get_many(list(items))) == 89
        assert await cache.invalidate_tags("items") == 89  # one drain script per shard
        assert await cache.get_many(list(items)) == {}
        assert await cache.get("other:1") == 1
        left = [k async for k in scan_keys(client, escape_glob(cache.keys.root) + "*")]
        entry = cache.redis_key("other:1")
        tag_set = entry[: entry.index("}") + 1] + "|tag|others"
        assert sorted(k.decode() if isinstance(k, bytes) else k for k in left) == sorted(
            [entry, tag_set]
        )
        assert cache.stats()["errors"] == 0
    finally:
        await client.aclose()


async def test_local_tiers_are_invalidated_over_pubsub_for_keys_on_every_primary(
    topology_redis: Any, decode_responses: bool
) -> None:
    """Two "processes" with local tiers; writes land on every primary of a Cluster.

    The reader's client has run no command when its listener starts (a fresh
    ``RedisCluster`` has no slot map yet), and its one subscriber connection
    sits on one primary: messages published by scripts on the other primaries
    reach it over the cluster bus.
    """
    writer_client = await ready(topology_redis)
    reader_client = twin(topology_redis, decode_responses=decode_responses)
    writer = CacheService(writer_client, local=LocalCache(ttl=60))
    reader = CacheService(reader_client, local=LocalCache(ttl=60))
    keys = [f"user:{i}" for i in range(24)]
    try:
        assert await reader.start() and await writer.start()
        if is_cluster(writer_client):
            rkeys = [writer.redis_key(k) for k in keys]
            assert len(_primaries_holding(writer_client, rkeys)) == 3
        for n, key in enumerate(keys):
            await writer.set(key, f"v0-{n}", ttl=60, tags=["users"])
        for n, key in enumerate(keys):
            await unit_local.prime(reader, key, f"v0-{n}")
        for n, key in enumerate(keys):  # a write evicts the reader's copy: it reads the new one
            await writer.set(key, f"v1-{n}", ttl=60, tags=["users"])
        for n, key in enumerate(keys):
            await eventually(functools.partial(unit_local._equals, reader, key, f"v1-{n}"))
            await unit_local.prime(reader, key, f"v1-{n}")
        await writer.invalidate_tags("users")
        for key in keys:
            await eventually(functools.partial(unit_local._equals, reader, key, MISSING))
        await writer.set("user:x", "1", ttl=60)
        await unit_local.prime(reader, "user:x", "1")
        await writer.invalidate("user:*")
        await eventually(lambda: unit_local._equals(reader, "user:x", MISSING))
        local = reader.stats()["local"]
        assert local["subscriptions"] == 1 and local["messages"] >= len(keys) * 2 + 2
        assert reader.stats()["errors"] == writer.stats()["errors"] == 0
    finally:
        await reader.aclose()
        await writer.aclose()
        await reader_client.aclose()
