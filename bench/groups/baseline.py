"""Raw redis.asyncio: the baselines every other group is divided by."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.asyncio import Redis

from app.core.redis import build_client
from bench.harness import Case, Op

VALUE = b'{"id": 1, "name": "Ada Lovelace", "email": "ada@example.com", "tags": ["x"]}'
INCR_SCRIPT = "return redis.call('INCR', KEYS[1])"


def raw_client(url: str) -> Redis:
    """What a user has without us: redis.asyncio's defaults (RESP3, hiredis, default pool)."""
    return Redis.from_url(url)


@asynccontextmanager
async def raw_get(url: str) -> AsyncIterator[Op]:
    r = raw_client(url)
    await r.set("bench:raw", VALUE)
    try:
        yield lambda: r.get("bench:raw")
    finally:
        await r.aclose()


@asynccontextmanager
async def toolkit_get(url: str) -> AsyncIterator[Op]:
    r = build_client(url=url)
    await r.set("bench:raw", VALUE)
    try:
        yield lambda: r.get("bench:raw")
    finally:
        await r.aclose()


@asynccontextmanager
async def raw_set_ex(url: str) -> AsyncIterator[Op]:
    r = raw_client(url)
    try:
        yield lambda: r.set("bench:raw:set", VALUE, ex=60)
    finally:
        await r.aclose()


@asynccontextmanager
async def raw_evalsha(url: str) -> AsyncIterator[Op]:
    r = raw_client(url)
    sha = await r.script_load(INCR_SCRIPT)
    try:
        yield lambda: r.evalsha(sha, 1, "bench:raw:n")
    finally:
        await r.aclose()


@asynccontextmanager
async def raw_lock_pair(url: str) -> AsyncIterator[Op]:
    """The floor for a lock: SET NX PX + EVALSHA compare-and-delete (2 round trips)."""
    r = raw_client(url)
    sha = await r.script_load(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
    )
    counter = iter(range(10**12))

    async def op() -> None:
        token = str(next(counter))
        key = f"bench:rawlock:{token[-2:]}"
        await r.set(key, token, nx=True, px=10_000)
        await r.evalsha(sha, 1, key, token)

    try:
        yield op
    finally:
        await r.aclose()


@asynccontextmanager
async def raw_pipeline(url: str) -> AsyncIterator[Op]:
    r = raw_client(url)
    await r.set("bench:raw", VALUE)

    async def op() -> None:
        async with r.pipeline(transaction=False) as pipe:
            for _ in range(100):
                pipe.get("bench:raw")
            await pipe.execute()

    try:
        yield op
    finally:
        await r.aclose()


def cases() -> list[Case]:
    return [
        Case("raw GET", raw_get),
        Case("raw GET, toolkit client", toolkit_get, baseline="raw GET",
             note="build_client(): waiting pool, retries, timeouts"),
        Case("raw SET EX", raw_set_ex, baseline="raw GET"),
        Case("raw EVALSHA", raw_evalsha, baseline="raw GET"),
        Case("raw lock pair SET NX PX + EVALSHA", raw_lock_pair, baseline="raw GET"),
        Case("raw pipeline 100 GET (cmds/s)", raw_pipeline, unit_per_op=100),
    ]  # fmt: skip
