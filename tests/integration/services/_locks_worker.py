"""A separate OS process for the lock tests (run with ``python -m``).

Modes:

* ``increment URL TASKS ROUNDS``: print ``ready``, wait for ``go`` (a Redis
  list), then run TASKS tasks that each do ROUNDS read-modify-write increments
  of one key under one ``RedisLock`` (GET, yield to the loop, SET); print ``done``.
* ``hold-permit URL NAME LIMIT LEASE``: take a ``Semaphore`` permit without
  renewal (on any topology: the client is built from URL as the app builds it), print ``held`` and sleep until killed (a crashed holder).
"""

from __future__ import annotations

import asyncio
import sys

from redis.asyncio import Redis

from app.core.redis import build_client
from app.services.locks import RedisLock, Semaphore
from app.testing.waiting import pop_signal

COUNTER_KEY = "locks-test:counter"
GO_KEY = "locks-test:go"
LOCK_NAME = "locks-test:counter"


async def _increment(url: str, tasks: int, rounds: int) -> None:
    redis = Redis.from_url(url, decode_responses=False, max_connections=200)
    try:
        print("ready", flush=True)
        await pop_signal(redis, GO_KEY, "the go signal", timeout=60)

        async def worker() -> None:
            for _ in range(rounds):
                async with RedisLock(redis, LOCK_NAME, timeout=5, blocking_timeout=60):
                    value = int(await redis.get(COUNTER_KEY) or 0)
                    await asyncio.sleep(0)
                    await redis.set(COUNTER_KEY, value + 1)

        await asyncio.gather(*(worker() for _ in range(tasks)))
        print("done", flush=True)
    finally:
        await redis.aclose()


async def _hold_permit(url: str, name: str, limit: int, lease: float) -> None:
    redis = build_client(url=url)  # redis://, redis+cluster:// or redis+sentinel://
    permit = await Semaphore(redis, name, limit, lease).acquire()
    print("held" if permit is not None else "refused", flush=True)
    await asyncio.sleep(3600)


def main(argv: list[str]) -> None:
    mode, url, *rest = argv
    if mode == "increment":
        asyncio.run(_increment(url, int(rest[0]), int(rest[1])))
    elif mode == "hold-permit":
        asyncio.run(_hold_permit(url, rest[0], int(rest[1]), float(rest[2])))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
