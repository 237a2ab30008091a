"""Rate limiting on real Redis (standalone, Cluster, Sentinel): concurrency, clocks, TTLs, scripts."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, get_args

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from app.core.errors import RedisUnavailable
from app.core.redis import scan_keys
from app.services.rate_limit import ALGORITHMS, Algorithm, ConcurrencyLimiter, RateLimiter
from app.testing.clients import topology_url
from app.testing.plugin import RedisServerInfo
from app.testing.servers import RedisServer
from app.testing.waiting import eventually

ALL: tuple[Algorithm, ...] = get_args(Algorithm)
ROOT = Path(__file__).resolve().parents[3]
SCRIPT_COMMANDS = {
    "time", "get", "mget", "set", "pttl", "incrby", "pexpire", "hmget", "hset",
    "zremrangebyscore", "zcard", "zrange", "zadd", "zrem",
}  # fmt: skip


class CountingRedis(Redis):
    """A real client that records every command it sends (one entry per round trip)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands: list[str] = []

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        name = args[0]
        self.commands.append((name.decode() if isinstance(name, bytes) else str(name)).upper())
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


@pytest_asyncio.fixture
async def client(
    decode_responses: bool, real_redis: Redis, redis_server: RedisServerInfo
) -> AsyncIterator[CountingRedis]:
    """A counting client to the session's real server (flushed by ``real_redis``)."""
    counting = CountingRedis.from_url(redis_server.url, decode_responses=decode_responses)
    assert isinstance(counting, CountingRedis)
    try:
        yield counting
    finally:
        await counting.aclose()


@pytest.fixture
def topo(topology_client: Any) -> Any:
    """Standalone, Cluster or Sentinel, bytes or decoded replies."""
    return topology_client


@pytest.fixture
def private_server() -> Any:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


# A RedisCluster client's per-node pool raises MaxConnectionsError past REDIS_POOL_SIZE
# connections instead of waiting for a free one (the standalone and Sentinel pools wait), so
# the Cluster run keeps each process's burst (requests x 5 limiters) under the pool size.
@pytest.mark.parametrize(
    ("topology_redis", "requests", "limit"),
    [
        pytest.param("standalone", 500, 100, id="standalone"),
        pytest.param("cluster", 30, 40, id="cluster", marks=pytest.mark.slow),
        pytest.param("sentinel", 500, 100, id="sentinel", marks=pytest.mark.slow),
    ],
    indirect=["topology_redis"],
)
async def test_concurrent_checks_from_two_processes_admit_exactly_the_limit(
    topology_redis: Any, request: pytest.FixtureRequest, requests: int, limit: int
) -> None:
    """2 processes x *requests* concurrent checks per algorithm, *limit* per hour: exactly
    *limit* admitted. Each worker builds its client from the topology's URL."""
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.integration.services._rate_limit_worker",
            topology_url(request),
            str(requests),
            str(limit),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 60)
    counts = []
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
        counts.append(json.loads(out))
    totals = {name: sum(c[name] for c in counts) for name in (*ALL, "concurrency")}
    # Exact over both processes (the workers fail closed, so nothing is admitted by a fallback).
    # Which process wins how many is up to the OS scheduler, so that is not asserted.
    assert totals == dict.fromkeys((*ALL, "concurrency"), limit), counts
    for name in ALL:
        limiter = RateLimiter(
            topology_redis, max_requests=limit, window_seconds=3600, algorithm=name
        )
        assert (await limiter.peek("contended")).results[0].remaining == 0


async def test_design_contract_three_per_second_then_allowed_after_the_window(
    topo: Any,
) -> None:
    """Three allowed, the fourth refused, allowed again after the window (all algorithms at
    once). The sliding counter approximates: it may take up to two windows, and says so."""
    limiters = [RateLimiter(topo, max_requests=3, window_seconds=1, algorithm=a) for a in ALL]

    async def run(limiter: RateLimiter) -> list[bool]:
        first = [await limiter.is_allowed("user-1") for _ in range(4)]
        wait = (await limiter.peek("user-1")).retry_after
        if limiter.algorithm == "sliding_counter":
            assert 0 < wait <= 2.0
            await asyncio.sleep(wait + 0.02)
            return [*first, await limiter.is_allowed("user-1")]
        assert 0 < wait <= 1.0
        await asyncio.sleep(1.02)
        return [*first, *[await limiter.is_allowed("user-1") for _ in range(4)]]

    outcomes = dict(zip(ALL, await asyncio.gather(*(run(lim) for lim in limiters)), strict=True))
    refused_then_back = [True, True, True, False, True, True, True, False]
    assert outcomes == {
        "gcra": refused_then_back,
        "sliding_counter": [True, True, True, False, True],
        "sliding_log": refused_then_back,
        "fixed_window": refused_then_back,
    }


