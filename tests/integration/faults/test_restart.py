"""The Redis processes killed and restarted on the same ports under a running workload.

Standalone: the server; Cluster: every node (the cluster comes back with the
same slots); Sentinel: the primary, which has no replica, so the sentinel keeps
naming it and clients find it again through the sentinel. No persistence: the
restart loses every key and every cached script. Each
service must keep giving its documented answer during the outage (503
problem+json when fail-closed, the origin's answer when fail-open), never a 500
or a hung request, and work fully again afterwards without an app restart.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import pytest
from fastapi import FastAPI

from app.api.deps import request_lock
from app.api.problems import install_problem_handlers
from app.core.redis import redis_lifespan
from app.services.locks import RedisLock
from app.services.pubsub import Broadcaster, Reconnected
from app.testing.fault_targets import FaultTarget
from tests.integration.faults._harness import (
    REQUEST_BOUND,
    Probe,
    Workload,
    admin_client,
    connected_clients,
    is_problem,
    is_unavailable,
    new_client,
    no_connection_left,
    service_app,
    topology_connections,
)
from tests.integration.faults._probes import PROBES, PUBSUB, STREAMS, next_message, probe_ids
from tests.integration.faults.conftest import StartApp

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WORKERS = 3


async def _kill_and_restart(target: FaultTarget, load: Workload, *, outage: int = 6) -> None:
    await load.until_answers(3, phase="before")
    await asyncio.to_thread(target.kill)
    load.phase = "down"
    await load.until_answers(outage, phase="down")
    await asyncio.to_thread(target.restart)  # same ports; data and scripts are gone
    load.phase = "after"
    await load.until_recovered()


@pytest.mark.parametrize("probe", PROBES, ids=probe_ids)
async def test_kill_and_restart_mid_workload(
    probe: Probe, private_target: FaultTarget, start_app: StartApp
) -> None:
    web = probe.app()
    app = await start_app(web, private_target.url, **probe.settings)
    async with Workload(app, [probe], workers=WORKERS) as load:
        await _kill_and_restart(private_target, load)
    load.assert_nothing_bad()
    load.assert_outage_answers("down")
    async with new_client(app) as client:
        await probe.works(client, web)
    # No stuck connections: the pool holds about one per concurrent request.
    assert await connected_clients(private_target) <= WORKERS + 2 + topology_connections(
        private_target
    )
    await start_app.stop()
    await no_connection_left(private_target)  # and none leaked: the shutdown closed them all


async def test_every_service_recovers_together_after_two_restarts(
    private_target: FaultTarget, start_app: StartApp
) -> None:
    probes = [p for p in PROBES if not p.settings]  # every service with default settings
    modules = tuple(dict.fromkeys(m for p in probes for m in p.modules))
    web = service_app(*modules)
    app = await start_app(web, private_target.url)
    async with Workload(app, probes, workers=2) as load:
        for _ in range(2):
            await _kill_and_restart(private_target, load, outage=3)
            load.phase = "before"
    load.assert_nothing_bad()
    load.assert_outage_answers("down")
    async with new_client(app) as client:
        for probe in probes:
            await probe.works(client, web)
    # No stuck connections. Under CPU contention requests overlap more, and one request
    # may hold two connections at once (its command and a heartbeat or watchdog renewal
    # of the same request), so the bound is two per concurrent request, plus background.
    concurrent = 2 * len(probes)  # Workload(workers=2) per probe
    assert await connected_clients(private_target) <= 2 * concurrent + 4 + topology_connections(
        private_target
    )
    await start_app.stop()
    await no_connection_left(private_target)  # and none leaked: the shutdown closed them all


async def test_a_subscriber_open_across_a_restart_is_resubscribed(
    private_target: FaultTarget, start_app: StartApp
) -> None:
    web = PUBSUB.app()
    app = await start_app(web, private_target.url)
    broadcaster: Broadcaster = web.state.broadcaster
    async with new_client(app) as client, broadcaster.subscribe("across") as subscription:
        assert (await client.post("/publish/across", json={"n": 0})).status_code == 200
        assert (await next_message(subscription)).data == {"n": 0}
        await asyncio.to_thread(private_target.kill)
        assert is_unavailable(await client.post("/publish/across", json={"n": -1}))
        await asyncio.to_thread(private_target.restart)
        reconnected = await asyncio.wait_for(subscription.get(10), 10)
        assert isinstance(reconnected, Reconnected)  # the subscriber is told about the gap
        async with asyncio.timeout(10):  # publishing works again once the breaker lets it
            while (await client.post("/publish/across", json={"n": 1})).status_code != 200:
                await asyncio.sleep(0.05)
        assert (await next_message(subscription)).data == {"n": 1}
    assert broadcaster.stats()["reconnects"] >= 1


async def test_a_running_consumer_recreates_its_group_after_a_restart(
    private_target: FaultTarget, start_app: StartApp
) -> None:
    web = STREAMS.app()
    app = await start_app(web, private_target.url)
    async with new_client(app) as client:
        await STREAMS.works(client, web)  # starts the in-app consumer; events are handled
        await asyncio.to_thread(private_target.restart)  # the stream and its group are gone
        async with asyncio.timeout(10):
            while (await client.post("/streams/events", json={"payload": {}})).status_code != 201:
                await asyncio.sleep(0.05)
        await STREAMS.works(client, web)
        stats = (await client.get("/streams/stats")).json()
    assert stats["counters"]["group_recreated"] >= 1
    assert stats["pending"] == 0


def _lock_lost(response: Any) -> bool:
    return is_problem(response, 409) and response.json()["type"].endswith("/lock-lost")


async def test_a_lock_held_across_a_restart_is_lost_and_its_holder_learns_it(
    private_target: FaultTarget, start_app: StartApp
) -> None:
    """Documented: a restart (like a failover) loses held locks; every holder is told.

    ``/held/{job}?wait=true`` holds its lock (lease 10 s) until the test lets
    it finish: the release at exit finds the key gone and the request answers
    409 ``lock-lost``. ``/watched/{job}`` holds a 0.6 s lease the watchdog
    renews every 0.2 s: the renewal finds the key gone (or cannot reach Redis
    until the lease would end), cancels the handler, and the request answers
    409 ``lock-lost`` at once. Meanwhile a second request got the first one's
    lock: two holders overlapped, and the second's fencing token is the larger,
    so a resource that checks fences refuses the first holder's late writes.
    """
    app = FastAPI(lifespan=redis_lifespan())
    install_problem_handlers(app)
    finish = asyncio.Event()
    finished: list[str] = []

    @app.post("/held/{job}")
    async def held(
        job: str, lock: Annotated[RedisLock, request_lock("held:{job}", timeout=10)], wait: bool
    ) -> dict[str, Any]:
        if wait:
            await finish.wait()
        return {"fence": lock.fence}

    @app.post("/watched/{job}")
    async def watched(
        job: str, lock: Annotated[RedisLock, request_lock("watched:{job}", timeout=0.6)]
    ) -> dict[str, Any]:
        await asyncio.sleep(REQUEST_BOUND * 2)
        finished.append(job)
        return {"fence": lock.fence}

    asgi = await start_app(app, private_target.url)
    admin = admin_client(private_target)
    keys = [RedisLock(admin, name, timeout=1).key for name in ("held:j1", "watched:j1")]
    async with new_client(asgi) as client:
        first = asyncio.create_task(client.post("/held/j1", params={"wait": True}))
        renewed = asyncio.create_task(client.post("/watched/j1"))
        try:
            async with asyncio.timeout(5):
                while await admin.exists(*keys) < 2:
                    await asyncio.sleep(0.01)
            first_fence = int(await admin.get(keys[0] + ":fence") or 0)
            await admin.aclose()
            await asyncio.to_thread(private_target.restart)  # every key is gone
            async with asyncio.timeout(10):  # a second holder gets the lock the first still "holds"
                while (second := await client.post("/held/j1", params={"wait": False})).is_error:
                    assert is_unavailable(second), second.text  # the breaker may need a trial first
                    await asyncio.sleep(0.05)
            assert second.json()["fence"] > first_fence  # fences restart above every old token
            lost_while_working = await asyncio.wait_for(renewed, REQUEST_BOUND)
            assert _lock_lost(lost_while_working), lost_while_working.text
            assert finished == []  # the watchdog cancelled the handler
            finish.set()
            lost_at_exit = await asyncio.wait_for(first, REQUEST_BOUND)
            assert _lock_lost(lost_at_exit), lost_at_exit.text
        finally:  # a failed assertion must not leave requests running past the test
            finish.set()
            for task in (first, renewed):
                task.cancel()
            await asyncio.gather(first, renewed, return_exceptions=True)
