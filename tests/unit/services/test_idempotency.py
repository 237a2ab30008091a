"""IdempotencyService on fakeredis: the DESIGN.md contract and the claim primitives."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import fakeredis
import pytest
from pydantic import BaseModel
from redis.exceptions import RedisError

from app.core.errors import ConfigurationError, InvalidKey, RedisCommandError, RedisUnavailable
from app.core.keys import key_slot_tag
from app.services.idempotency import IdempotencyService
from app.testing.clock import VirtualClock
from app.testing.slots import slot_checking_fake_redis


class Receipt(BaseModel):
    id: int
    total: float


@pytest.fixture
def client(fake_client: Any) -> Any:
    """fakeredis on a fresh server, with decode_responses False and True."""
    return fake_client


@pytest.fixture
def svc(client: Any) -> IdempotencyService:
    return IdempotencyService(client, ttl=60, lease=5)


async def test_is_duplicate_is_false_once_then_true(svc: IdempotencyService) -> None:
    assert await svc.is_duplicate("req-1") is False
    assert await svc.is_duplicate("req-1") is True
    assert await svc.is_duplicate("req-2") is False


async def test_store_request_then_get_result(svc: IdempotencyService) -> None:
    assert await svc.get_result("req-1") is None
    result = {"ok": 1, "items": [1, 2], "when": dt.date(2024, 1, 2), "raw": b"\xff\x00"}
    await svc.store_request("req-1", result)
    assert await svc.get_result("req-1") == result
    assert await svc.is_duplicate("req-1") is True


async def test_get_result_converts_to_a_type(svc: IdempotencyService) -> None:
    await svc.store_request("r", Receipt(id=7, total=9.5))
    assert await svc.get_result("r", Receipt) == Receipt(id=7, total=9.5)


async def test_in_flight_key_has_no_result_yet(svc: IdempotencyService) -> None:
    assert await svc.is_duplicate("req-1") is False
    assert await svc.get_result("req-1") is None
    await svc.store_request("req-1", "done")
    assert await svc.get_result("req-1") == "done"


async def test_only_one_of_many_concurrent_callers_is_first(svc: IdempotencyService) -> None:
    answers = await asyncio.gather(*(svc.is_duplicate("same") for _ in range(50)))
    assert answers.count(False) == 1


async def test_claim_walks_new_in_flight_mismatch_completed(svc: IdempotencyService) -> None:
    first = await svc.claim("k", "fp-a")
    assert first.status == "new" and first.is_new and first.token
    again = await svc.claim("k", "fp-a")
    assert again.status == "in_flight" and again.token is None
    assert again.lease_remaining is not None and 0 < again.lease_remaining <= 5
    assert (await svc.claim("k", "fp-b")).status == "mismatch"
    assert first.token is not None
    assert await svc.complete("k", first.token, {"status": 201}) is True
    done = await svc.claim("k", "fp-a")
    assert done.status == "completed" and done.result == {"status": 201}
    assert (await svc.claim("k", "fp-b")).status == "mismatch"


async def test_complete_and_release_need_the_owner_token(svc: IdempotencyService) -> None:
    claim = await svc.claim("k", "fp")
    assert claim.token is not None
    assert await svc.complete("k", "not-the-token", "x") is False
    assert await svc.release("k", "not-the-token") is False
    assert (await svc.claim("k", "fp")).status == "in_flight"
    assert await svc.release("k", claim.token) is True
    assert await svc.release("k", claim.token) is False  # released once only
    retry = await svc.claim("k", "fp")
    assert retry.status == "new" and retry.token != claim.token
    # The first owner's token no longer completes the key: the new owner's claim is safe.
    assert await svc.complete("k", claim.token, "stale") is False
    assert retry.token is not None
    assert await svc.complete("k", retry.token, "fresh") is True
    assert await svc.release("k", retry.token) is False  # a completed key is not released
    assert await svc.get_result("k") == "fresh"


async def test_complete_requires_a_token(svc: IdempotencyService) -> None:
    with pytest.raises(ValueError, match="owner token"):
        await svc.complete("k", "", "x")


async def test_renew_only_for_the_owner(svc: IdempotencyService, client: Any) -> None:
    claim = await svc.claim("k")
    assert claim.token is not None
    await client.pexpire(svc.record_key("k"), 100)
    assert await svc.renew("k", "other") is False
    assert await svc.renew("k", claim.token) is True
    assert 4000 < await client.pttl(svc.record_key("k")) <= 5000


async def test_ttls_lease_then_result_ttl(svc: IdempotencyService, client: Any) -> None:
    claim = await svc.claim("k")
    assert 0 < await client.pttl(svc.record_key("k")) <= 5000
    assert claim.token is not None
    await svc.complete("k", claim.token, "v")
    assert 55_000 < await client.pttl(svc.record_key("k")) <= 60_000
    await svc.store_request("other", "v", ttl=dt.timedelta(seconds=2))
    assert 0 < await client.pttl(svc.record_key("other")) <= 2000


async def test_keys_are_namespaced_escaped_and_tagged(svc: IdempotencyService) -> None:
    key = svc.record_key("a:b*{c}")
    assert key.startswith("app:idempotency:{")
    assert ":" not in key_slot_tag(key)  # type: ignore[operator]
    assert "*" not in key and key_slot_tag(key) == key_slot_tag(svc._notify_key("a:b*{c}"))
    assert svc.record_key("a:b") != svc.record_key("a%3Ab")  # escaping is injective
    with pytest.raises(InvalidKey):
        await svc.is_duplicate("")


async def test_prefix_comes_from_settings(client: Any, settings_override: Any) -> None:
    settings_override(redis_key_prefix="tenant7")
    svc = IdempotencyService(client)
    await svc.store_request("k", 1)
    keys = {k.decode() if isinstance(k, bytes) else k async for k in client.scan_iter("*")}
    assert keys == {"tenant7:idempotency:{k}"}


async def test_forget_frees_the_key(svc: IdempotencyService) -> None:
    await svc.store_request("k", 1)
    assert await svc.forget("k") is True
    assert await svc.forget("k") is False
    assert await svc.get_result("k") is None
    assert await svc.is_duplicate("k") is False


async def test_waiter_gets_the_result_when_the_owner_completes(svc: IdempotencyService) -> None:
    owner = await svc.claim("k", "fp")
    assert owner.token is not None
    waiter = asyncio.create_task(svc.claim("k", "fp", wait=5))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await svc.complete("k", owner.token, {"n": 1})
    claim = await waiter
    assert claim.status == "completed" and claim.result == {"n": 1}


async def test_wait_is_bounded(svc: IdempotencyService) -> None:
    await svc.claim("k", "fp")
    claim = await svc.claim("k", "fp", wait=0.2)
    assert claim.status == "in_flight"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"ttl": 0}, "ttl"), ({"ttl": -1}, "ttl"), ({"lease": 0}, "lease")],
)
async def test_bad_durations_are_refused(client: Any, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        IdempotencyService(client, **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), True, "5", None])
async def test_durations_that_are_not_finite_seconds_are_refused(client: Any, bad: Any) -> None:
    for kwargs in ({"ttl": bad}, {"lease": bad}):
        with pytest.raises(ConfigurationError, match=next(iter(kwargs))):
            IdempotencyService(client, **kwargs)
    if bad is None:  # for store_request and heartbeat, None means the default
        return
    svc = IdempotencyService(client)
    with pytest.raises(ConfigurationError, match="ttl"):
        await svc.store_request("k", 1, ttl=bad)
    with pytest.raises(ConfigurationError, match="interval"):
        svc.heartbeat("k", "t", interval=bad)


async def test_durations_round_up_to_whole_milliseconds(client: Any) -> None:
    svc = IdempotencyService(client, ttl=1.0004, lease=dt.timedelta(milliseconds=2.5))
    assert svc.ttl == 1.001 and svc.lease == 0.003  # never shorter than asked


async def test_complete_without_a_token_is_a_configuration_error(svc: IdempotencyService) -> None:
    with pytest.raises(ConfigurationError, match="owner token"):  # also a ValueError
        await svc.complete("k", "", "x")


async def test_a_refused_command_is_a_command_error_without_redis_text(
    svc: IdempotencyService, client: Any
) -> None:
    await client.set(svc.record_key("k"), "a string, not a hash")
    with pytest.raises(RedisCommandError) as caught:
        await svc.claim("k", "fp")
    assert str(caught.value) == "idempotency 'idempotency': Redis refused the command"
    assert isinstance(caught.value.__cause__, RedisError)
    with pytest.raises(RedisCommandError, match=r"^idempotency 'idempotency': Redis refused"):
        await svc.get_result("k")


async def test_an_open_breaker_refuses_at_once_with_its_reset_time(
    settings_override: Any,
) -> None:
    settings_override(breaker_failure_threshold=1, breaker_reset_timeout=30.0)
    server = fakeredis.FakeServer()
    redis = slot_checking_fake_redis(server=server)
    try:
        svc = IdempotencyService(redis, namespace="orders")
        server.connected = False
        with pytest.raises(RedisUnavailable, match=r"^idempotency 'orders': Redis is unreachable"):
            await svc.claim("k", "fp")
        server.connected = True  # back, but the breaker is open: nothing is sent
        with pytest.raises(RedisUnavailable, match="circuit breaker") as caught:
            await svc.is_duplicate("k")
        assert caught.value.retry_after == 30.0
        assert await redis.exists(svc.record_key("k")) == 0
    finally:
        await redis.aclose()


async def test_heartbeat_renews_each_interval_of_its_clock_until_the_claim_is_gone(
    client: Any,
) -> None:
    svc = IdempotencyService(client, lease=0.3)
    claim = await svc.claim("k")
    assert claim.token is not None
    clock = VirtualClock()
    record = svc.record_key("k")
    async with svc.heartbeat("k", claim.token, clock=clock) as beat:  # every lease/3 = 0.1 s
        for n in range(1, 31):  # ten leases
            await client.pexpire(record, 150)  # the lease in Redis runs down meanwhile...
            await clock.advance(0.1)
            assert beat.renewals == n  # ...and each tick renews it to a whole lease
            assert await client.pttl(record) > 250
        assert (await svc.claim("k")).status == "in_flight" and not beat.lost
        await svc.forget("k")  # an operator deleted it
        await clock.advance(0.1)
        assert beat.lost and beat.renewals == 30
    assert clock.pending == 0  # stopped: nothing sleeps on the clock any more


async def test_heartbeat_starts_no_task_before_its_first_renewal_is_due(client: Any) -> None:
    svc = IdempotencyService(client, lease=0.3)
    claim = await svc.claim("k")
    assert claim.token is not None
    clock = VirtualClock()
    tasks = len(asyncio.all_tasks())
    quick = svc.heartbeat("k", claim.token, clock=clock).start()  # a request that ends at once
    assert len(asyncio.all_tasks()) == tasks and clock.pending == 1  # a timer, no task
    await quick.stop()
    assert clock.pending == 0 and quick.renewals == 0
    await clock.advance(1)
    assert len(asyncio.all_tasks()) == tasks  # the cancelled timer never made one
    slow = svc.heartbeat("k", claim.token, clock=clock).start()
    await clock.advance(0.1)  # the first interval passed: the renewing task runs now
    assert slow.renewals == 1 and len(asyncio.all_tasks()) == tasks + 1
    await slow.stop()
    assert len(asyncio.all_tasks()) == tasks and clock.pending == 0


async def test_heartbeat_interval_must_be_positive(svc: IdempotencyService) -> None:
    with pytest.raises(ConfigurationError, match="interval"):
        svc.heartbeat("k", "t", interval=-1)
    assert svc.heartbeat("k", "t").interval == pytest.approx(5 / 3)
    assert svc.ttl == 60 and svc.lease == 5


# -- rotation: records under fallback names ---------------------------------------------------


async def test_claim_finds_a_record_under_a_fallback_name(svc: IdempotencyService) -> None:
    old = await svc.claim("old-name", "fp")
    assert old.status == "new" and old.token is not None
    in_flight = await svc.claim("new-name", "fp", fallbacks=["old-name"])
    assert in_flight.status == "in_flight" and in_flight.key == "old-name"
    assert await svc.complete("old-name", old.token, {"paid": 1})
    replay = await svc.claim("new-name", "fp", fallbacks=["old-name"])
    assert replay.status == "completed" and replay.result == {"paid": 1}
    assert replay.key == "old-name"
    other = await svc.claim("new-name", "other-fp", fallbacks=["old-name"])
    assert other.status == "mismatch"


async def test_absent_fallbacks_are_never_created(svc: IdempotencyService) -> None:
    claim = await svc.claim("new-name", "fp", fallbacks=["gone-1", "gone-2"])
    assert claim.status == "new" and claim.key == "new-name"
    assert await svc.redis.exists(svc.record_key("gone-1")) == 0
    assert await svc.redis.exists(svc.record_key("gone-2")) == 0
