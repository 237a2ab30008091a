"""RateLimiter and ConcurrencyLimiter on fakeredis (with Lua), bytes and text clients."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import AsyncIterator
from typing import Any, get_args

import fakeredis
import pytest
import pytest_asyncio
from redis.exceptions import ResponseError

from app.core.breaker import breaker_for
from app.core.errors import ConfigurationError, RateLimitExceeded, RedisUnavailable
from app.core.keys import key_slot_tag
from app.services.rate_limit import (
    ALGORITHMS,
    Algorithm,
    ConcurrencyLimiter,
    Policy,
    RateLimitDecision,
    RateLimiter,
)

ALL: tuple[Algorithm, ...] = get_args(Algorithm)


class CountingRedis(fakeredis.FakeAsyncRedis):
    """fakeredis that records every command it is sent (a real fake server, no mock)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands: list[str] = []

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        name = args[0]
        self.commands.append((name.decode() if isinstance(name, bytes) else str(name)).upper())
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


@pytest_asyncio.fixture
async def redis(
    fake_server: fakeredis.FakeServer, decode_responses: bool
) -> AsyncIterator[CountingRedis]:
    client = CountingRedis(server=fake_server, decode_responses=decode_responses)
    try:
        yield client
    finally:
        await client.aclose()


def disconnect(client: Any) -> None:
    client.connection_pool.connection_kwargs["server"].connected = False


def test_every_algorithm_is_registered() -> None:
    assert set(ALL) == set(ALGORITHMS)


@pytest.mark.parametrize("algorithm", ALL)
async def test_design_contract_three_allowed_then_refused(
    redis: CountingRedis, algorithm: Algorithm
) -> None:
    limiter = RateLimiter(redis, max_requests=3, window_seconds=1, algorithm=algorithm)
    assert [await limiter.is_allowed("user-1") for _ in range(5)] == [
        True,
        True,
        True,
        False,
        False,
    ]
    assert await limiter.is_allowed("user-2") is True  # identifiers are independent


@pytest.mark.parametrize("algorithm", ALL)
async def test_refused_hits_are_not_counted(redis: CountingRedis, algorithm: Algorithm) -> None:
    limiter = RateLimiter(redis, max_requests=2, window_seconds=60, algorithm=algorithm)
    await limiter.hit("u")
    await limiter.hit("u")
    keys = limiter.keys_for("u")
    before = [await redis.dump(k) for k in keys]
    for _ in range(3):
        assert not (await limiter.hit("u")).allowed
    assert [await redis.dump(k) for k in keys] == before


@pytest.mark.parametrize("algorithm", ALL)
async def test_hit_reports_every_policy(redis: CountingRedis, algorithm: Algorithm) -> None:
    limiter = RateLimiter(redis, policies="burst=2/second;daily=5/day", algorithm=algorithm)
    first = await limiter.hit("u")
    assert first.allowed and not first.degraded and first.violated == ()
    burst, daily = first.results
    assert (burst.name, burst.limit, burst.remaining, burst.allowed) == ("burst", 2, 1, True)
    assert (daily.name, daily.limit, daily.remaining, daily.allowed) == ("daily", 5, 4, True)
    # a sliding counter's unit fades over the rest of its window and the whole next one
    span = 2 if algorithm == "sliding_counter" else 1
    assert 0 < burst.reset_after <= span and 0 < daily.reset_after <= 86400 * span
    assert burst.retry_after == daily.retry_after == 0
    assert first.retry_after == 0


@pytest.mark.parametrize("algorithm", ALL)
async def test_stacked_policies_are_all_or_nothing(
    redis: CountingRedis, algorithm: Algorithm
) -> None:
    limiter = RateLimiter(redis, policies="burst=2/minute;daily=5/day", algorithm=algorithm)
    assert (await limiter.hit("u")).allowed and (await limiter.hit("u")).allowed
    refused = await limiter.hit("u")
    assert not refused.allowed
    assert [r.name for r in refused.violated] == ["burst"]
    burst, daily = refused.results
    assert not burst.allowed and burst.remaining == 0 and burst.retry_after > 0
    assert daily.allowed and daily.remaining == 3 and daily.retry_after == 0
    assert refused.retry_after == burst.retry_after
    assert (await limiter.peek("u")).results[1].remaining == 3  # the refusal cost nothing


