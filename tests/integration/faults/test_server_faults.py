"""Faults the servers themselves cause: CLIENT KILL, SCRIPT FLUSH and maxmemory with noeviction.

On standalone, Cluster and Sentinel alike; each fault is applied to every data node.
"""

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
from app.core.redis import AnyRedis, redis_lifespan
from app.middleware.idempotency import IdempotencyMiddleware
from app.services.locks import RedisLock
from app.testing.fault_targets import FaultTarget
from tests.integration.faults._harness import (
    REQUEST_BOUND,
    ROOMY_TIMEOUTS,
    Probe,
    Workload,
    admin_client,
    burst,
    is_unavailable,
    new_client,
    on_every_node,
)
from tests.integration.faults._probes import PROBES, probe_ids
from tests.integration.faults.conftest import StartApp

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WARM_BURSTS = 5


@pytest_asyncio.fixture(name="admin")
async def _admin(target: FaultTarget) -> AsyncIterator[AnyRedis]:
    """A client of the test's own, outside the app (CLIENT KILL skips the caller)."""
    client = admin_client(target)
    try:
        yield client
    finally:
        await client.aclose()


async def _client_kill(target: FaultTarget, kind: str) -> int:
    """CLIENT KILL TYPE *kind* on every data node; how many connections were killed."""
    return sum(await on_every_node(target, lambda node: node.client_kill_filter(_type=kind)))


@pytest.mark.parametrize("probe", PROBES, ids=probe_ids)
async def test_client_kill_of_every_app_connection_is_survived(
    probe: Probe, target: FaultTarget, start_app: StartApp
) -> None:
    """CLIENT KILL TYPE normal between bursts: the pool's dead connections are replaced.

    (A kill that lands while a command is in flight can lose a reply after the
    server ran the command; ``test_a_lost_reply_is_retried_safely`` covers that.)
    """
    web = probe.app()
    app = await start_app(web, target.url, **{**probe.settings, **ROOMY_TIMEOUTS})
    states: list[dict[str, Any]] = [{} for _ in range(4)]
    async with new_client(app) as client:
        for _ in range(WARM_BURSTS):  # sessions exist, all entries are cached, the pool is full
            await burst(probe, client, states)
        for _ in range(3):
            killed = await _client_kill(target, "normal")
            assert killed >= 1
            # The client's retry reconnects: requests do not even notice.
            assert await burst(probe, client, states) == {"healthy"}
        await probe.works(client, web)


@pytest.mark.parametrize("probe", PROBES, ids=probe_ids)
async def test_client_kill_of_pubsub_connections_leaves_the_service_alone(
    probe: Probe, target: FaultTarget, start_app: StartApp
) -> None:
    web = probe.app()
    app = await start_app(web, target.url, **{**probe.settings, **ROOMY_TIMEOUTS})
    states: list[dict[str, Any]] = [{} for _ in range(4)]
    async with new_client(app) as client:
        for _ in range(WARM_BURSTS):
            await burst(probe, client, states)
        await _client_kill(target, "pubsub")
        assert await burst(probe, client, states) == {"healthy"}


@pytest.mark.parametrize("probe", PROBES, ids=probe_ids)
async def test_script_flush_under_load_reloads_scripts(
    probe: Probe, target: FaultTarget, start_app: StartApp
) -> None:
    web = probe.app()
    app = await start_app(web, target.url, **{**probe.settings, **ROOMY_TIMEOUTS})
    async with Workload(app, [probe]) as load:
        await load.until_recovered(streak=3)
        load.phase = "flushing"
        for _ in range(5):
            await on_every_node(target, lambda node: node.script_flush())
            await asyncio.sleep(0.05)
        load.phase = "after"
        await load.until_recovered()
    load.assert_nothing_bad()
    # NOSCRIPT is answered by EVAL with the source: requests do not notice.
    assert {o.verdict for o in load.answers(phase="flushing")} == {"healthy"}


async def _out_of_memory(target: FaultTarget, admin: AnyRedis) -> None:
    """Make every write fail with OOM: noeviction and, on every node, a limit under its use.

    Half of what each node uses, so that keys the workload frees (expiries,
    deletes) cannot bring a node back under it mid-test.
    """

    async def limit(node: Redis) -> None:
        await node.config_set("maxmemory-policy", "noeviction")
        used = int((await node.info("memory"))["used_memory"])
        await node.config_set("maxmemory", used // 2)

    await on_every_node(target, limit)
    for n in range(30):  # keys over every slot range: each node refuses
        with pytest.raises(OutOfMemoryError):
            await admin.set(f"oom-check:{n}", b"x")


async def _memory_back(target: FaultTarget) -> None:
    await on_every_node(target, lambda node: node.config_set("maxmemory", 0))


@pytest.mark.parametrize("probe", PROBES, ids=probe_ids)
async def test_out_of_memory_gives_a_clear_answer_and_recovers(
    probe: Probe, target: FaultTarget, start_app: StartApp, admin: AnyRedis
) -> None:
    web = probe.app()
    app = await start_app(web, target.url, **probe.settings)
    async with Workload(app, [probe]) as load:
        await load.until_recovered(streak=3)
        await _out_of_memory(target, admin)
        load.phase = "oom"
        await load.until_answers(6, phase="oom")
        await _memory_back(target)
        load.phase = "after"
        await load.until_recovered()
    load.assert_nothing_bad()
    load.assert_outage_answers("oom")
    async with new_client(app) as client:
        await probe.works(client, web)


async def test_idempotency_out_of_memory_after_the_handler_ran(
    target: FaultTarget, start_app: StartApp, admin: AnyRedis
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
    asgi = await start_app(app, target.url)
    async with new_client(asgi) as client:
        assert (await client.post("/work", headers={"Idempotency-Key": "warm"})).status_code == 200
        await _out_of_memory(target, admin)
        response = await client.post("/work", headers={"Idempotency-Key": "k1"})
        # The handler ran and its answer is sent; only the record could not be stored.
        assert response.status_code == 200 and response.json() == {"runs": 2}
        await _memory_back(target)
        again = await client.post("/work", headers={"Idempotency-Key": "k2"})
        assert again.status_code == 200
        replay = await client.post("/work", headers={"Idempotency-Key": "k2"})
        assert replay.headers["idempotent-replayed"] == "true"


async def test_a_lock_held_when_memory_runs_out_is_renewed_and_released(
    target: FaultTarget, start_app: StartApp, admin: AnyRedis
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

    asgi = await start_app(app, target.url)
    key = RedisLock(admin, "work:held", timeout=1).key
    async with new_client(asgi) as client:
        held = asyncio.create_task(client.post("/work/held", params={"wait": True}))
        async with asyncio.timeout(5):
            while not await admin.exists(key):
                await asyncio.sleep(0.01)
        await _out_of_memory(target, admin)
        refused = await client.post("/work/other", params={"wait": False})
        assert is_unavailable(refused), refused.text  # a new lock needs a write: 503
        await asyncio.sleep(0.7)  # longer than the lease: only renewals keep it
        assert await admin.pttl(key) > 0
        finish.set()
        released = await asyncio.wait_for(held, REQUEST_BOUND)
        assert released.status_code == 200, released.text  # not lock-lost: it was kept
        assert not await admin.exists(key)
        await _memory_back(target)
        assert (await client.post("/work/other", params={"wait": False})).status_code == 200
