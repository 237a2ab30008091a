"""The demo app as a whole: every capability mounted, schema generated, index complete."""

from __future__ import annotations

from typing import Any

from app.main import create_app


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
