"""One ``Probe`` per service: how a fault test drives it through the demo routes.

Adding a service to the fault suite is adding a probe here and to ``PROBES``.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
from fastapi import FastAPI

from app.api.routes import (
    cache,
    http_cache,
    idempotency,
    locks,
    pubsub,
    rate_limit,
    sessions,
    streams,
)
from app.services.pubsub import Broadcaster, Message
from tests.integration.faults._harness import FAULT_SETTINGS, Probe, is_problem, is_unavailable

__all__ = [
    "CACHE",
    "HTTP_CACHE",
    "IDEMPOTENCY",
    "LOCKS",
    "PROBES",
    "PUBSUB",
    "RATE_LIMIT",
    "RATE_LIMIT_CLOSED",
    "SESSIONS",
    "STREAMS",
    "probe_ids",
]


# -- sessions (fail-closed) ---------------------------------------------------------


def _remember_cookie(response: httpx.Response, state: dict[str, Any]) -> None:
    for header in response.headers.get_list("set-cookie"):
        name, _, rest = header.partition("=")
        if name.strip() != "session":
            continue
        value = rest.split(";", 1)[0]
        if "Max-Age=0" in rest or not value:
            state.pop("cookie", None)
        else:
            state["cookie"] = value


async def _session_counter(client: httpx.AsyncClient, state: dict[str, Any]) -> httpx.Response:
    headers = {"cookie": f"session={state['cookie']}"} if "cookie" in state else {}
    response = await client.post("/session/counter", headers=headers)
    _remember_cookie(response, state)
    return response


def _session_healthy(response: httpx.Response) -> bool:
    return response.status_code == 200 and isinstance(response.json().get("counter"), int)


async def _sessions_work(client: httpx.AsyncClient, app: FastAPI) -> None:
    state: dict[str, Any] = {}
    values = [(await _session_counter(client, state)).json() for _ in range(3)]
    assert values == [{"counter": 1}, {"counter": 2}, {"counter": 3}], values


SESSIONS = Probe(
    name="sessions",
    modules=(sessions,),
    failure="closed",
    send=_session_counter,
    healthy=_session_healthy,
    degraded=is_unavailable,
    works=_sessions_work,
    script="session_write.lua",
)


# -- idempotency (fail-closed) ------------------------------------------------------


async def _payment(client: httpx.AsyncClient, key: str) -> httpx.Response:
    return await client.post("/payments", json={"amount": 1250}, headers={"Idempotency-Key": key})


async def _new_payment(client: httpx.AsyncClient, state: dict[str, Any]) -> httpx.Response:
    return await _payment(client, f'"{uuid.uuid4()}"')


async def _idempotency_works(client: httpx.AsyncClient, app: FastAPI) -> None:
    key = f'"{uuid.uuid4()}"'
    first, replay = await _payment(client, key), await _payment(client, key)
    assert first.status_code == 201, first.text
    assert replay.status_code == 201 and replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content


IDEMPOTENCY = Probe(
    name="idempotency",
    modules=(idempotency,),
    failure="closed",
    send=_new_payment,
    healthy=lambda r: r.status_code == 201,
    degraded=is_unavailable,
    works=_idempotency_works,
    script="idempotency_claim.lua",
)


# -- HTTP response caching (fail-open) ----------------------------------------------


async def _cached_item(client: httpx.AsyncClient, state: dict[str, Any]) -> httpx.Response:
    state["n"] = n = state.get("n", 0) + 1
    return await client.get(f"/http-cache/items/{n % 4}")


def _served_from_redis(response: httpx.Response) -> bool:
    return response.status_code == 200 and response.headers.get("x-cache") in {"HIT", "STALE"}


def _http_cache_answer(response: httpx.Response) -> str:
    """The URL, X-Cache and the origin's call count: 1 means the URL was never cached."""
    h = response.headers
    return (
        f"{response.status_code} {response.request.url.path} X-Cache={h.get('x-cache')} "
        f"X-Origin-Calls={h.get('x-origin-calls')}"
    )


async def _http_cache_works(client: httpx.AsyncClient, app: FastAPI) -> None:
    url = f"/http-cache/items/{uuid.uuid4().int % 10**9}"
    first, second = await client.get(url), await client.get(url)
    assert first.headers["x-cache"] == "MISS", first.headers
    assert second.headers["x-cache"] == "HIT", second.headers  # the store went through
    etag = second.headers["etag"]
    revalidated = await client.get(url, headers={"If-None-Match": etag})
    assert revalidated.status_code == 304


