"""The demo under uvicorn (as ``TELEMETRY_ENABLED=1 make run`` serves it) after traffic."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.testing.plugin import RedisServerInfo
from app.testing.servers import serve_app
from tests.integration.observability.test_metrics_endpoint import FAMILIES

pytestmark = pytest.mark.slow


@contextmanager
def demo(redis_url: str) -> Iterator[str]:
    env = {
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": f"m{uuid.uuid4().hex[:10]}",  # never touches other tests' keys
        "TELEMETRY_ENABLED": "1",
        "STREAMS_DEMO_WORKER": "eager",
    }
    with serve_app(env=env) as base:
        yield base


def scrape_until(base: str, needle: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(base + "/metrics", timeout=5).text
        if needle in text:
            return text
        assert time.monotonic() < deadline, f"{needle!r} never appeared in /metrics"
        time.sleep(0.05)


def test_uvicorn_demo_serves_every_metric_family_after_traffic(
    redis_server: RedisServerInfo,
) -> None:
    with demo(redis_server.url) as base, httpx.Client(base_url=base, timeout=5) as client:
        assert client.put("/cache/items/k", json={"value": 1}).status_code < 300
        assert client.get("/cache/items/k").status_code == 200
        for _ in range(6):
            client.get("/limits/user", headers={"X-User": "someone"})
        assert client.post("/streams/events", json={"payload": {"n": 1}}).status_code == 201
        text = scrape_until(base, 'toolkit_operation="stream.handle"')
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    for name, kind in FAMILIES.items():
        assert families.get(name) == kind, (name, families.get(name))
