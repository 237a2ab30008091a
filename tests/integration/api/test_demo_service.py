"""`make run`'s server: uvicorn serves the demo with the embedded store or a real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from app.testing.servers import serve_app

pytestmark = pytest.mark.slow


@contextmanager
def uvicorn(redis_url: str | None, **extra_env: str) -> Iterator[str]:
    """The demo under uvicorn on *redis_url* (unset: the embedded store)."""
    env = extra_env | ({"REDIS_URL": redis_url} if redis_url else {})
    with serve_app(env=env) as base:
        yield base


def test_demo_serves_healthz_on_the_embedded_store() -> None:
    with uvicorn(None) as base:
        response = httpx.get(base + "/healthz", timeout=5)
        assert response.status_code == 200
        assert set(response.json()) == {"status", "latency_ms"}  # public: nothing internal
        index = httpx.get(base + "/", timeout=5).json()
        assert "health" in index["capabilities"]


def test_demo_uses_redis_url_when_set(redis_server: Any) -> None:
    with uvicorn(redis_server.url, HEALTH_DETAILS="true") as base:
        body = httpx.get(base + "/healthz", timeout=5).json()
        assert body["role"] == "master"
        assert body["url"] == redis_server.url
