"""IdempotencyService on real Redis (standalone, Cluster, Sentinel): leases, waiters, faults."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis

from app.core.errors import RedisUnavailable
from app.services.idempotency import Claim, IdempotencyService
from app.testing.clients import twin
from app.testing.servers import RedisServer
from app.testing.waiting import eventually


@pytest.fixture
def real_client(topology_client: Any) -> Any:
    """Standalone, Cluster or Sentinel, bytes or decoded replies."""
    return topology_client


# -- the DESIGN.md contract, on every topology ----------------------


async def test_contract_on_every_topology(topology_redis: Any) -> None:
    svc = IdempotencyService(topology_redis, ttl=86400)
    assert await svc.is_duplicate("req-1") is False
    assert await svc.get_result("req-1") is None
    await svc.store_request("req-1", {"ok": 1})
    assert await svc.is_duplicate("req-1") is True
    assert await svc.get_result("req-1") == {"ok": 1}
    assert 86_000 < await topology_redis.ttl(svc.record_key("req-1")) <= 86_400


async def test_contract_with_both_decode_modes(real_client: Any) -> None:
    svc = IdempotencyService(real_client, ttl=30)
    assert await svc.is_duplicate("r") is False
    await svc.store_request("r", {"bytes": b"\x00\xff", "text": "é"})
    assert await svc.get_result("r") == {"bytes": b"\x00\xff", "text": "é"}
    claim = await svc.claim("big")
    assert claim.token is not None
    payload = b"\xfe" * 20_000  # compressed and (for decoded clients) base64-wrapped
    assert await svc.complete("big", claim.token, payload)
    assert (await svc.claim("big")).result == payload


# -- atomicity and ownership ------------------------------------------------------------


async def _claimable(svc: IdempotencyService, key: str, fingerprint: str = "") -> Claim:
    """Claim *key* as soon as its current lease has run out; return that new claim."""
    claims: list[Claim] = []

    async def new() -> bool:
        claims[:] = [await svc.claim(key, fingerprint)]
        return claims[0].status == "new"

    await eventually(new, f"the lease on {key!r} to run out")
    return claims[0]


async def test_exactly_one_of_100_concurrent_claims_wins(real_client: Any) -> None:
    svc = IdempotencyService(real_client)
    claims = await asyncio.gather(*(svc.claim("pay-1", "fp") for _ in range(100)))
    statuses = [c.status for c in claims]
    assert statuses.count("new") == 1
    assert statuses.count("in_flight") == 99


async def test_crashed_owner_key_is_claimable_after_the_lease(topology_redis: Any) -> None:
    svc = IdempotencyService(topology_redis, lease=0.3)
    crashed = await svc.claim("k", "fp")  # no heartbeat: the owner "died" right here
    assert crashed.token is not None
    assert (await svc.claim("k", "fp")).status == "in_flight"
    retry = await _claimable(svc, "k", "fp")  # once the lease ran out
    assert retry.token != crashed.token
    # The presumed-dead owner wakes up late: it can neither store nor release.
    assert await svc.complete("k", crashed.token, "late") is False
    assert await svc.release("k", crashed.token) is False
    assert retry.token is not None
    assert await svc.complete("k", retry.token, "fresh") is True
    assert await svc.get_result("k") == "fresh"


async def test_heartbeat_keeps_a_claim_past_its_lease(topology_redis: Any) -> None:
    svc = IdempotencyService(topology_redis, lease=0.3)
    claim = await svc.claim("k")
    assert claim.token is not None
    async with svc.heartbeat("k", claim.token) as beat:
        # well past two leases (0.1 s apart): Redis's TTL must really pass
        await eventually(lambda: beat.renewals >= 8, "8 renewals")
        assert (await svc.claim("k")).status == "in_flight"
    assert beat.renewals >= 2 and not beat.lost
    await _claimable(svc, "k")  # heartbeat stopped: the lease runs out


async def test_heartbeat_notices_a_lost_claim(topology_redis: Any) -> None:
    svc = IdempotencyService(topology_redis, lease=0.3)
    claim = await svc.claim("k")
    assert claim.token is not None
    beat = svc.heartbeat("k", claim.token, interval=0.05).start()
    await svc.forget("k")  # an operator deleted it
    await eventually(lambda: beat.lost, "the heartbeat to notice the claim is gone")
    await beat.stop()


# -- waiting for the first request ---------------------------------------------------------


async def test_waiters_are_woken_by_completion_not_by_polling(topology_redis: Any) -> None:
    svc = IdempotencyService(topology_redis, lease=60)
    svc._max_block = 30.0  # one BLPOP for the whole wait: only a wake-up ends it early
    owner = await svc.claim("k", "fp")
    waiters = [asyncio.create_task(svc.claim("k", "fp", wait=30)) for _ in range(10)]
    await asyncio.sleep(0.1)
    assert not any(w.done() for w in waiters)
    assert owner.token is not None
    await svc.complete("k", owner.token, {"paid": True})
    async with asyncio.timeout(10):
        results = await asyncio.gather(*waiters)
    assert {(c.status, c.result["paid"]) for c in results} == {("completed", True)}


async def test_a_waiter_takes_over_after_a_release(topology_redis: Any) -> None:
    svc = IdempotencyService(topology_redis, lease=60)
    svc._max_block = 30.0
    owner = await svc.claim("k", "fp")
    waiter = asyncio.create_task(svc.claim("k", "fp", wait=30))
    await asyncio.sleep(0.1)
    assert owner.token is not None
    await svc.release("k", owner.token)  # the first attempt failed
    async with asyncio.timeout(10):
        claim = await waiter
    assert claim.status == "new" and claim.token  # the waiter now owns the retry


async def test_a_waiter_takes_over_after_the_owner_crashed(topology_redis: Any) -> None:
    svc = IdempotencyService(topology_redis, lease=0.3)
    await svc.claim("k", "fp")
    claim = await svc.claim("k", "fp", wait=5)
    assert claim.status == "new"


async def test_wait_is_bounded_and_cancellable(topology_redis: Any) -> None:
    svc = IdempotencyService(topology_redis, lease=60)
    await svc.claim("k", "fp")
    assert (await svc.claim("k", "fp", wait=0.3)).status == "in_flight"
    task = asyncio.create_task(svc.claim("k", "fp", wait=30))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await svc.claim("k", "fp")).status == "in_flight"


async def test_waiting_stays_below_the_socket_timeout(topology_redis: Any) -> None:
    """A waiter's BLPOPs end before the client's socket timeout, on a Cluster client too."""
    client = twin(topology_redis, socket_timeout=0.4)
    try:
        svc = IdempotencyService(client, lease=60)
        await svc.claim("k", "fp")
        assert (await svc.claim("k", "fp", wait=1.0)).status == "in_flight"
    finally:
        await client.aclose()


async def test_scripts_survive_a_script_flush(topology_redis: Any) -> None:
    svc = IdempotencyService(topology_redis)
    assert await svc.is_duplicate("a") is False
    await topology_redis.script_flush()
    assert await svc.is_duplicate("a") is True
    assert await svc.is_duplicate("b") is False


# -- Redis down --------------------------------------------------------------------------


async def test_redis_down_raises_redis_unavailable() -> None:
    server = RedisServer().start()
    client = Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        svc = IdempotencyService(client)
        assert await svc.is_duplicate("k") is False
        server.stop()
        with pytest.raises(RedisUnavailable):
            await svc.is_duplicate("k")
        with pytest.raises(RedisUnavailable):
            await svc.store_request("k", 1)
        with pytest.raises(RedisUnavailable):
            await svc.get_result("k")
    finally:
        await client.aclose()
        server.cleanup()
