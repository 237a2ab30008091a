"""A TCP proxy between the app and each Redis node: latency, a stalled link, cut connections.

On standalone, Cluster (every node behind its own proxy) and Sentinel (the
primary behind a proxy, found through the sentinel).

Every Redis call is bounded by the socket timeout (0.25 s, one retry): no
request may hang, the breaker opens while the link is bad (so fail-open paths
answer at once) and closes once it is good again, and every service recovers.
The outer bound each request is held to (``REQUEST_BOUND``, 5 s) is generous on
purpose: it proves that nothing hangs, not how fast the answer is.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.types import ASGIApp

from app.testing.fault_targets import FaultTarget, Proxies
from app.testing.waiting import eventually
from tests.integration.faults._harness import (
    REQUEST_BOUND,
    ROOMY_TIMEOUTS,
    Probe,
    Workload,
    app_breaker,
    burst,
    new_client,
)
from tests.integration.faults._probes import PROBES, probe_ids
from tests.integration.faults.conftest import StartApp

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def _start_behind_proxy(
    probe: Probe, target: FaultTarget, start_app: StartApp, **settings: object
) -> tuple[Proxies, FastAPI, ASGIApp]:
    web = probe.app()
    return target.proxy, web, await start_app(web, target.url, **{**probe.settings, **settings})


@pytest.mark.parametrize("probe", PROBES, ids=probe_ids)
async def test_latency_below_the_timeout_is_served_and_above_it_is_bounded(
    probe: Probe, target: FaultTarget, start_app: StartApp
) -> None:
    proxy, _, app = await _start_behind_proxy(probe, target, start_app)
    async with Workload(app, [probe]) as load:
        # Warm first: a URL the HTTP cache probe had not yet asked for is rightly a MISS.
        await load.until_warm()
        proxy.latency = 0.03  # 60 ms a round trip: slow, within the 250 ms socket timeout
        load.phase = "slow"
        await load.until_answers(4, phase="slow")
        proxy.latency = 0.4  # every reply now arrives after the socket timeout
        load.phase = "too slow"
        await load.until_answers(6, phase="too slow")
        proxy.latency = 0.0
        load.phase = "after"
        await load.until_recovered()
    load.assert_nothing_bad()
    slow = load.answers(phase="slow", whole=True)
    assert slow, "no answer within the slow phase"
    assert all(o.verdict == "healthy" for o in slow), [o for o in slow if o.verdict != "healthy"]
    load.assert_outage_answers("too slow")
    assert app_breaker().stats()["transitions"] >= 2  # it opened, and closed again
    # A timed-out call costs at most timeout x attempts per Redis call, far under the bound.
    assert max(o.elapsed for o in load.answers(phase="too slow")) < REQUEST_BOUND


@pytest.mark.parametrize("probe", PROBES, ids=probe_ids)
async def test_stalled_link_opens_the_breaker_then_closes_it(
    probe: Probe, target: FaultTarget, start_app: StartApp
) -> None:
    # The breaker stays open for 2 s, not FAULT_SETTINGS' 0.2 s: on a loaded machine the
    # next request may start more than 0.2 s after the breaker opened, find it half-open,
    # and become the trial instead of being rejected.
    proxy, web, app = await _start_behind_proxy(probe, target, start_app, breaker_reset_timeout=2.0)
    async with Workload(app, [probe]) as load:
        await load.until_recovered(streak=3)
        breaker = app_breaker()
        proxy.stall()  # connections stay open, nothing flows: only timeouts notice
        load.phase = "stalled"
        await eventually(lambda: breaker.state == "open", "the breaker opens")
        # While open, a request is answered without waiting on the dead link: the breaker
        # refuses its Redis call. Asked with one request of our own: a repeat run saw the
        # workload's 8 answers all come from requests already timing out on the link.
        rejected = breaker.stats()["rejected"]
        async with new_client(app) as client:
            answer = await asyncio.wait_for(probe.send(client, {}), REQUEST_BOUND)
        assert probe.judge(answer) == "degraded", answer.text
        assert breaker.stats()["rejected"] > rejected
        await load.until_answers(8, phase="stalled")
        proxy.resume()
        load.phase = "after"
        await load.until_recovered()
        assert breaker.state == "closed"
    load.assert_nothing_bad()
    load.assert_outage_answers("stalled")
    async with new_client(app) as client:
        await probe.works(client, web)


async def _healthy_burst(probe: Probe, client: httpx.AsyncClient, states: list[Any]) -> bool:
    verdicts = await burst(probe, client, states)
    assert verdicts <= {"healthy", "degraded"}, verdicts
    return verdicts == {"healthy"}


@pytest.mark.parametrize("probe", PROBES, ids=probe_ids)
async def test_cut_connections_are_replaced(
    probe: Probe, target: FaultTarget, start_app: StartApp
) -> None:
    """Every pooled connection reset between bursts: the next commands reconnect and succeed.

    Standalone and Sentinel: the very next burst is healthy (each command's retry
    reconnects its own connection). Cluster: a connection error makes redis-py mark
    the node's free connections for reconnection and refresh the slot map before it
    retries; concurrent commands that meet the cut connections meanwhile can use up
    their single retry (``FAULT_SETTINGS``), so on a loaded machine that first burst
    may be partly degraded (the documented outage answer, never a 500 or a hang),
    and the burst after it is healthy.

    (A cut that lands while a command is in flight can lose a reply after the
    server ran the command; ``test_lost_replies.py`` pins down what each service
    does then.)
    """
    proxy, web, app = await _start_behind_proxy(probe, target, start_app, **ROOMY_TIMEOUTS)
    states: list[dict[str, Any]] = [{} for _ in range(4)]
    async with new_client(app) as client:
        for _ in range(5):  # warm: sessions exist, every entry is cached, the pool is full
            await burst(probe, client, states)
        for _ in range(3):
            accepted = proxy.connections_accepted
            await asyncio.to_thread(proxy.cut)
            verdicts = await burst(probe, client, states)
            if target.kind == "cluster" and verdicts != {"healthy"}:
                assert verdicts <= {"healthy", "degraded"}, verdicts
                # (the breaker may have opened on those failures: its window passes first)
                await eventually(
                    lambda: _healthy_burst(probe, client, states), "a healthy burst after the cut"
                )
            else:
                assert verdicts == {"healthy"}
            assert proxy.connections_accepted > accepted  # the pool reconnected
        await probe.works(client, web)
