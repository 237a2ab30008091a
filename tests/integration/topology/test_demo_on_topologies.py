"""``REDIS_URL=redis+cluster://...`` and ``redis+sentinel://...`` run the demo unchanged.

Each test starts ``uvicorn app.main:app`` as a subprocess with the topology's URL
(nothing else configured) and drives every capability's demo routes over real
HTTP: health, sessions, rate limits, idempotency keys, HTTP caching, pub/sub
(server-sent events) and streams.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from tests.integration.api.test_demo_service import uvicorn

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.mark.parametrize("topology", ["cluster", "sentinel"])
def test_the_demo_serves_every_capability(topology: str, request: pytest.FixtureRequest) -> None:
    setup: Any = request.getfixturevalue(f"redis_{topology}")
    setup.flushall()
    try:
        with (
            uvicorn(setup.url, HEALTH_DETAILS="true") as base,
            httpx.Client(base_url=base, timeout=10) as http,
        ):
            health = http.get("/healthz").json()
            assert (health["role"], health["url"]) == (
                "cluster" if topology == "cluster" else "master",
                setup.url,
            )

            # sessions: a cookie, a counter, a login that regenerates the id
            assert [http.post("/session/counter").json()["counter"] for _ in range(2)] == [1, 2]
            anonymous = http.cookies["session"]
            assert http.post("/session/login", json={"user": "alice"}).status_code == 200
            assert http.cookies["session"] != anonymous
            profile = http.get("/session/profile").json()
            assert profile == {"user": "alice", "counter": 2, "login_count": 1}

            # rate limiting: 5 per 10 seconds per client IP, then 429 with the draft headers
            limited = [http.get("/limits/ip") for _ in range(6)]
            assert [r.status_code for r in limited] == [200] * 5 + [429]
            assert "ratelimit" in limited[-1].headers and limited[-1].headers["retry-after"]

            # idempotency keys: the retry is a byte-identical replay
            key = {"Idempotency-Key": f'"{topology}-payment-1"'}
            first = http.post("/payments", json={"amount": 100}, headers=key)
            again = http.post("/payments", json={"amount": 100}, headers=key)
            assert (first.status_code, again.status_code) == (201, 201)
            assert again.headers["idempotent-replayed"] == "true"
            assert again.content == first.content
            assert http.get("/payments/executions").json() == {"executions": 1}

            # HTTP caching: miss, hit, 304 on the ETag
            cached = [http.get("/http-cache/items/7") for _ in range(2)]
            assert [r.headers["x-cache"] for r in cached] == ["MISS", "HIT"]
            etag = cached[0].headers["etag"]
            not_modified = http.get("/http-cache/items/7", headers={"if-none-match": etag})
            assert not_modified.status_code == 304

            # pub/sub: a server-sent-events subscriber receives a published message
            with http.stream("GET", "/sse/room-1", params={"heartbeat": 1}) as events:
                assert events.status_code == 200  # sent once the subscription is confirmed
                published = http.post("/publish/room-1", json={"hello": topology})
                assert published.json()["receivers"] == 1
                data = next(line for line in events.iter_lines() if line.startswith("data:"))
                message = json.loads(data.removeprefix("data:"))
                assert (message["channel"], message["data"]) == ("room-1", {"hello": topology})

            # streams: an event appended over HTTP is handled by the demo consumer
            assert http.post("/streams/events", json={"payload": {"n": 1}}).status_code == 201
            deadline = time.monotonic() + 15
            while (stats := http.get("/streams/stats").json())["counters"]["acked"] < 1:
                assert time.monotonic() < deadline, stats
                time.sleep(0.05)
            assert (stats["length"], stats["pending"]) == (1, 0)
    finally:
        setup.flushall()
