"""``@cached`` on per-user routes, attacked through ASGI on a real Redis.

Issue 16, attack 1: ``@cached(ttl=60)`` over a route with ``user = Depends(current_user)``
used to leave the dependency out of the key, so Bob got Alice's orders.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from redis.asyncio import Redis

from app.api.problems import install_problem_handlers
from app.services.cache import cached
from app.testing.plugin import AppClientFactory

ORDERS = {"alice": ["alice's ring"], "bob": ["bob's book"]}
ORIGIN: list[str] = []


async def current_user(request: Request) -> str:
    """The caller named by the ``X-User`` header (stands in for a real auth dependency)."""
    return request.headers.get("x-user", "anonymous")


class DatabaseSession:
    """A per-request resource with no canonical JSON form."""


async def database() -> DatabaseSession:
    return DatabaseSession()


def _app() -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/orders")
    @cached(ttl=60)
    async def my_orders(user: str = Depends(current_user)) -> dict[str, Any]:
        ORIGIN.append(f"orders:{user}")
        return {"user": user, "orders": ORDERS.get(user, [])}

    @app.get("/catalogue")
    @cached(ttl=60, exclude=["user"])  # explicitly the same answer for every caller
    async def catalogue(user: Annotated[str, Depends(current_user)]) -> dict[str, Any]:
        ORIGIN.append(f"catalogue:{user}")
        return {"items": ["ring", "book"], "computed_for": user}

    @app.get("/report")
    @cached(ttl=60)
    async def report(db: Annotated[DatabaseSession, Depends(database)]) -> dict[str, Any]:
        ORIGIN.append("report")
        return {"rows": 1}

    return app


async def test_bob_never_gets_alices_cached_orders(
    real_redis: Redis, make_app_client: AppClientFactory
) -> None:
    ORIGIN.clear()
    client = await make_app_client(_app(), real_redis)
    alice = await client.get("/orders", headers={"X-User": "alice"})
    assert alice.status_code == 200
    assert alice.json() == {"user": "alice", "orders": ["alice's ring"]}
    for _ in range(3):
        bob = await client.get("/orders", headers={"X-User": "bob"})
        assert bob.status_code == 200
        assert "alice's ring" not in bob.text
        assert bob.json() == {"user": "bob", "orders": ["bob's book"]}
        nobody = await client.get("/orders")
        assert nobody.json() == {"user": "anonymous", "orders": []}
    assert (await client.get("/orders", headers={"X-User": "alice"})).json() == alice.json()
    # each caller computed once and then hit its own entry (three Redis entries)
    assert sorted(ORIGIN) == ["orders:alice", "orders:anonymous", "orders:bob"]
    assert len([k async for k in real_redis.scan_iter(match="*my_orders*")]) == 3


async def test_exclude_shares_the_entry_on_purpose(
    real_redis: Redis, make_app_client: AppClientFactory
) -> None:
    ORIGIN.clear()
    client = await make_app_client(_app(), real_redis)
    first = await client.get("/catalogue", headers={"X-User": "alice"})
    second = await client.get("/catalogue", headers={"X-User": "bob"})
    assert first.json() == second.json() == {"items": ["ring", "book"], "computed_for": "alice"}
    assert ORIGIN == ["catalogue:alice"]


async def test_an_unkeyable_dependency_fails_loudly_and_caches_nothing(
    real_redis: Redis, make_app_client: AppClientFactory
) -> None:
    ORIGIN.clear()
    client = await make_app_client(_app(), real_redis)
    answer = await client.get("/report")
    assert answer.status_code == 500
    assert answer.headers["content-type"] == "application/problem+json"
    assert ORIGIN == []  # refused before the route ran
    assert [k async for k in real_redis.scan_iter(match="*report*")] == []