HTTP_CACHE = Probe(
    name="http_cache",
    modules=(http_cache,),
    failure="open",
    send=_cached_item,
    # The probe cycles over four URLs, so once warm a working cache answers HIT.
    healthy=_served_from_redis,
    # Fail-open: the origin answers as if there were no cache.
    degraded=lambda r: r.status_code == 200 and r.headers.get("x-cache") == "MISS",
    works=_http_cache_works,
    script="http_cache_lookup.lua",
    cycle=4,  # a healthy streak long enough to show all four URLs cached
    describe=_http_cache_answer,
)


# -- rate limiting (fail-open by default, fail-closed by setting) ---------------------


async def _user_quota(client: httpx.AsyncClient, state: dict[str, Any]) -> httpx.Response:
    # A fresh user per request: a working limiter answers "allowed, 4 of 5 left".
    return await client.get("/limits/user", headers={"X-User": uuid.uuid4().hex})


def _counted(response: httpx.Response) -> bool:
    """Allowed and counted once; or twice when Redis's reply came after the socket timeout.

    A reply later than the socket timeout (a loaded machine is enough) makes the client
    retry the script, which counts the request again: the documented at-least-once
    outcome (``test_lost_replies.py``). A second count without that wait is still bad.
    """
    if response.status_code != 200:
        return False
    body = response.json()
    remaining = body["policies"][0]["remaining"]
    retried = response.elapsed.total_seconds() >= FAULT_SETTINGS["redis_socket_timeout"]
    return body["degraded"] is False and (remaining == 4 or (remaining == 3 and retried))


async def _rate_limit_works(client: httpx.AsyncClient, app: FastAPI) -> None:
    headers = {"X-User": uuid.uuid4().hex}
    answers = [await client.get("/limits/user", headers=headers) for _ in range(6)]
    assert [r.status_code for r in answers] == [200] * 5 + [429], [r.text for r in answers]
    assert is_problem(answers[-1], 429) and int(answers[-1].headers["retry-after"]) >= 1


RATE_LIMIT = Probe(
    name="rate_limit",
    modules=(rate_limit,),
    failure="open",
    send=_user_quota,
    healthy=_counted,
    # Fail-open: allowed, flagged degraded (RateLimit-Policy only, no RateLimit counts).
    degraded=lambda r: r.status_code == 200 and r.json()["degraded"] is True,
    works=_rate_limit_works,
    script="ratelimit_gcra.lua",
)

RATE_LIMIT_CLOSED = Probe(
    name="rate_limit_closed",
    modules=(rate_limit,),
    failure="closed",
    send=_user_quota,
    healthy=_counted,
    degraded=is_unavailable,
    works=_rate_limit_works,
    settings={"rate_limit_failure_mode": "closed"},
)


# -- pub/sub (publish fails closed; subscribers reconnect and resubscribe) -----------


async def _publish(client: httpx.AsyncClient, state: dict[str, Any]) -> httpx.Response:
    return await client.post("/publish/fault-room", json={"n": 1})