@pytest.mark.parametrize("algorithm", ALL)
async def test_is_allowed_counts_exactly_what_hit_reports(
    redis: CountingRedis, algorithm: Algorithm
) -> None:
    """``is_allowed`` (a one-integer reply) charges every policy, and its refusals nothing."""
    limiter = RateLimiter(redis, policies="burst=3/minute;daily=5/day", algorithm=algorithm)
    assert [await limiter.is_allowed("u") for _ in range(5)] == [True, True, True, False, False]
    burst, daily = (await limiter.peek("u")).results
    assert (burst.remaining, daily.remaining) == (0, 2)
    daily_only = RateLimiter(redis, policies="daily=5/day", algorithm=algorithm)
    assert daily_only.keys_for("u")[0] == limiter.keys_for("u")[1]  # the same counter
    assert [await daily_only.is_allowed("u") for _ in range(3)] == [True, True, False]
    assert (await limiter.hit("u")).results[1].remaining == 0


@pytest.mark.parametrize("algorithm", ALL)
async def test_cost_charges_several_units_and_zero_charges_none(
    redis: CountingRedis, algorithm: Algorithm
) -> None:
    limiter = RateLimiter(redis, max_requests=5, window_seconds=60, algorithm=algorithm)
    assert (await limiter.hit("u", cost=3)).results[0].remaining == 2
    assert (await limiter.hit("u", cost=0)).results[0].remaining == 2
    refused = await limiter.hit("u", cost=3)
    assert not refused.allowed and refused.results[0].remaining == 2
    assert (await limiter.hit("u", cost=2)).allowed
    with pytest.raises(ValueError, match="never be admitted"):
        await limiter.hit("u", cost=6)
    with pytest.raises(ValueError, match="integer >= 0"):
        await limiter.hit("u", cost=-1)


@pytest.mark.parametrize("algorithm", ALL)
async def test_peek_charges_nothing(redis: CountingRedis, algorithm: Algorithm) -> None:
    limiter = RateLimiter(redis, max_requests=2, window_seconds=60, algorithm=algorithm)
    fresh = await limiter.peek("u")
    assert fresh.allowed and fresh.results[0].remaining == 2
    assert fresh.results[0].reset_after == 0  # nothing spent, nothing to wait for
    await limiter.hit("u")
    for _ in range(3):
        assert (await limiter.peek("u")).results[0].remaining == 1
    await limiter.hit("u")
    full = await limiter.peek("u")
    assert not full.allowed and full.results[0].retry_after > 0


@pytest.mark.parametrize("algorithm", ALL)
async def test_reset_forgets_the_identifier(redis: CountingRedis, algorithm: Algorithm) -> None:
    limiter = RateLimiter(redis, policies="a=1/minute;b=2/hour", algorithm=algorithm)
    assert await limiter.is_allowed("u")
    assert not await limiter.is_allowed("u")
    await limiter.reset("u")
    assert await limiter.is_allowed("u")
    assert await redis.exists(*limiter.keys_for("u")) == 2


@pytest.mark.parametrize("algorithm", ALL)
async def test_every_key_has_a_ttl_and_one_hash_tag(
    redis: CountingRedis, algorithm: Algorithm
) -> None:
    limiter = RateLimiter(redis, policies="s=3/second;m=10/minute;d=50/day", algorithm=algorithm)
    identifier = "tenant:{a}*b"  # braces and glob characters are escaped
    for _ in range(4):
        await limiter.hit(identifier)
    keys = limiter.keys_for(identifier)
    assert {key_slot_tag(k) for k in keys} == {"tenant%3A%7Ba%7D%2Ab"}
    assert all(k.startswith("app:ratelimit:{tenant%3A%7Ba%7D%2Ab}:") for k in keys)
    stored = sorted(k.decode() if isinstance(k, bytes) else k for k in await redis.keys("*"))
    assert stored == sorted(keys)
    for key in keys:
        assert 0 < await redis.pttl(key) <= 86_400_000 * 2


