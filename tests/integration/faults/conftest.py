"""Fixtures of the fault suite: a private redis-server and an app started on it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack

import pytest
import pytest_asyncio
from asgi_lifespan import LifespanManager
from starlette.types import ASGIApp

from app.core import redis as core_redis
from app.testing.servers import RedisServer, redis_server_binary
from tests.integration.faults._harness import FAULT_SETTINGS

StartApp = Callable[..., Awaitable[ASGIApp]]


@pytest.fixture
def private_server() -> Iterator[RedisServer]:
    """A redis-server of this test alone: it may be killed, paused, filled or restarted."""
    if redis_server_binary() is None:
        pytest.fail("the fault suite needs redis-server on PATH (apt-get install redis-server)")
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest_asyncio.fixture
async def start_app(
    settings_override: Callable[..., None],
) -> AsyncIterator[StartApp]:
    """``app = await start_app(app, url)``: run *app*'s lifespan against Redis at *url*.

    The lifespan builds the global client from settings (``FAULT_SETTINGS``), as
    production does; it is closed when the test ends.
    """
    stack = AsyncExitStack()

    async def start(app: ASGIApp, url: str, **settings: object) -> ASGIApp:
        settings_override(redis_url=url, **{**FAULT_SETTINGS, **settings})
        core_redis.redis_client = core_redis._owned_client = None
        manager = await stack.enter_async_context(
            LifespanManager(app, startup_timeout=30, shutdown_timeout=30)
        )
        return manager.app

    async with stack:
        yield start


@pytest.fixture(autouse=True)
def _no_stack_traces(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """No error with a traceback may be logged during a fault test (expected faults log none)."""
    caplog.set_level(logging.WARNING)
    yield
    traced = [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.get_records("call")
        if r.levelno >= logging.ERROR and r.exc_info
    ]
    assert not traced, f"errors logged with a stack trace: {traced}"
