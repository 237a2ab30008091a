"""Drive one ASGI app, lifespan started once, from synchronous hypothesis tests.

Hypothesis runs examples synchronously; starting the app (and its Redis
client) per example would dominate the run. ``running_app`` keeps one event
loop (``asyncio.Runner``) for the whole test: the lifespan lives in a task of
that loop between examples, and each example is one ``request`` call on it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from asgi_lifespan import LifespanManager
from starlette.types import ASGIApp

from app.core import redis as core_redis

__all__ = ["RunningApp", "running_app"]

T = TypeVar("T")


@dataclass
class RunningApp:
    runner: asyncio.Runner
    client: httpx.AsyncClient

    def run(self, coro: Awaitable[T]) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(30):  # a hung request fails the example, not the run
                return await coro

        return self.runner.run(bounded())

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.run(self.client.request(method, url, **kwargs))


@contextlib.contextmanager
def running_app(
    make_app: Callable[[], ASGIApp], make_redis: Callable[[], Any]
) -> Iterator[RunningApp]:
    """The app from *make_app* with its lifespan running, the global client from *make_redis*.

    Both factories run inside the loop (clients bind to the loop that creates them).
    Unhandled app exceptions are *not* raised into the test: they become the 500
    answer a server would send, which is what the tests look for.
    """
    saved = core_redis.redis_client, core_redis._owned_client
    with asyncio.Runner() as runner:
        started: asyncio.Event | None = None
        stop: asyncio.Event | None = None
        holder: asyncio.Task[None] | None = None
        redis: Any = None

        async def start() -> httpx.AsyncClient:
            nonlocal started, stop, holder, redis
            started, stop = asyncio.Event(), asyncio.Event()
            redis = make_redis()
            core_redis.redis_client = redis
            app = make_app()
            box: list[ASGIApp] = []

            async def hold() -> None:
                assert started is not None and stop is not None
                async with LifespanManager(app, startup_timeout=30) as manager:
                    box.append(manager.app)
                    started.set()
                    await stop.wait()

            holder = asyncio.create_task(hold())
            waiter = asyncio.create_task(started.wait())
            await asyncio.wait([holder, waiter], return_when=asyncio.FIRST_COMPLETED)
            if not box:
                waiter.cancel()
                await holder  # raises the startup error
            transport = httpx.ASGITransport(app=box[0], raise_app_exceptions=False)
            return httpx.AsyncClient(transport=transport, base_url="http://testserver")

        async def finish(client: httpx.AsyncClient) -> None:
            await client.aclose()
            if stop is not None and holder is not None:
                stop.set()
                await holder
            if redis is not None:
                await redis.aclose()

        client = runner.run(start())
        try:
            yield RunningApp(runner, client)
        finally:
            runner.run(finish(client))
            core_redis.redis_client, core_redis._owned_client = saved
