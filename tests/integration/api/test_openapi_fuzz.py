"""API fuzz of the demo service from its OpenAPI schema, on a real Redis: no 5xx, ever.

Each operation of ``create_app().openapi()`` gets generated requests: path,
query and header parameters and JSON bodies drawn from their schemas, mixed
with values that break them (wrong types, arbitrary text, non-JSON bodies).
Whatever the request, the answer must not be a server error. (This is the
hypothesis-driven equivalent of a schemathesis run, without the dependency;
hostile toolkit headers on every route are ``tests/unit/fuzz/test_http_never_5xx.py``.)
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from redis.asyncio import Redis

from app.core.redis import unlink_matching
from app.main import create_app
from app.testing.plugin import RedisServerInfo
from tests.unit.fuzz._asgi import RunningApp, running_app
from tests.unit.fuzz._openapi import FuzzRequest, Operation, operations, requests_for

pytestmark = pytest.mark.integration

SCHEMA = create_app().openapi()
OPERATIONS = operations(SCHEMA)


def test_the_schema_lists_every_demo_capability() -> None:
    tags = {tag for item in SCHEMA["paths"].values() for op in item.values() for tag in op["tags"]}
    assert {"sessions", "idempotency", "http-cache", "rate-limit", "pubsub", "streams"} <= tags
    assert len(OPERATIONS) >= 30


@pytest.fixture(scope="module")
def demo(
    redis_server: RedisServerInfo, monkeypatch_module: pytest.MonkeyPatch
) -> Iterator[RunningApp]:
    """The demo app on the real server, under a key prefix of its own (removed afterwards)."""
    from app.core.config import get_settings

    prefix = f"fuzz{uuid.uuid4().hex[:8]}"
    monkeypatch_module.setenv("REDIS_KEY_PREFIX", prefix)
    get_settings.cache_clear()
    with running_app(create_app, lambda: Redis.from_url(redis_server.url)) as running:
        yield running

        async def cleanup() -> None:
            client = Redis.from_url(redis_server.url)
            try:
                await unlink_matching(client, f"{prefix}:*")
            finally:
                await client.aclose()

        running.run(cleanup())
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _fuzz(demo: RunningApp, op: Operation) -> Callable[[], None]:
    @settings(
        max_examples=50,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(request=requests_for(op, SCHEMA))
    def run(request: FuzzRequest) -> None:
        response = demo.request(
            request.method, request.url, headers=request.headers, content=request.content
        )
        assert response.status_code < 500, (
            f"{request!r} -> {response.status_code} {response.text[:300]}"
        )

    return run


@pytest.mark.parametrize("op", OPERATIONS, ids=str)
def test_no_generated_request_gets_a_server_error(demo: RunningApp, op: Operation) -> None:
    _fuzz(demo, op)()