@pytest.mark.parametrize("algorithm", ALL)
async def test_one_command_per_check_for_any_number_of_policies(
    redis: CountingRedis, algorithm: Algorithm
) -> None:
    for spec in ("1/second", "a=1/second;b=2/minute", "a=1/s;b=2/m;c=3/h;d=4/d;e=5/week"):
        limiter = RateLimiter(redis, policies=spec, algorithm=algorithm)
        await limiter.hit("warm")  # the first call of a script on a server also loads it
        redis.commands.clear()
        await limiter.hit("u")
        await limiter.is_allowed("u")
        await limiter.peek("u")
        assert redis.commands == ["EVALSHA"] * 3


async def test_gcra_burst_admits_more_at_once_at_the_same_rate(redis: CountingRedis) -> None:
    limiter = RateLimiter(redis, policies=Policy(2, 60, burst=5))
    decisions = [await limiter.hit("u") for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert decisions[0].results[0].remaining == 4
    assert 29 < decisions[-1].retry_after <= 30  # one unit per 30 s


async def test_gcra_reports_the_next_unit_not_the_whole_window(redis: CountingRedis) -> None:
    limiter = RateLimiter(redis, max_requests=10, window_seconds=10)
    result = (await limiter.hit("u")).results[0]
    assert result.remaining == 9
    assert 0.9 < result.reset_after <= 1.0  # one unit frees every second


async def test_fixed_window_reports_the_window_end(redis: CountingRedis) -> None:
    limiter = RateLimiter(redis, max_requests=10, window_seconds=10, algorithm="fixed_window")
    result = (await limiter.hit("u")).results[0]
    assert result.remaining == 9 and 9.9 < result.reset_after <= 10


async def test_fixed_window_repairs_a_counter_without_ttl(redis: CountingRedis) -> None:
    limiter = RateLimiter(redis, max_requests=3, window_seconds=5, algorithm="fixed_window")
    key = limiter.keys_for("u")[0]
    await redis.set(key, 1)  # e.g. left behind by other code without an expiry
    assert (await limiter.hit("u")).results[0].remaining == 1
    assert 0 < await redis.pttl(key) <= 5000


async def test_enforce_raises_quota_exceeded_with_violated_policies(redis: CountingRedis) -> None:
    limiter = RateLimiter(redis, policies="burst=1/minute;daily=10/day")
    await limiter.enforce("u")
    with pytest.raises(RateLimitExceeded) as caught:
        await limiter.enforce("u")
    assert caught.value.violated_policies == ["burst"]
    assert caught.value.status_code == 429
    assert caught.value.retry_after is not None and 59 < caught.value.retry_after <= 60
    assert caught.value.extensions() == {"violated-policies": ["burst"]}


def test_constructor_errors_name_the_way_out(redis: CountingRedis) -> None:
    with pytest.raises(ValueError, match="max_requests and window_seconds"):
        RateLimiter(redis, max_requests=3)
    with pytest.raises(ValueError, match="not both"):
        RateLimiter(redis, max_requests=3, window_seconds=1, policies="1/second")
    with pytest.raises(ValueError, match="unknown algorithm"):
        RateLimiter(redis, max_requests=3, window_seconds=1, algorithm="leaky")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="use ConcurrencyLimiter"):
        RateLimiter(redis, policies="3 concurrent")
    with pytest.raises(ValueError, match="one unit per microsecond"):
        RateLimiter(redis, max_requests=2_000_000, window_seconds=1)
    with pytest.raises(ValueError, match="use RateLimiter"):
        ConcurrencyLimiter(redis, policies="3/second")
    with pytest.raises(ValueError, match="needs max_concurrent"):
        ConcurrencyLimiter(redis)
    assert "3-per-second" in repr(RateLimiter(redis, max_requests=3, window_seconds=1))


