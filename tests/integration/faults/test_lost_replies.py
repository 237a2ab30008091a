"""A reply lost after the server ran the command: the client's automatic retry must be safe.

redis-py retries a command on a connection error (``REDIS_RETRY_ATTEMPTS``),
and it cannot know whether the server ran the command before the connection
broke. A ``CLIENT KILL``, a failover or a network reset at the wrong moment
therefore runs a script twice. Each service's hot write must give the same
answer when that happens: the request that made it must not be told it
conflicted with itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import app.services
from app.api.routes import streams
from app.core.scripts import Script
from app.services.pubsub import Broadcaster
from app.services.pubsub._broadcaster import _PUBLISH
from app.services.streams import stream_keys
from app.testing.fault_targets import FaultTarget
from tests.integration.faults._harness import (
    Probe,
    admin_client,
    lose_one_reply,
    new_client,
    service_app,
)
from tests.integration.faults._probes import LOCKS, PROBES, PUBSUB, RATE_LIMIT, next_message
from tests.integration.faults.conftest import StartApp

pytestmark = [pytest.mark.integration, pytest.mark.slow]

AT_LEAST_ONCE = {"rate_limit", "pubsub"}  # a lost reply repeats the effect: tested below


def _cases() -> Iterator[Any]:
    for probe in PROBES:
        if probe.script is None or probe.name in AT_LEAST_ONCE:
            continue
        yield pytest.param(probe, id=probe.name)


def _sha(script: str) -> bytes:
    """The SHA1 the server knows *script* by: that of its source with the includes expanded."""
    (path,) = Path(app.services.__file__).parent.rglob(f"lua/{script}")  # beside its capability
    package = f"app.services.{path.parent.parent.name}"
    return Script.from_package(package, f"lua/{script}").sha.encode()


@pytest.mark.parametrize("probe", list(_cases()))
async def test_a_lost_reply_is_retried_safely(
    probe: Probe, target: FaultTarget, start_app: StartApp
) -> None:
    assert probe.script is not None
    web = probe.app()
    app = await start_app(web, target.url, **probe.settings)
    state: dict[str, Any] = {}
    async with new_client(app) as client:
        for _ in range(5):  # warm: from now on a request runs the probe's script by EVALSHA
            await probe.send(client, state)
        response = await lose_one_reply(target.proxy, _sha(probe.script), probe.send(client, state))
        assert probe.judge(response) == "healthy", f"{response.status_code} {response.text}"
        await probe.works(client, web)


async def test_a_lost_rate_limit_reply_counts_the_request_twice(
    target: FaultTarget, start_app: StartApp
) -> None:
    """Documented: the retried check is charged again, so the caller loses one unit of quota.

    The error is on the safe side (never more requests than the limit) and the
    request itself is still answered correctly.
    """
    web = RATE_LIMIT.app()
    app = await start_app(web, target.url)
    headers = {"X-User": "lost-reply"}
    async with new_client(app) as client:
        assert (await client.get("/limits/user", headers=headers)).status_code == 200
        response = await lose_one_reply(
            target.proxy, _sha("ratelimit_gcra.lua"), client.get("/limits/user", headers=headers)
        )
        assert response.status_code == 200 and response.json()["degraded"] is False
        # 5 per minute: 1 + 1 requests made, 3 units spent
        assert response.json()["policies"][0]["remaining"] == 2
        answers = [await client.get("/limits/user", headers=headers) for _ in range(3)]
        assert [r.status_code for r in answers] == [200, 200, 429]


async def test_a_lost_publish_reply_publishes_twice(
    target: FaultTarget, start_app: StartApp
) -> None:
    """Documented: a retried publish is a second publish; subscribers get the message twice.

    Each copy has its own history id, so consumers that need exactly-once must
    deduplicate on the payload (Redis pub/sub is at-most-once without retries).
    """
    web = PUBSUB.app()
    app = await start_app(web, target.url)
    broadcaster: Broadcaster = web.state.broadcaster
    async with new_client(app) as client, broadcaster.subscribe("twice") as subscription:
        assert (await client.post("/publish/twice", json={"n": 0})).status_code == 200
        await next_message(subscription)
        response = await lose_one_reply(
            target.proxy, _PUBLISH.sha.encode(), client.post("/publish/twice", json={"n": 1})
        )
        assert response.status_code == 200
        first, second = await next_message(subscription), await next_message(subscription)
        assert first.data == second.data == {"n": 1}
        assert first.id != second.id


async def test_a_lost_xadd_reply_appends_the_event_twice(
    target: FaultTarget, start_app: StartApp
) -> None:
    """Documented: a retried XADD appends a second entry (streams are at-least-once)."""
    app = await start_app(service_app(streams), target.url)
    admin = admin_client(target)
    try:
        async with new_client(app) as client:
            assert (await client.post("/streams/events", json={"payload": {}})).status_code == 201
            key = stream_keys(streams.DEMO_STREAM).stream
            before = await admin.xlen(key)
            response = await lose_one_reply(
                target.proxy, b"XADD", client.post("/streams/events", json={"payload": {"n": 1}})
            )
            assert response.status_code == 201
            assert await admin.xlen(key) == before + 2
    finally:
        await admin.aclose()


@pytest.mark.parametrize(
    ("route", "script"),
    [("/jobs/lost-release/run", "lock_release.lua"), ("/exports", "lock_semaphore_release.lua")],
    ids=["lock", "semaphore"],
)
async def test_a_lost_release_reply_still_counts_as_released(
    route: str, script: str, target: FaultTarget, start_app: StartApp
) -> None:
    """The retried release finds its own receipt: no false ``lock-lost``, the lock is free."""
    web = LOCKS.app()
    app = await start_app(web, target.url)
    async with new_client(app) as client:
        assert (await client.post(route, params={"seconds": 0})).status_code == 200  # warm
        # The release runs; its answer never arrives.
        response = await lose_one_reply(
            target.proxy, _sha(script), client.post(route, params={"seconds": 0})
        )
        assert response.status_code == 200, response.text
        again = await client.post(route, params={"seconds": 0})  # nothing is left held
        assert again.status_code == 200, again.text
        if script == "lock_release.lua":
            assert again.json()["fence"] == response.json()["fence"] + 1
        else:
            assert again.json()["running_at_start"] == 1