async def next_message(subscription: Any, timeout: float = 5.0) -> Message[Any]:
    """The next ``Message`` of *subscription* (``Reconnected`` events are skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            event = await subscription.get(timeout)
            if isinstance(event, Message):
                return event


async def _pubsub_works(client: httpx.AsyncClient, app: FastAPI) -> None:
    broadcaster: Broadcaster = app.state.broadcaster
    channel = f"works-{uuid.uuid4().hex}"
    async with broadcaster.subscribe(channel) as subscription:
        published = await client.post(f"/publish/{channel}", json={"hello": 1})
        assert published.status_code == 200 and published.json()["receivers"] >= 1
        assert (await next_message(subscription)).data == {"hello": 1}


PUBSUB = Probe(
    name="pubsub",
    modules=(pubsub,),
    failure="closed",
    send=_publish,
    healthy=lambda r: r.status_code == 200 and r.json()["channel"] == "fault-room",
    degraded=is_unavailable,
    works=_pubsub_works,
    script="pubsub_publish.lua",
)


# -- streams (producer fails closed; the consumer survives and recreates its group) --


async def _produce(client: httpx.AsyncClient, state: dict[str, Any]) -> httpx.Response:
    return await client.post("/streams/events", json={"payload": {"n": 1}})


async def _streams_work(client: httpx.AsyncClient, app: FastAPI) -> None:
    async def acked() -> int:
        stats = await client.get("/streams/stats")
        assert stats.status_code == 200, stats.text
        return int(stats.json()["counters"]["acked"])

    before = await acked()
    produced = await client.post("/streams/events", json={"payload": {"n": 2}, "count": 3})
    assert produced.status_code == 201, produced.text
    async with asyncio.timeout(10):  # the in-app consumer handles them (its group exists)
        while await acked() < before + 3:
            await asyncio.sleep(0.05)


STREAMS = Probe(
    name="streams",
    modules=(streams,),
    failure="closed",
    send=_produce,
    healthy=lambda r: r.status_code == 201 and len(r.json()["ids"]) == 1,
    degraded=is_unavailable,
    works=_streams_work,
)


# -- cache (fail-open) ----------------------------------------------------------------


async def _cache_write(client: httpx.AsyncClient, state: dict[str, Any]) -> httpx.Response:
    state["n"] = n = state.get("n", 0) + 1
    return await client.put(f"/cache/items/probe-{n % 8}", json={"value": n, "ttl": 30})


async def _cache_works(client: httpx.AsyncClient, app: FastAPI) -> None:
    key = f"works-{uuid.uuid4().hex}"
    assert (await client.get(f"/cache/items/{key}")).json()["hit"] is False
    stored = await client.put(f"/cache/items/{key}", json={"value": {"a": [1]}, "ttl": 30})
    assert stored.json()["stored"] is True and 0 < stored.json()["ttl"] <= 30
    assert (await client.get(f"/cache/items/{key}")).json() == {
        "key": key,
        "hit": True,
        "value": {"a": [1]},
    }
    assert (await client.delete(f"/cache/items/{key}")).json()["deleted"] == 1


CACHE = Probe(
    name="cache",
    modules=(cache,),
    failure="open",
    send=_cache_write,
    healthy=lambda r: r.status_code == 200 and r.json()["stored"] is True,
    # Fail-open: nothing stored, said so (the route still answers).
    degraded=lambda r: r.status_code == 200 and r.json()["stored"] is False,
    works=_cache_works,
    script="cache_set.lua",
)


# -- locks (fail-closed: locks never fail open) ----------------------------------------


async def _run_job(client: httpx.AsyncClient, state: dict[str, Any]) -> httpx.Response:
    # A new job per request: a healthy lock is always free, so every answer is 200 or 503.
    return await client.post(f"/jobs/probe-{uuid.uuid4().hex}/run", params={"seconds": 0})


def _ran_under_the_lock(response: httpx.Response) -> bool:
    return response.status_code == 200 and isinstance(response.json().get("fence"), int)


def _ran_or_learned_the_lock_was_lost(response: httpx.Response) -> bool:
    """A request whose lock a restart wiped (its lease straddled it) is told so: 409 lock-lost."""
    if _ran_under_the_lock(response):
        return True
    return is_problem(response, 409) and response.json()["type"].endswith("/lock-lost")


async def _locks_work(client: httpx.AsyncClient, app: FastAPI) -> None:
    job = f"works-{uuid.uuid4().hex}"
    running = asyncio.create_task(client.post(f"/jobs/{job}/run", params={"seconds": 0.3}))
    async with asyncio.timeout(5):
        while not (await client.get(f"/jobs/{job}/lock")).json()["locked"]:
            await asyncio.sleep(0.01)
    busy = await client.post(f"/jobs/{job}/run", params={"seconds": 0})
    assert is_problem(busy, 409) and int(busy.headers["retry-after"]) >= 1, busy.text
    first = await running
    assert _ran_under_the_lock(first), first.text
    assert (await client.get(f"/jobs/{job}/lock")).json()["locked"] is False  # released
    again = await client.post(f"/jobs/{job}/run", params={"seconds": 0})
    assert _ran_under_the_lock(again) and again.json()["fence"] > first.json()["fence"]
    export = await client.post("/exports", params={"seconds": 0})  # the semaphore's scripts
    assert export.status_code == 200 and export.json()["running_at_start"] == 1, export.text


LOCKS = Probe(
    name="locks",
    modules=(locks,),
    failure="closed",
    send=_run_job,
    healthy=_ran_or_learned_the_lock_was_lost,
    degraded=is_unavailable,
    works=_locks_work,
    script="lock_acquire_fast.lua",  # the jobs route takes a non-fair lock
)


PROBES = (
    SESSIONS,
    IDEMPOTENCY,
    HTTP_CACHE,
    CACHE,
    RATE_LIMIT,
    RATE_LIMIT_CLOSED,
    PUBSUB,
    STREAMS,
    LOCKS,
)


def probe_ids(probe: Probe) -> str:
    return probe.name