async def test_fail_open_allows_and_marks_the_decision_degraded(
    redis: CountingRedis, settings_override: Any
) -> None:
    settings_override(rate_limit_failure_mode="open", breaker_failure_threshold=100)
    limiter = RateLimiter(redis, policies="a=1/second;b=2/day")
    disconnect(redis)
    assert await limiter.is_allowed("u") is True
    assert await limiter.is_allowed("u") is True
    decision = await limiter.hit("u")
    assert decision.allowed and decision.degraded
    assert [r.remaining for r in decision.results] == [1, 2]


async def test_fail_closed_raises_redis_unavailable(
    redis: CountingRedis, settings_override: Any
) -> None:
    settings_override(rate_limit_failure_mode="open")
    limiter = RateLimiter(redis, max_requests=1, window_seconds=1, failure_mode="closed")
    disconnect(redis)
    with pytest.raises(RedisUnavailable):
        await limiter.is_allowed("u")
    with pytest.raises(RedisUnavailable):
        await limiter.hit("u")
    with pytest.raises(RedisUnavailable):
        await limiter.reset("u")


async def test_the_failure_mode_setting_is_the_default(
    redis: CountingRedis, settings_override: Any
) -> None:
    settings_override(rate_limit_failure_mode="closed")
    limiter = RateLimiter(redis, max_requests=1, window_seconds=1)
    disconnect(redis)
    with pytest.raises(RedisUnavailable):
        await limiter.is_allowed("u")


async def test_an_open_breaker_answers_without_calling_redis(
    redis: CountingRedis, settings_override: Any
) -> None:
    settings_override(breaker_failure_threshold=2, breaker_reset_timeout=60)
    limiter = RateLimiter(redis, max_requests=1, window_seconds=1)
    disconnect(redis)
    assert await limiter.is_allowed("a") and await limiter.is_allowed("b")
    redis.commands.clear()
    for _ in range(10):
        assert (await limiter.hit("c")).degraded
    assert redis.commands == []


async def test_concurrency_slots_are_taken_and_given_back(redis: CountingRedis) -> None:
    limiter = ConcurrencyLimiter(redis, 2)
    first, second, third = [await limiter.acquire("u") for _ in range(3)]
    assert first.allowed and second.allowed and not third.allowed
    assert first.lease and second.lease and first.lease != second.lease and third.lease is None
    assert [r.remaining for r in (first.results[0], second.results[0])] == [1, 0]
    assert third.results[0].retry_after == 1.0 and third.violated[0].name == "2-concurrent"
    assert await limiter.release(first) is True
    assert await limiter.release(first) is False  # idempotent
    assert await limiter.release(third) is False  # nothing was held
    assert (await limiter.peek("u")).results[0].remaining == 1
    assert (await limiter.acquire("u")).allowed


async def test_concurrency_hold_releases_on_errors(redis: CountingRedis) -> None:
    limiter = ConcurrencyLimiter(redis, 1)
    with pytest.raises(RuntimeError):
        async with limiter.hold("u"):
            with pytest.raises(RateLimitExceeded):
                async with limiter.hold("u"):
                    pass
            raise RuntimeError("boom")
    async with limiter.hold("u") as decision:
        assert decision.allowed


async def test_concurrency_policies_are_all_or_nothing(redis: CountingRedis) -> None:
    limiter = ConcurrencyLimiter(redis, policies="a=3 concurrent;b=2 concurrent")
    await limiter.acquire("u")
    refused = await limiter.acquire("u", cost=2)
    assert not refused.allowed and [r.name for r in refused.violated] == ["b"]
    assert [r.remaining for r in (await limiter.peek("u")).results] == [2, 1]


async def test_concurrency_keys_expire_with_their_leases(redis: CountingRedis) -> None:
    limiter = ConcurrencyLimiter(redis, 2, lease_seconds=30)
    await limiter.acquire("u")
    key = limiter.keys_for("u")[0]
    assert 29_000 < await redis.pttl(key) <= 30_000