@pytest.mark.parametrize("algorithm", ALL)
async def test_a_refusal_by_the_per_second_policy_leaves_the_daily_count_unchanged(
    topo: Any, algorithm: Algorithm
) -> None:
    limiter = RateLimiter(topo, policies="second=2/second;day=1000/day", algorithm=algorithm)
    assert (await limiter.hit("u")).allowed and (await limiter.hit("u")).allowed
    day_key = limiter.keys_for("u")[1]
    stored = await topo.dump(day_key)
    for _ in range(5):
        refused = await limiter.hit("u")
        assert not refused.allowed
        assert [r.name for r in refused.violated] == ["second"]
        assert refused.results[1].remaining == 998
    assert await topo.dump(day_key) == stored
    assert (await limiter.peek("u")).results[1].remaining == 998


@pytest.mark.parametrize("algorithm", ALL)
async def test_is_allowed_charges_every_policy_and_its_refusals_none(
    topo: Any, algorithm: Algorithm
) -> None:
    """The one-integer ``is_allowed`` reply counts exactly what ``hit`` reports, on every topology."""
    limiter = RateLimiter(topo, policies="minute=3/minute;day=5/day", algorithm=algorithm)
    assert [await limiter.is_allowed("u") for _ in range(5)] == [True, True, True, False, False]
    minute, day = (await limiter.peek("u")).results
    assert (minute.remaining, day.remaining) == (0, 2)


async def test_every_key_the_limiters_write_has_a_ttl(topo: Any) -> None:
    policies = "s=2/second;m=5/minute;d=10/day"
    for algorithm in ALL:
        limiter = RateLimiter(topo, policies=policies, algorithm=algorithm)
        for who in ("alice", "bob", "ip:10.0.0.1"):
            for _ in range(4):
                await limiter.hit(who)
            await limiter.peek(who)
    slots = ConcurrencyLimiter(topo, 2, lease_seconds=5)
    await slots.acquire("alice")
    released = await slots.acquire("bob")
    await slots.release(released)
    keys = [key async for key in scan_keys(topo, "app:ratelimit:*")]
    # 3 policies x 3 identifiers per algorithm, plus alice's lease set (bob's emptied set
    # was removed by Redis itself)
    assert len(keys) == len(ALL) * 3 * 3 + 1
    for key in keys:
        assert await topo.pttl(key) > 0, key
    assert [key async for key in scan_keys(topo, "*")] != []  # SCAN saw the keyspace


@pytest.mark.parametrize("algorithm", ALL)
async def test_a_check_after_script_flush_still_works(
    client: CountingRedis, algorithm: Algorithm
) -> None:
    limiter = RateLimiter(client, policies="a=2/minute;b=5/hour", algorithm=algorithm)
    assert (await limiter.hit("u")).allowed
    await client.script_flush()
    client.commands.clear()
    decision = await limiter.hit("u")
    assert decision.allowed and not decision.degraded
    assert [r.remaining for r in decision.results] == [0, 3]
    assert client.commands == ["EVALSHA", "EVAL"]  # NOSCRIPT, then the source (cached again)
    client.commands.clear()
    assert not await limiter.is_allowed("u")
    assert client.commands == ["EVALSHA"]


async def test_concurrency_after_script_flush_still_works(topo: Any) -> None:
    slots = ConcurrencyLimiter(topo, 1)
    await topo.script_flush()
    decision = await slots.acquire("u")
    assert decision.allowed and not decision.degraded
    await topo.script_flush()
    assert await slots.release(decision)


