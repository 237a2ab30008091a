"""Faults the server itself causes: CLIENT KILL, SCRIPT FLUSH and maxmemory with noeviction."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

import pytest
import pytest_asyncio
from fastapi import FastAPI
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError

from app.api.deps import request_lock
from app.api.problems import install_problem_handlers
from app.core.redis import redis_lifespan
from app.middleware.idempotency import IdempotencyMiddleware
from app.services.locks import RedisLock
from app.testing.servers import RedisServer
from tests.integration.faults._harness import (
    REQUEST_BOUND,
    Probe,
    Workload,
    burst,
    is_unavailable,
    new_client,
)
from tests.integration.faults._probes import PROBES, probe_ids
from tests.integration.faults.conftest import StartApp

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WARM_BURSTS = 5


@pytest_asyncio.fixture
async def admin(private_server: RedisServer) -> AsyncIterator[Redis]:
    """A client of the test's own, outside the app (CLIENT KILL skips the caller)."""
    client = Redis.from_url(private_server.url, socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.mark.parametrize("probe", PROBES, ids=probe_ids)
async def test_client_kill_of_every_app_connection_is_survived(
    probe: Probe, private_server: RedisServer, start_app: StartApp, admin: Redis
) -> None:
    """CLIENT KILL TYPE normal between bursts: the pool's dead connections are replaced.

    (A kill that lands while a command is in flight can lose a reply after the
    server ran the command; ``test_a_lost_reply_is_retried_safely`` covers that.)
    """
    web = probe.app()
    app = await start_app(web, private_server.url, **probe.settings)
    states: list[dict[str, Any]] = [{} for _ in range(4)]
    async with new_client(app) as client:
        for _ in range(WARM_BURSTS):  # sessions exist, all entries are cached, the pool is full
            await burst(probe, client, states)
        for _ in range(3):
            killed = await admin.client_kill_filter(_type="normal")
            assert killed >= 1
            # The client's retry reconnects: requests do not even notice.
            assert await burst(probe, client, states) == {"healthy"}
        await probe.works(client, web)


@pytest.mark.parametrize("probe", PROBES, ids=probe_ids)
async def test_client_kill_of_pubsub_connections_leaves_the_service_alone(
    probe: Probe, private_server: RedisServer, start_app: StartApp, admin: Redis
) -> None:
    web = probe.app()
    app = await start_app(web, private_server.url, **probe.settings)
    states: list[dict[str, Any]] = [{} for _ in range(4)]
    async with new_client(app) as client:
        for _ in range(WARM_BURSTS):
            await burst(probe, client, states)
        await admin.client_kill_filter(_type="pubsub")
        assert await burst(probe, client, states) == {"healthy"}


@pytest.mark.parametrize("probe", PROBES, ids=probe_ids)
async def test_script_flush_under_load_reloads_scripts(
    probe: Probe, private_server: RedisServer, start_app: StartApp, admin: Redis
) -> None:
    web = probe.app()
    app = await start_app(web, private_server.url, **probe.settings)
    async with Workload(app, [probe]) as load:
        await load.until_recovered(streak=3)
        load.phase = "flushing"
        for _ in range(5):
            await admin.script_flush()
            await asyncio.sleep(0.05)
        load.phase = "after"
        await load.until_recovered()
    load.assert_nothing_bad()
    # NOSCRIPT is answered by EVAL with the source: requests do not notice.
    assert {o.verdict for o in load.answers(phase="flushing")} == {"healthy"}


async def _fill_until_oom(admin: Redis) -> int:
    """Make every write fail with OOM: 1 MB limit, noeviction, and filler up to it.

    Then the limit drops a little below what is used, so that keys the workload
    frees (expiries, deletes) cannot bring the server back under it mid-test.
    """
    await admin.config_set("maxmemory-policy", "noeviction")
    await admin.config_set("maxmemory", "1mb")
    written = 0
    try:
        for n in range(10_000):
            await admin.set(f"filler:{n}", b"x" * 4096)
            written += 1
    except OutOfMemoryError:
        await admin.config_set("maxmemory", "900kb")
        return written
    raise AssertionError("maxmemory 1mb never refused a write")


@pytest.mark.parametrize("probe", PROBES, ids=probe_ids)
async def test_out_of_memory_gives_a_clear_answer_and_recovers(
    probe: Probe, private_server: RedisServer, start_app: StartApp, admin: Redis
) -> None:
    web = probe.app()
    app = await start_app(web, private_server.url, **probe.settings)
    async with Workload(app, [probe]) as load:
        await load.until_recovered(streak=3)
        await _fill_until_oom(admin)
        load.phase = "oom"
        await load.until_answers(6, phase="oom")
        await admin.config_set("maxmemory", "0")
        load.phase = "after"
        await load.until_recovered()
    load.assert_nothing_bad()
    load.assert_outage_answers("oom")
    async with new_client(app) as client:
        await probe.works(client, web)


async def test_idempotency_out_of_memory_after_the_handler_ran(
    private_server: RedisServer, start_app: StartApp, admin: Redis
) -> None:
    """The claim goes through, the handler answers, then storing the response meets OOM."""
    app = FastAPI(lifespan=redis_lifespan())
    install_problem_handlers(app)
    runs = 0

    @app.post("/work")
    async def work() -> dict[str, int]:
        nonlocal runs
        runs += 1
        return {"runs": runs}

    app.add_middleware(IdempotencyMiddleware)
    asgi = await start_app(app, private_server.url)
    async with new_client(asgi) as client:
        assert (await client.post("/work", headers={"Idempotency-Key": "warm"})).status_code == 200
        await _fill_until_oom(admin)
        response = await client.post("/work", headers={"Idempotency-Key": "k1"})
        # The handler ran and its answer is sent; only the record could not be stored.
        assert response.status_code == 200 and response.json() == {"runs": 2}
        await admin.config_set("maxmemory", "0")
        again = await client.post("/work", headers={"Idempotency-Key": "k2"})
        assert again.status_code == 200
        replay = await client.post("/work", headers={"Idempotency-Key": "k2"})
        assert replay.headers["idempotent-replayed"] == "true"


async def test_a_lock_held_when_memory_runs_out_is_renewed_and_released(
    private_server: RedisServer, start_app: StartApp, admin: Redis
) -> None:
    """OOM refuses new locks (503), never the holders: renewals and releases go through.

    A held 0.6 s lease is renewed by its watchdog three times while every write
    is refused, and its release at the end succeeds (``PEXPIRE``/``DEL`` free
    or keep memory; Redis lets a script that already wrote finish its writes).
    """
    app = FastAPI(lifespan=redis_lifespan())
    install_problem_handlers(app)
    finish = asyncio.Event()

    @app.post("/work/{job}")
    async def work(
        job: str, lock: Annotated[RedisLock, request_lock("work:{job}", timeout=0.6)], wait: bool
    ) -> dict[str, Any]:
        if wait:
            await finish.wait()
        return {"fence": lock.fence}

    asgi = await start_app(app, private_server.url)
    key = RedisLock(admin, "work:held", timeout=1).key
    async with new_client(asgi) as client:
        held = asyncio.create_task(client.post("/work/held", params={"wait": True}))
        async with asyncio.timeout(5):
            while not await admin.exists(key):
                await asyncio.sleep(0.01)
        await _fill_until_oom(admin)
        refused = await client.post("/work/other", params={"wait": False})
        assert is_unavailable(refused), refused.text  # a new lock needs a write: 503
        await asyncio.sleep(0.7)  # longer than the lease: only renewals keep it
        assert await admin.pttl(key) > 0
        finish.set()
        released = await asyncio.wait_for(held, REQUEST_BOUND)
        assert released.status_code == 200, released.text  # not lock-lost: it was kept
        assert not await admin.exists(key)
        await admin.config_set("maxmemory", "0")
        assert (await client.post("/work/other", params={"wait": False})).status_code == 200
