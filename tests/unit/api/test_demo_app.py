"""The demo app as a whole: every capability mounted, schema generated, index complete."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from app.main import create_app

DESTRUCTIVE = [
    ("DELETE", "/cache", None),
    ("POST", "/cache/invalidate?pattern=*", None),
    ("POST", "/publish/orders", {"id": 1}),
]


def test_openapi_schema_builds_for_the_whole_demo() -> None:
    schema = create_app().openapi()
    tags = {
        tag
        for path in schema["paths"].values()
        for op in path.values()
        for tag in op.get("tags", [])
    }
    assert {"health", "idempotency", "rate-limit", "pubsub", "sessions", "http-cache"} <= tags


async def test_index_lists_the_capabilities(app_client: Any) -> None:
    body = (await app_client.get("/")).json()
    assert "health" in body["capabilities"]
    assert len(body["capabilities"]) >= 5


@pytest.mark.parametrize(("method", "url", "body"), DESTRUCTIVE)
async def test_destructive_demo_routes_are_off_outside_development(
    app_client: Any,
    settings_override: Callable[..., None],
    method: str,
    url: str,
    body: Any,
) -> None:
    await app_client.put("/cache/items/kept", json={"value": 1})
    settings_override(app_env="test")
    response = await app_client.request(method, url, json=body)
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"].endswith("/route-disabled")
    assert "DEMO_DESTRUCTIVE_ROUTES=true" in problem["detail"]
    assert (await app_client.get("/cache/items/kept")).json()["hit"] is True  # nothing removed


@pytest.mark.parametrize(("method", "url", "body"), DESTRUCTIVE)
async def test_destructive_demo_routes_served_when_enabled_explicitly(
    app_client: Any,
    settings_override: Callable[..., None],
    method: str,
    url: str,
    body: Any,
) -> None:
    settings_override(app_env="test", demo_destructive_routes="true")
    assert (await app_client.request(method, url, json=body)).status_code == 200


async def test_pattern_invalidation_route_refuses_too_many_wildcards(app_client: Any) -> None:
    response = await app_client.post("/cache/invalidate", params={"pattern": "*a" * 30})
    assert response.status_code == 400
    assert response.json()["type"].endswith("/pattern-too-complex")
    assert "at most 4" in response.json()["detail"]
