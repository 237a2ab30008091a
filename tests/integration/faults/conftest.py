"""Fixtures of the fault suite: a topology to break and an app started on it.

Every fault test runs on standalone, Cluster and Sentinel (``target`` /
``private_target`` are parametrized over ``KINDS``). Each fault means
something on each of them today; a future fault that does not on some
topology parametrizes the fixture itself (``indirect``) without that case and
says why in a comment, rather than skipping it.

Tests that leave the topology whole share one proxied target per topology for
the session (``target``, reset before each test); tests that kill and restart
nodes get their own (``private_target``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack

import pytest
import pytest_asyncio
from asgi_lifespan import LifespanManager
from starlette.types import ASGIApp

from app.core import redis as core_redis
from app.testing.fault_targets import KINDS, FaultTarget, Kind
from app.testing.topologies import topology_binaries_missing
from tests.integration.faults._harness import FAULT_SETTINGS


class StartApp:
    """``app = await start_app(app, url)`` runs *app*'s lifespan against Redis at *url*;
    ``await start_app.stop()`` shuts every started app down before the test ends."""

    def __init__(self, settings_override: Callable[..., None]) -> None:
        self._settings_override = settings_override
        self._stack = AsyncExitStack()

    async def __call__(self, app: ASGIApp, url: str, **settings: object) -> ASGIApp:
        self._settings_override(redis_url=url, **{**FAULT_SETTINGS, **settings})
        core_redis.redis_client = core_redis._owned_client = None
        manager = await self._stack.enter_async_context(
            LifespanManager(app, startup_timeout=30, shutdown_timeout=30)
        )
        return manager.app

    async def stop(self) -> None:
        await self._stack.aclose()


def _start(kind: Kind, *, proxied: bool) -> FaultTarget:
    reason = topology_binaries_missing()
    if reason:
        pytest.fail(f"the fault suite needs redis-server and redis-cli: {reason}")
    return FaultTarget(kind, proxied=proxied).start()


@pytest.fixture(scope="session")
def _shared_targets() -> Iterator[dict[Kind, FaultTarget]]:
    """One proxied target per topology for the session, started on first use."""
    targets: dict[Kind, FaultTarget] = {}
    yield targets
    for started in targets.values():
        started.cleanup()


@pytest.fixture(params=KINDS)
def target(request: pytest.FixtureRequest, _shared_targets: dict[Kind, FaultTarget]) -> FaultTarget:
    """A topology behind proxies (``target.proxy``), shared by tests that leave it whole.

    Reset before each test: no fault on the proxies, no data, no scripts, no memory limit.
    """
    kind: Kind = request.param
    if kind in _shared_targets:
        _shared_targets[kind].reset()
    else:
        _shared_targets[kind] = _start(kind, proxied=True)
    return _shared_targets[kind]


@pytest.fixture(params=KINDS)
def private_target(request: pytest.FixtureRequest) -> Iterator[FaultTarget]:
    """A topology of this test alone, without proxies: its nodes may be killed and restarted."""
    started = _start(request.param, proxied=False)
    try:
        yield started
    finally:
        started.cleanup()


@pytest_asyncio.fixture
async def start_app(
    settings_override: Callable[..., None],
) -> AsyncIterator[StartApp]:
    """``app = await start_app(app, url)``: run *app*'s lifespan against Redis at *url*.

    The lifespan builds the global client from settings (``FAULT_SETTINGS``), as
    production does; it is closed when the test ends (or at ``start_app.stop()``).
    """
    runner = StartApp(settings_override)
    try:
        yield runner
    finally:
        await runner.stop()


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