@pytest.mark.parametrize("algorithm", ALL)
async def test_one_round_trip_per_check_for_any_number_of_policies(
    client: CountingRedis, algorithm: Algorithm
) -> None:
    """Counted twice: commands the client sent, and the server's own command statistics."""
    for spec in ("1/second", "a=1/second;b=5/day", "a=1/s;b=2/m;c=3/h;d=4/d;e=5/week"):
        limiter = RateLimiter(client, policies=spec, algorithm=algorithm)
        await limiter.hit("warm-up")  # loads the script once per server
        before = await client.info("commandstats")
        client.commands.clear()
        for _ in range(5):
            await limiter.hit("u")
        await limiter.is_allowed("u")
        await limiter.peek("u")
        assert client.commands == ["EVALSHA"] * 7
        after = await client.info("commandstats")
        delta = {
            name.removeprefix("cmdstat_"): stats["calls"] - before.get(name, {"calls": 0})["calls"]
            for name, stats in after.items()
        }
        issued = {name: n for name, n in delta.items() if n and name not in SCRIPT_COMMANDS}
        assert issued == {"evalsha": 7, "info": 1}, issued  # the first INFO counted itself


async def test_sub_second_windows_use_the_server_clock(topo: Any) -> None:
    # A window may end between two hits (a loaded machine stretches the gaps), so the test
    # hits until refused, within three windows' worth, rather than counting on the 5th hit.
    for algorithm in ALL:
        limiter = RateLimiter(topo, policies="4/200ms", algorithm=algorithm)
        hits = 0
        while (result := await limiter.hit(algorithm)).allowed:
            hits += 1
            assert hits <= 12, f"{algorithm}: never refused"
        assert hits >= 4, algorithm
        wait = result.retry_after
        assert 0 < wait <= 0.4, algorithm  # the window is sub-second on the server's clock
        await asyncio.sleep(wait + 0.01)  # the wait the limiter asked for is enough
        assert await limiter.is_allowed(algorithm), algorithm


async def test_gcra_spaces_units_evenly_after_a_burst(topo: Any) -> None:
    # One unit per 300 ms: the two hits after the wait must land within one unit, which
    # leaves a loaded machine room (100 ms units made that a race).
    limiter = RateLimiter(topo, max_requests=5, window_seconds=1.5)
    assert all([await limiter.is_allowed("u") for _ in range(5)])
    refused = await limiter.hit("u")
    assert not refused.allowed and 0 < refused.retry_after <= 0.3
    await asyncio.sleep(refused.retry_after + 0.005)
    assert await limiter.is_allowed("u")
    assert not await limiter.is_allowed("u")  # only one unit came back


async def test_a_dead_workers_concurrency_leases_expire(topo: Any) -> None:
    slots = ConcurrencyLimiter(topo, 2, lease_seconds=0.5)
    assert (await slots.acquire("u")).allowed and (await slots.acquire("u")).allowed
    assert not (await slots.acquire("u")).allowed  # nobody releases: the worker "died"

    async def freed() -> bool:
        return bool((await slots.acquire("u")).allowed)

    await eventually(freed, "the dead worker's leases to expire")


async def test_redis_down_fails_open_or_closed_and_recovers_after_a_restart(
    private_server: RedisServer, settings_override: Any
) -> None:
    settings_override(breaker_reset_timeout=0.1, breaker_failure_threshold=1)
    redis = Redis.from_url(private_server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        open_limiter = RateLimiter(redis, max_requests=1, window_seconds=60)
        closed_limiter = RateLimiter(
            redis, max_requests=1, window_seconds=60, failure_mode="closed"
        )
        assert await open_limiter.is_allowed("u")
        assert not await open_limiter.is_allowed("u")

        private_server.kill()
        degraded = await open_limiter.hit("u")
        assert degraded.allowed and degraded.degraded
        with pytest.raises(RedisUnavailable):
            await closed_limiter.hit("u")

        private_server.restart()  # all data and cached scripts are gone
        decisions: list[Any] = []

        async def recovered() -> bool:  # once the breaker lets a trial call through; the
            # first call after a restart may meet a dead connection (RedisUnavailable)
            decisions[:] = [await closed_limiter.hit("v")]
            return True

        await eventually(recovered, "the limiter to reach Redis again", errors_mean_not_yet=True)
        decision = decisions[0]
        assert decision.allowed and not decision.degraded
        assert await redis.script_exists(ALGORITHMS["gcra"].script.sha) == [True]
        assert await open_limiter.is_allowed("u")  # the old count died with the server
    finally:
        await redis.aclose()
