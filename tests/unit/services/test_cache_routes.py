"""The cache demo routes on the demo app (fakeredis)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from app.api.routes.cache import ORIGIN_CALLS


async def test_items_crud_and_stored_null(app_client: Any) -> None:
    put = await app_client.put("/cache/items/a", json={"value": None, "ttl": 30, "tags": ["x"]})
    assert put.status_code == 200 and put.json()["stored"] is True
    assert 29 < put.json()["ttl"] <= 30
    assert (await app_client.get("/cache/items/a")).json() == {
        "key": "a",
        "hit": True,
        "value": None,
    }
    assert (await app_client.get("/cache/items/b")).json()["hit"] is False
    assert (await app_client.delete("/cache/items/a")).json()["deleted"] == 1
    assert (await app_client.get("/cache/items/a")).json()["hit"] is False
    bad = await app_client.put("/cache/items/a", json={"value": 1, "ttl": 0})
    assert bad.status_code == 422


async def test_a_stale_ttl_below_the_ttl_answers_422_not_500(app_client: Any) -> None:
    # Found by the fuzzers once the cache raised ConfigurationError (a ToolkitError).
    bad = await app_client.put("/cache/items/a", json={"value": None, "stale_ttl": 1.0})
    assert bad.status_code == 422
    assert "stale_ttl" in bad.json()["detail"]


async def test_cached_users_are_invalidated_on_write(app_client: Any) -> None:
    before = ORIGIN_CALLS["users"]
    first = await app_client.get("/cache/users/41")
    second = await app_client.get("/cache/users/41")
    assert first.json() == second.json() and first.json()["name"] == "user 41"
    assert int(second.headers["x-origin-calls"]) == before + 1
    renamed = await app_client.put("/cache/users/41", json={"name": "ada"})
    assert renamed.json() == {"id": 41, "name": "ada", "invalidated": True}
    assert (await app_client.get("/cache/users/41")).json()["name"] == "ada"
    assert ORIGIN_CALLS["users"] == before + 2


async def test_reports_run_the_origin_once_under_a_stampede(app_client: Any) -> None:
    before = ORIGIN_CALLS["reports"]
    responses = await asyncio.gather(
        *[app_client.get("/cache/reports/daily", params={"delay": 0.1}) for _ in range(25)]
    )
    assert {r.status_code for r in responses} == {200}
    assert len({r.json()["report"]["computed_at"] for r in responses}) == 1
    assert ORIGIN_CALLS["reports"] == before + 1


async def test_invalidation_routes_and_stats(app_client: Any) -> None:
    for key, tags in (("p:1", ["red"]), ("p:2", ["red"]), ("q:1", [])):
        await app_client.put(f"/cache/items/{key}", json={"value": key, "tags": tags})
    assert (await app_client.post("/cache/tags/red/invalidate")).json()["removed"] == 2
    await app_client.put("/cache/items/p:3", json={"value": 3})
    removed = await app_client.post("/cache/invalidate", params={"pattern": "p:*"})
    assert removed.json() == {"pattern": "p:*", "removed": 1}
    assert (await app_client.get("/cache/items/q:1")).json()["hit"] is True
    assert (await app_client.delete("/cache")).json()["removed"] >= 1
    stats = (await app_client.get("/stats")).json()
    assert stats["namespace"] == "cache" and stats["breaker"] == "closed"
    assert stats["local"]["active"] is True and stats["sets"] >= 4


@pytest.mark.parametrize(
    "value",
    [2**70, "\ud800", {"deep": [1, -(2**65)]}],
    ids=["int-past-64-bits", "lone-surrogate", "nested-huge-int"],
)
async def test_a_value_that_cannot_be_encoded_answers_422(app_client: Any, value: Any) -> None:
    # json.dumps writes the surrogate as the escape "\ud800", which JSON parsers accept.
    body = json.dumps({"value": value, "ttl": 30})
    response = await app_client.put(
        "/cache/items/bad", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"].endswith("/unencodable-value")
    assert "decoded" not in problem["title"]
    assert (await app_client.get("/cache/items/bad")).json()["hit"] is False
