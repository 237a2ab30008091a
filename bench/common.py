"""What every group shares: the values, the clients, the key counters and the side copies.

Clients:

* ``raw_client(url)``: what a user has without any library, redis.asyncio's
  defaults (RESP3, hiredis, default pool). Every raw baseline and every peer
  that takes a client gets one of these, built from the same URL.
* ``toolkit_client(url)``: what our services get from ``get_redis()`` in an
  app (``build_client``: a pool that waits instead of failing past its size,
  retries, socket timeouts). Our cases run on it unless their name says otherwise.

Values: ``SMALL`` (~100 bytes of JSON) and ``LARGE`` (~50 KB of JSON), as a
Python object for libraries that serialize and as bytes (``*_BYTES``) for
raw commands and for backends that store what they are given.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import os
import sys
import types
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
from redis.asyncio import Redis

from app.core.redis import build_client

__all__ = [
    "LARGE",
    "LARGE_BYTES",
    "SMALL",
    "SMALL_BYTES",
    "VENDOR",
    "closing",
    "fastapi_limiter_016",
    "raw_client",
    "rotating_names",
    "settle_and_close",
    "toolkit_client",
    "unique_names",
]

SMALL: dict[str, Any] = {
    "id": 1,
    "name": "Ada Lovelace",
    "email": "ada@example.com",
    "tags": ["math", "engines"],
    "active": True,
}
SMALL_BYTES = orjson.dumps(SMALL)

LARGE: dict[str, Any] = {
    "items": [
        {"id": i, "name": f"item number {i}", "price": round(1.25 * i, 2), "tags": ["a", "bc"]}
        for i in range(740)
    ]
}
LARGE_BYTES = orjson.dumps(LARGE)

VENDOR = Path(__file__).parent / ".vendor"


def raw_client(url: str) -> Redis:
    """redis.asyncio with its defaults: the baseline every ratio divides by."""
    return Redis.from_url(url)


def toolkit_client(url: str) -> Any:
    """The toolkit's client, as ``get_redis()`` builds it in an app."""
    return build_client(url=url)


@asynccontextmanager
async def closing(*clients: Any) -> AsyncIterator[None]:
    """Close every client (``aclose``) when the case ends."""
    try:
        yield
    finally:
        for client in clients:
            await client.aclose()


async def settle_and_close(proxy: Any) -> None:
    """Close a ``TcpProxy`` once the connections its clients just closed have wound down
    (closing it mid-teardown leaves its per-connection tasks pending, and asyncio
    prints "Task was destroyed but it is pending" for each)."""
    await asyncio.sleep(0.2)
    proxy.close()


def unique_names(prefix: str) -> Callable[[], str]:
    """``prefix:<run>:1``, ``prefix:<run>:2``, ...: a name never used before, per operation."""
    counter = itertools.count(1)
    run = os.urandom(4).hex()
    return lambda: f"{prefix}:{run}:{next(counter)}"


def rotating_names(prefix: str, size: int = 1000) -> Callable[[], str]:
    """Names cycling through *size* values: reused like real lock names, and never two
    in flight at once with 50 tasks (a name comes back only after *size* operations)."""
    counter = itertools.count()
    return lambda: f"{prefix}:{next(counter) % size}"


def fastapi_limiter_016() -> types.SimpleNamespace:
    """fastapi-limiter 0.1.6 (the API most deployed code uses) from its side copy.

    ``make bench`` installs it with ``pip install --no-deps --target
    bench/.vendor/fastapi_limiter_016 fastapi-limiter==0.1.6``; it is imported
    under the name ``fastapi_limiter_016`` so that 0.2 (in the venv) stays
    importable as ``fastapi_limiter`` in the same process.
    """
    cached = sys.modules.get("fastapi_limiter_016")
    if cached is not None:
        return types.SimpleNamespace(
            FastAPILimiter=cached.FastAPILimiter,
            RateLimiter=sys.modules["fastapi_limiter_016.depends"].RateLimiter,
        )
    root = VENDOR / "fastapi_limiter_016"
    if not (root / "fastapi_limiter" / "depends.py").exists():
        raise RuntimeError(f"fastapi-limiter 0.1.6 side copy missing in {root}: run `make bench`")

    def ours(name: str) -> bool:
        return name == "fastapi_limiter" or name.startswith("fastapi_limiter.")

    saved = {name: module for name, module in sys.modules.items() if ours(name)}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        package = importlib.import_module("fastapi_limiter")
        depends = importlib.import_module("fastapi_limiter.depends")
    finally:
        sys.path.remove(str(root))
        loaded = {name: sys.modules.pop(name) for name in list(sys.modules) if ours(name)}
        sys.modules.update(saved)
    for name, module in loaded.items():
        sys.modules["fastapi_limiter_016" + name[len("fastapi_limiter") :]] = module
    version = (root / "fastapi_limiter-0.1.6.dist-info").exists()
    if not version:
        raise RuntimeError(f"{root} does not hold fastapi-limiter 0.1.6")
    return types.SimpleNamespace(
        FastAPILimiter=package.FastAPILimiter, RateLimiter=depends.RateLimiter
    )