async def test_concurrency_fail_open_leases_nothing(
    redis: CountingRedis, settings_override: Any
) -> None:
    settings_override(rate_limit_failure_mode="open")
    limiter = ConcurrencyLimiter(redis, 1)
    disconnect(redis)
    decision = await limiter.acquire("u")
    assert decision.allowed and decision.degraded and decision.lease is None
    assert await limiter.release(decision) is False


async def test_a_refused_script_fails_open_or_closed_like_an_outage(
    redis: CountingRedis, settings_override: Any
) -> None:
    settings_override(rate_limit_failure_mode="open")
    limiter = RateLimiter(redis, policies="p=2/second", algorithm="sliding_log")
    closed = RateLimiter(
        redis, policies="p=2/second", algorithm="sliding_log", failure_mode="closed"
    )
    await redis.set(limiter.keys_for("u")[0], "not a sorted set")  # the script meets WRONGTYPE
    assert await limiter.is_allowed("u") is True
    assert (await limiter.hit("u")).degraded
    with pytest.raises(RedisUnavailable) as caught:
        await closed.hit("u")
    message = str(caught.value)
    assert message.startswith("rate limit 'p': ") and "WRONGTYPE" not in message
    assert isinstance(caught.value.__cause__, ResponseError)  # the text stays for the logs
    assert breaker_for(redis).state == "closed"  # the server answered: not an outage


async def test_redis_down_is_logged_once_per_change_not_per_check(
    redis: CountingRedis, settings_override: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings_override(rate_limit_failure_mode="open", breaker_failure_threshold=100)
    limiter = RateLimiter(redis, max_requests=1, window_seconds=1)
    disconnect(redis)
    with caplog.at_level("WARNING", logger="app.rate_limit"):
        for _ in range(5):
            assert await limiter.is_allowed("u")
    logged = [r.getMessage() for r in caplog.records if r.name == "app.rate_limit"]
    assert len(logged) == 1, logged
    assert logged[0].startswith("rate limit '1-per-second': Redis call failed")
    assert "allowing requests without counting them" in logged[0]


@pytest.mark.parametrize("lease", [math.nan, math.inf, True, "60", 0, 0.0005])
def test_bad_leases_are_configuration_errors(redis: CountingRedis, lease: Any) -> None:
    with pytest.raises(ConfigurationError, match="lease_seconds"):
        ConcurrencyLimiter(redis, 2, lease_seconds=lease)


async def test_a_lease_may_be_a_timedelta(redis: CountingRedis) -> None:
    limiter = ConcurrencyLimiter(redis, 2, lease_seconds=dt.timedelta(seconds=30))
    await limiter.acquire("u")
    assert 29_000 < await redis.pttl(limiter.keys_for("u")[0]) <= 30_000


async def test_argument_errors_are_configuration_errors(redis: CountingRedis) -> None:
    limiter = RateLimiter(redis, max_requests=5, window_seconds=60)
    for cost in (-1, 6, 1.5, True):
        with pytest.raises(ConfigurationError):
            await limiter.hit("u", cost=cost)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="unknown algorithm"):
        RateLimiter(redis, max_requests=3, window_seconds=1, algorithm="leaky")  # type: ignore[arg-type]
    windows: list[Any] = [math.nan, math.inf, True, "1"]
    for window in windows:
        with pytest.raises(ConfigurationError, match="policy window"):
            RateLimiter(redis, max_requests=3, window_seconds=window)


def test_decision_helpers() -> None:
    policy = Policy(1, 1)
    decision = RateLimitDecision(True, (), "u", 1)
    decision.raise_for_limit()
    assert decision.retry_after == 0 and decision.violated == ()
    assert repr(decision) == (
        "RateLimitDecision(allowed=True, results=(), identifier='u', cost=1, degraded=False, "
        "lease=None)"
    )
    assert policy.name == "1-per-second"
