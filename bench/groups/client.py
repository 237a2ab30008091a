"""The client itself: redis.asyncio, ours on the pool, ours auto-pipelined, and the peers.

GET of a ~100-byte value and EVALSHA of a one-line INCR script, one task in
sequence and 50 concurrent tasks, each divided by redis.asyncio doing the same
in the same round. "ours, pool" is ``build_client`` as shipped (waiting pool,
retries, socket timeouts); "ours, multiplexed" is ``build_client`` with
``REDIS_AUTOPIPELINE=true`` (``app/core/multiplex.py``). coredis and
valkey-glide rows appear when they are installed (``bench`` extra); a row whose
library is missing is left out and the run says so. Service hot paths (each on
redis.asyncio, on the multiplexed client and at the server's bound) come from
``bench.groups.client_services``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from app.core.config import get_settings
from app.core.redis import build_client
from bench.common import SMALL_BYTES, raw_client
from bench.groups.client_services import service_cases
from bench.harness import Case, Op

INCR_SCRIPT = "return redis.call('INCR', KEYS[1])"
KEY = "bench:client:get"


def ours(url: str, *, multiplexed: bool) -> Any:
    settings = get_settings().model_copy(update={"redis_autopipeline": multiplexed})
    return build_client(settings, url=url)


def redis_py(kind: str) -> Any:
    """A case factory on redis.asyncio (``raw``) or on our client (``pool``/``mux``)."""

    def client(url: str) -> Any:
        if kind == "raw":
            return raw_client(url)
        return ours(url, multiplexed=kind == "mux")

    @asynccontextmanager
    async def get(url: str) -> AsyncIterator[Op]:
        r = client(url)
        await r.set(KEY, SMALL_BYTES)
        try:
            yield lambda: r.get(KEY)
        finally:
            await r.aclose()

    @asynccontextmanager
    async def evalsha(url: str) -> AsyncIterator[Op]:
        r = client(url)
        sha = await r.script_load(INCR_SCRIPT)
        try:
            yield lambda: r.evalsha(sha, 1, "bench:client:n")
        finally:
            await r.aclose()

    return get, evalsha


def _coredis() -> tuple[Any, Any]:
    import coredis

    @asynccontextmanager
    async def get(url: str) -> AsyncIterator[Op]:
        async with coredis.Redis.from_url(url) as r:  # coredis 6 runs inside its context
            await r.set(KEY, SMALL_BYTES)
            yield lambda: r.get(KEY)

    @asynccontextmanager
    async def evalsha(url: str) -> AsyncIterator[Op]:
        async with coredis.Redis.from_url(url) as r:
            sha = await r.script_load(INCR_SCRIPT)
            yield lambda: r.evalsha(sha, ["bench:client:n"])

    return get, evalsha


def _glide() -> tuple[Any, Any]:
    from urllib.parse import urlsplit

    from glide import GlideClient, GlideClientConfiguration, NodeAddress, Script

    async def connect(url: str) -> Any:
        parts = urlsplit(url)
        config = GlideClientConfiguration([NodeAddress(parts.hostname, parts.port)])
        return await GlideClient.create(config)

    @asynccontextmanager
    async def get(url: str) -> AsyncIterator[Op]:
        r = await connect(url)
        await r.set(KEY, SMALL_BYTES)
        try:
            yield lambda: r.get(KEY)
        finally:
            await r.close()

    @asynccontextmanager
    async def evalsha(url: str) -> AsyncIterator[Op]:
        r = await connect(url)
        script = Script(INCR_SCRIPT)  # invoke_script sends EVALSHA, loading once
        try:
            yield lambda: r.invoke_script(script, keys=["bench:client:n"])
        finally:
            await r.close()

    return get, evalsha


PEERS = {"coredis": ("coredis", _coredis), "valkey-glide": ("glide", _glide)}


def cases() -> list[Case]:
    raw_get, raw_evalsha = redis_py("raw")
    pool_get, pool_evalsha = redis_py("pool")
    mux_get, mux_evalsha = redis_py("mux")
    found: list[Case] = [
        Case("redis.asyncio GET", raw_get),
        Case("ours, pool GET", pool_get, baseline="redis.asyncio GET"),
        Case("ours, multiplexed GET", mux_get, baseline="redis.asyncio GET",
             note="REDIS_AUTOPIPELINE=true"),
        Case("redis.asyncio EVALSHA", raw_evalsha),
        Case("ours, pool EVALSHA", pool_evalsha, baseline="redis.asyncio EVALSHA"),
        Case("ours, multiplexed EVALSHA", mux_evalsha, baseline="redis.asyncio EVALSHA",
             note="REDIS_AUTOPIPELINE=true"),
    ]  # fmt: skip
    for label, (module, build) in PEERS.items():
        if importlib.util.find_spec(module) is None:
            print(f"{label} is not installed: its rows are left out", flush=True)
            continue
        get, evalsha = build()
        found.append(Case(f"{label} GET", get, baseline="redis.asyncio GET"))
        found.append(Case(f"{label} EVALSHA", evalsha, baseline="redis.asyncio EVALSHA"))
    return found + service_cases()
