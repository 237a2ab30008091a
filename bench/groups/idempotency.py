"""Idempotency records: our claim + complete against the raw two-round-trip floor.

The floor of an idempotent request is two round trips: ``SET key NX PX``
(claim the key before the work) and ``SET key result PX`` (store the result
after it). Every operation uses a fresh key, as every new request does. A
replay (the retry of a completed request) is one round trip, compared with a
raw ``GET`` of a stored result.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from bench.common import SMALL, SMALL_BYTES, closing, raw_client, toolkit_client, unique_names
from bench.harness import Case, Op

TTL = 3600
LEASE_MS = 30_000


@asynccontextmanager
async def raw_floor(url: str) -> AsyncIterator[Op]:
    r = raw_client(url)
    name = unique_names("bench:raw:idem")

    async def op() -> None:
        key = name()
        if not await r.set(key, b"pending", nx=True, px=LEASE_MS):
            raise RuntimeError(f"{key} was claimed already")
        await r.set(key, SMALL_BYTES, px=TTL * 1000)

    async with closing(r):
        yield op


@asynccontextmanager
async def raw_get(url: str) -> AsyncIterator[Op]:
    r = raw_client(url)
    await r.set("bench:raw:idem:done", SMALL_BYTES, ex=TTL)
    async with closing(r):
        yield lambda: r.get("bench:raw:idem:done")


def ours(kind: str, *, plain: bool = False) -> Callable[[str], Any]:
    @asynccontextmanager
    async def make(url: str) -> AsyncIterator[Op]:
        from app.services.idempotency import IdempotencyService

        r = raw_client(url) if plain else toolkit_client(url)
        svc = IdempotencyService(r, ttl=TTL, namespace="bench.idempotency")
        name = unique_names("req")

        async def claim_complete() -> None:
            key = name()
            claim = await svc.claim(key, "fingerprint")
            if not claim.is_new or claim.token is None:
                raise RuntimeError(f"{key}: {claim.status}")
            await svc.complete(key, claim.token, SMALL)

        async def contract() -> None:
            key = name()
            if await svc.is_duplicate(key):
                raise RuntimeError(f"{key} was seen already")
            await svc.store_request(key, SMALL)

        async def replay() -> None:
            claim = await svc.claim("done", "fingerprint")
            if claim.status != "completed":
                raise RuntimeError(f"replay found {claim.status}")

        if kind == "replay":
            first = await svc.claim("done", "fingerprint")
            if first.is_new and first.token:
                await svc.complete("done", first.token, SMALL)
        ops = {"claim+complete": claim_complete, "contract": contract, "replay": replay}
        async with closing(r):
            yield ops[kind]

    return make


def cases() -> list[Case]:
    floor = "raw SET NX PX + SET PX"
    return [
        Case(floor, raw_floor, note="claim before the work, store after it: 2 round trips"),
        Case("raw GET", raw_get, floor),
        Case("ours claim + complete", ours("claim+complete"), floor,
             note="fingerprint check, owner token, waiter wake-up: 2 EVALSHA"),
        Case("ours claim + complete, plain redis.asyncio client", ours("claim+complete", plain=True), floor),
        Case("ours is_duplicate + store_request", ours("contract"), floor, note="the DESIGN.md contract"),
        Case("ours replay (claim of a completed key)", ours("replay"), "raw GET",
             note="one EVALSHA returns the stored result"),
    ]  # fmt: skip
