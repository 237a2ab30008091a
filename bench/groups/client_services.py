"""Service hot paths at 50 tasks: the client ``get_redis()`` builds against redis.asyncio.

For each hot path (cache hit, ``XADD``, rate-limit check, lock acquire +
release, idempotency claim + complete) three rows, all at 50 concurrent tasks:

* ``plain redis.asyncio: <path>``: the same service over ``Redis.from_url`` (the
  baseline of the other two rows);
* ``ours, multiplexed: <path>``: the service over ``build_client`` with
  ``REDIS_AUTOPIPELINE`` on, what ``get_redis()`` returns in an app;
* ``server bound: <path>``: what the server itself can run of that path (the
  bound the issue names for the script-bound paths). The commands that 100
  operations send are recorded from the service itself (same scripts, keys,
  arguments), packed once, and replayed as one write per op over 50 raw
  connections (one per task, each with operations of its own), replies read
  by hiredis and checked for errors: no Python client work left but the
  parsing, like ``redis-benchmark -P 100``. Counted per operation. Where an
  operation creates keys the next one must not find (idempotency), the batch
  ends with one ``DEL`` of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import Connection

from app.core.config import get_settings
from app.core.redis import build_client
from app.services.cache import CacheService
from app.services.idempotency import IdempotencyService
from app.services.locks import RedisLock
from app.services.rate_limit import RateLimiter
from app.services.streams import StreamProducer
from bench.common import SMALL, closing, raw_client, unique_names
from bench.harness import Case, Op

__all__ = ["service_cases"]

BATCH = 100  # operations per server-bound pipeline
CONNECTIONS = 50  # server-bound connections, one per task
SHAPE = ("c50",)
Builder = Callable[[Any], Awaitable[Op]]


def _multiplexed(url: str) -> Any:
    settings = get_settings().model_copy(update={"redis_autopipeline": True})
    return build_client(settings, url=url)


class _Recorder(Redis):
    """redis.asyncio that remembers every command it sends (and the keys scripts touch)."""

    recorded: list[tuple[Any, ...]]
    script_keys: set[Any]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.recorded.append(args)
        if args[0] in ("EVALSHA", "EVAL"):
            self.script_keys.update(args[3 : 3 + int(args[2])])
        return await super().execute_command(*args, **options)


async def _cache_get(r: Any) -> Op:
    cache = CacheService(r)
    await cache.set("bench:svc:cache", SMALL, ttl=3600)
    return lambda: cache.get("bench:svc:cache")


async def _xadd(r: Any) -> Op:
    producer = StreamProducer(r, "bench:svc:events", maxlen=10_000)
    return lambda: producer.add(SMALL)


async def _rate_check(r: Any) -> Op:
    limiter = RateLimiter(r, max_requests=10**9, window_seconds=3600)
    return lambda: limiter.is_allowed("bench-svc")


async def _lock_pair(r: Any) -> Op:
    name = unique_names("bench:svc:lock")  # a run id of its own: replayed batches never collide

    async def op() -> None:
        lock = RedisLock(r, name(), timeout=10)
        if not await lock.acquire():
            raise RuntimeError(f"{lock.name} was not free")
        await lock.release()

    return op


async def _claim_complete(r: Any) -> Op:
    svc = IdempotencyService(r, ttl=600, namespace="bench.svc")
    name = unique_names("req")

    async def op() -> None:
        key = name()
        claim = await svc.claim(key, "fingerprint")
        if not claim.is_new or claim.token is None:
            raise RuntimeError(f"{key}: {claim.status}")
        await svc.complete(key, claim.token, SMALL)

    return op


def _on(client: Callable[[str], Any], build: Builder) -> Callable[[str], Any]:
    @asynccontextmanager
    async def make(url: str) -> AsyncIterator[Op]:
        r = client(url)
        async with closing(r):
            yield await build(r)

    return make


async def _record(build: Builder, url: str) -> tuple[bytes, int, list[Any]]:
    """The bytes of BATCH operations of *build*'s path, their reply count, the keys scripts touched."""
    recorder: Any = _Recorder.from_url(url)
    recorder.recorded, recorder.script_keys = [], set()
    async with closing(recorder):
        op = await build(recorder)
        await op()  # warm up: scripts loaded, so what follows is the hot path's EVALSHA
        recorder.recorded.clear()
        recorder.script_keys.clear()
        for _ in range(BATCH):
            await op()
    packer = Connection()
    data = b"".join(b"".join(packer.pack_command(*args)) for args in recorder.recorded)
    return data, len(recorder.recorded), sorted(recorder.script_keys)


class _Socket:
    """One raw connection that writes a batch and reads its replies with hiredis."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.parser = hiredis.Reader()

    async def run(self, data: bytes, replies: int) -> None:
        self.writer.write(data)
        while replies:
            self.parser.feed(await self.reader.read(1 << 16))
            while replies and (reply := self.parser.gets()) is not False:
                if isinstance(reply, hiredis.ReplyError):
                    raise RuntimeError(f"the replayed batch failed: {reply}")
                replies -= 1


def _server_bound(build: Builder, *, reset: bool) -> Callable[[str], Any]:
    @asynccontextmanager
    async def make(url: str) -> AsyncIterator[Op]:
        parts = urlsplit(url)
        free: asyncio.Queue[tuple[_Socket, bytes, int]] = asyncio.Queue()
        sockets: list[_Socket] = []
        try:
            for _ in range(CONNECTIONS):  # each connection replays operations of its own
                data, replies, keys = await _record(build, url)
                if reset:
                    data += b"".join(Connection().pack_command("DEL", *keys))
                    replies += 1
                sock = _Socket(*await asyncio.open_connection(parts.hostname, parts.port))
                sockets.append(sock)
                if reset:  # the recording left the keys behind
                    await sock.run(b"".join(Connection().pack_command("DEL", *keys)), 1)
                free.put_nowait((sock, data, replies))

            async def replay() -> None:
                sock, data, replies = await free.get()
                try:
                    await sock.run(data, replies)
                finally:
                    free.put_nowait((sock, data, replies))

            yield replay
        finally:
            for sock in sockets:
                sock.writer.close()
                await sock.writer.wait_closed()

    return make


PATHS: list[tuple[str, Builder, bool | None]] = [
    # name, service operation, None (no script: no server-bound row) or reset after a batch
    ("CacheService.get (hit)", _cache_get, None),
    ("StreamProducer.add (XADD)", _xadd, None),
    ("RateLimiter.is_allowed", _rate_check, False),
    ("RedisLock acquire + release", _lock_pair, False),
    ("IdempotencyService claim + complete", _claim_complete, True),
]


def service_cases() -> list[Case]:
    """Three rows per hot path (see the module docstring), 50 tasks only."""
    found: list[Case] = []
    for name, build, reset in PATHS:
        plain = f"plain redis.asyncio: {name}"
        found.append(Case(plain, _on(raw_client, build), shapes=SHAPE))
        found.append(
            Case(
                f"ours, multiplexed: {name}",
                _on(_multiplexed, build),
                baseline=plain,
                note="get_redis() with REDIS_AUTOPIPELINE on",
                shapes=SHAPE,
            )
        )
        if reset is not None:
            found.append(
                Case(
                    f"server bound: {name}",
                    _server_bound(build, reset=reset),
                    baseline=plain,
                    note=f"its commands, {BATCH} operations per pipeline",
                    unit_per_op=BATCH,
                    shapes=SHAPE,
                )
            )
    return found
