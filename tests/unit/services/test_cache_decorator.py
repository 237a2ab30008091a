"""``@cached``: signatures, stable keys, skipped arguments, typed results, helpers (fakeredis)."""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import pytest
from fastapi import Depends, FastAPI, Request, Security
from pydantic import BaseModel

from app.core import redis as core_redis
from app.services.cache import (
    MISSING,
    CacheService,
    LocalCache,
    cached,
    get_cache,
    set_default_cache,
)
from app.testing.plugin import AppClientFactory
from app.testing.slots import slot_checking_fake_redis

MODULE = __name__
CALLS: dict[str, int] = {}


def bump(name: str) -> int:
    CALLS[name] = CALLS.get(name, 0) + 1
    return CALLS[name]


class Item(BaseModel):
    id: int
    name: str


@dataclass
class Query:
    text: str
    page: int = 1


@cached(ttl=60)
async def load_item(item_id: int) -> Item:
    bump("load_item")
    return Item(id=item_id, name=f"item {item_id}")


@cached(ttl=60)
async def search(query: str, tags: frozenset[str] = frozenset(), page: int = 1) -> list[Item]:
    bump("search")
    return [Item(id=page, name=query)]


@cached(ttl=60, key="user:{user_id}", tags=["users", "user:{user_id}"])
async def load_user(user_id: int | str, verbose: bool = False) -> dict[str, Any]:
    return {"user": user_id, "n": bump("load_user")}


@cached
async def nothing() -> None:
    bump("nothing")


class Repo:
    def __init__(self, name: str) -> None:
        self.name = name

    @cached(ttl=60)
    async def get(self, item_id: int) -> Item:
        bump("repo.get")
        return Item(id=item_id, name=self.name)


if TYPE_CHECKING:  # the decorated functions keep their signatures for type checkers
    _typed: Coroutine[Any, Any, Item] = load_item(1)
    _method: Coroutine[Any, Any, Item] = Repo("r").get(1)
    _wrong_type = load_item("one")  # type: ignore[arg-type]
    _extra_arg = load_item(1, 2)  # type: ignore[call-arg]
    _wrong_method_arg = Repo("r").get("one")  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _fresh(fake_redis: Any) -> None:
    CALLS.clear()
    core_redis.redis_client = fake_redis  # @cached resolves its service through get_redis()


async def test_signature_and_metadata_are_kept() -> None:
    assert load_item.__name__ == "load_item" and load_item.__doc__ is None
    assert str(inspect.signature(load_item)) == "(item_id: 'int') -> 'Item'"
    assert str(inspect.signature(Repo("r").get)) == "(item_id: 'int') -> 'Item'"
    assert repr(load_item) == f"<cached {MODULE}.load_item>"
    with pytest.raises(TypeError, match="async function"):
        cached(ttl=1)(lambda: 1)  # type: ignore[arg-type, return-value]


async def test_results_are_cached_and_decoded_to_the_annotated_type() -> None:
    first = await load_item(1)
    second = await load_item(1)
    assert first == second == Item(id=1, name="item 1")
    assert isinstance(second, Item)
    assert CALLS["load_item"] == 1
    results = await search("q", frozenset({"a"}))
    assert results == [Item(id=1, name="q")] and isinstance(results[0], Item)
    assert await search("q", frozenset({"a"})) == results and CALLS["search"] == 1
    await nothing()
    await nothing()
    assert CALLS["nothing"] == 1  # None is cached like any value
    assert await get_cache().get(nothing.key(), MISSING) is None


async def test_keys_are_stable_across_processes() -> None:
    assert load_item.key(5) == f"{MODULE}.load_item:1ae3592f8248c3f879b56afe3f2ce6aa"
    expected = f"{MODULE}.search:006cd42d56d68ef06f5845747b2e358c"
    assert search.key("x", frozenset({"b", "a"}), 2) == expected
    script = (
        "from tests.unit.services.test_cache_decorator import load_item, search\n"
        "print(load_item.key(5)); print(search.key('x', frozenset({'b', 'a'}), 2))"
    )
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.getcwd(),
            env=env,
        ).stdout.split()
        assert out == [load_item.key(5), expected]


async def test_equivalent_calls_share_a_key() -> None:
    assert load_item.key(1) == load_item.key(item_id=1)
    assert search.key("q") == search.key("q", frozenset(), 1) == search.key(query="q", page=1)
    assert search.key("q", page=2) != search.key("q")
    assert load_item.key(1) != load_item.key(2)
    assert Repo("a").get.key(1) == Repo("b").get.key(1)  # self is not part of the key


async def test_wrong_calls_fail_like_the_function_even_on_a_hit() -> None:
    await load_item(1)
    with pytest.raises(TypeError):
        await load_item(1, 2)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        await load_item(item=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        await load_item(1, item_id=1)  # type: ignore[misc]
    with pytest.raises(TypeError):
        await load_item()  # type: ignore[call-arg]


async def test_unserializable_arguments_are_refused_with_advice() -> None:
    @cached(ttl=60)
    async def f(thing: object) -> int:
        return 1

    with pytest.raises(TypeError, match=r"pass key=\.\.\.") as info:
        await f(object())
    assert "object" in str(info.value)
    with pytest.raises(TypeError, match="stable cache key"):
        await f({1: "int keys would collide with str keys"})

    @cached(ttl=60, exclude=["thing"])
    async def g(thing: object, n: int) -> int:
        return n

    assert await g(object(), 3) == 3
    with pytest.raises(TypeError, match="unknown parameters"):
        cached(exclude=["nope"])(g.__wrapped__)


async def test_model_and_dataclass_arguments_are_keyed_by_value() -> None:
    @cached(ttl=60)
    async def by_model(item: Item) -> str:
        return f"{item.id}:{bump('by_model')}"

    @cached(ttl=60)
    async def by_query(query: Query) -> int:
        return bump("by_query")

    assert by_model.key(Item(id=1, name="a")).endswith("c1640b1b7163fbd52b4966b6e634d0ec")
    assert await by_model(Item(id=1, name="a")) == await by_model(Item(id=1, name="a"))
    assert await by_query(Query("x")) == await by_query(Query("x", page=1)) == 1
    assert await by_query(Query("x", page=2)) == 2


async def test_methods_skip_self() -> None:
    a, b = Repo("first"), Repo("second")
    assert await a.get(1) == Item(id=1, name="first")
    assert await b.get(1) == Item(id=1, name="first")  # shared: self is not in the key
    assert CALLS["repo.get"] == 1
    assert await b.get.invalidate(1)
    assert await b.get(1) == Item(id=1, name="second")
    assert await a.get.bypass(1) == Item(id=1, name="first")
    assert await a.get.refresh(1) == Item(id=1, name="first")
    assert await b.get(1) == Item(id=1, name="first")
    assert isinstance(Repo.get, type(load_item))


async def test_template_keys_and_tags() -> None:
    cache = get_cache()
    first = await load_user(7)
    assert first == {"user": 7, "n": 1}
    assert await cache.get("user:7") == first  # the template key is the plain cache key
    assert await load_user(7, verbose=True) == first  # verbose is not in the template
    assert load_user.key("a:b") == "user:a%3Ab"  # a value cannot add key parts
    assert await cache.invalidate_tags("user:7") == 1
    assert await load_user(7) == {"user": 7, "n": 2}
    assert await cache.invalidate_tags("users") == 1
    with pytest.raises(TypeError, match="custom key"):
        await load_user.invalidate_all()


async def test_helpers_bypass_refresh_invalidate() -> None:
    assert await load_item(1) == Item(id=1, name="item 1")
    assert await load_item.bypass(1) == Item(id=1, name="item 1")
    assert CALLS["load_item"] == 2
    await load_item.refresh(1)
    assert CALLS["load_item"] == 3
    await load_item(1)
    assert CALLS["load_item"] == 3
    assert await load_item.invalidate(1) is True
    assert await load_item.invalidate(1) is False
    await load_item(1)
    await load_item(2)
    assert CALLS["load_item"] == 5
    assert await load_item.invalidate_all() == 2
    assert await search("q") == [Item(id=1, name="q")]  # other functions untouched


async def test_the_service_follows_get_redis_and_set_default_cache(fake_redis: Any) -> None:
    import fakeredis

    await load_item(1)
    other = slot_checking_fake_redis(server=fakeredis.FakeServer())
    core_redis.redis_client = other
    await load_item(1)
    assert CALLS["load_item"] == 2  # another client, another cache
    registered = CacheService(other, local=LocalCache(ttl=60))
    set_default_cache(registered)
    assert load_item.cache is registered and get_cache(redis=other) is registered
    await load_item(1)
    assert registered.stats()["hits"] == 1
    await registered.aclose()
    assert get_cache(redis=other) is not registered  # closing unregisters it
    assert load_item.cache is not registered
    await other.aclose()


async def test_explicit_cache_and_namespace(fake_redis: Any) -> None:
    mine = CacheService(fake_redis, namespace="mine")

    @cached(ttl=60, cache=mine)
    async def f(x: int) -> int:
        return bump("f")

    @cached(ttl=60, cache=lambda: mine)
    async def g(x: int) -> int:
        return bump("g")

    @cached(ttl=60, namespace="elsewhere", version=2)
    async def h(x: int) -> int:
        return bump("h")

    assert await f(1) == await f(1) == 1
    assert await g(1) == await g(1) == 1
    assert await h(1) == await h(1) == 1
    assert mine.stats()["hits"] == 2
    assert h.cache.namespace == "elsewhere" and h.key(1).startswith(f"{MODULE}.")
    assert ":v2:" in h.key(1)


async def test_stampede_and_stale_options_pass_through() -> None:
    @cached(ttl=0.1, stale_ttl=30)
    async def slow(x: int) -> int:
        await asyncio.sleep(0.05)
        return bump("slow")

    assert await asyncio.gather(*[slow(1) for _ in range(20)]) == [1] * 20
    await asyncio.sleep(0.2)
    assert await slow(1) == 1  # stale, refreshed in the background
    await slow.cache.wait_idle()
    assert await slow(1) == 2


async def current_user() -> str:
    return "alice"


async def test_fastapi_endpoints_skip_request_and_key_dependencies(
    make_app_client: AppClientFactory, fake_redis: Any
) -> None:
    app = FastAPI()

    @app.get("/items/{item_id}")
    @cached(ttl=60)
    async def read_item(
        item_id: int,
        request: Request,
        user: Annotated[str, Depends(current_user)],
        q: str | None = None,
    ) -> Item:
        bump("endpoint")
        return Item(id=item_id, name=f"{user}:{q}:{request.url.path}")

    @app.get("/legacy/{item_id}")
    @cached(ttl=60)
    async def legacy(item_id: int, user: str = Depends(current_user)) -> dict[str, Any]:
        return {"id": item_id, "n": bump("legacy")}

    client = await make_app_client(app, fake_redis)
    first = await client.get("/items/1", params={"q": "x"})
    second = await client.get("/items/1", params={"q": "x"})
    assert first.status_code == second.status_code == 200, first.text
    assert first.json() == second.json() == {"id": 1, "name": "alice:x:/items/1"}
    assert CALLS["endpoint"] == 1
    assert (await client.get("/items/1", params={"q": "y"})).json()["name"] == "alice:y:/items/1"
    assert (await client.get("/legacy/3")).json() == (await client.get("/legacy/3")).json()
    assert CALLS["legacy"] == 1
    # a dependency's value is part of the key (it used to be left out: one user's result for all)
    assert read_item.key(1, None, "bob", None) != read_item.key(1, None, "alice", None)  # type: ignore[arg-type]


async def header_user(request: Request) -> str:
    return request.headers.get("x-user", "anonymous")


class Connection:
    """A per-request resource with no canonical JSON form (a database session, say)."""


async def open_connection() -> Connection:
    return Connection()


async def test_dependencies_are_keyed_per_value_unless_excluded(
    make_app_client: AppClientFactory, fake_redis: Any
) -> None:

    app = FastAPI()

    @app.get("/orders")
    @cached(ttl=60)
    async def orders(user: str = Depends(header_user)) -> dict[str, Any]:
        return {"owner": user, "n": bump(f"orders:{user}")}

    @app.get("/secure")
    @cached(ttl=60)
    async def secure(user: Annotated[str, Security(header_user)]) -> dict[str, Any]:
        return {"owner": user}

    @app.get("/shared")
    @cached(ttl=60, exclude=["user"])
    async def shared(user: str = Depends(header_user)) -> dict[str, Any]:
        return {"first": user}

    client = await make_app_client(app, fake_redis)
    for _ in range(2):
        assert (await client.get("/orders", headers={"x-user": "alice"})).json()["owner"] == "alice"
        assert (await client.get("/orders", headers={"x-user": "bob"})).json()["owner"] == "bob"
        assert (await client.get("/secure", headers={"x-user": "bob"})).json() == {"owner": "bob"}
        assert (await client.get("/secure", headers={"x-user": "eve"})).json() == {"owner": "eve"}
    assert CALLS["orders:alice"] == CALLS["orders:bob"] == 1  # one entry per user, both hit
    assert (await client.get("/shared", headers={"x-user": "alice"})).json() == {"first": "alice"}
    assert (await client.get("/shared", headers={"x-user": "bob"})).json() == {"first": "alice"}


async def test_an_unkeyable_dependency_fails_loudly_before_the_function_runs(
    fake_redis: Any,
) -> None:
    from app.core.errors import ConfigurationError

    core_redis.redis_client = fake_redis

    @cached(ttl=60)
    async def report(day: int, db: Annotated[Connection, Depends(open_connection)]) -> int:
        return bump("report")

    with pytest.raises(ConfigurationError, match=r"'db'.*exclude=\['db'\]"):
        await report(1, Connection())
    with pytest.raises(ConfigurationError, match="'db'"):
        report.key(1, Connection())
    assert "report" not in CALLS  # refused before the function ran, nothing cached

    @cached(ttl=60, exclude=["db"])
    async def report_shared(day: int, db: Annotated[Connection, Depends(open_connection)]) -> int:
        return bump("report_shared")

    assert await report_shared(1, Connection()) == await report_shared(1, Connection()) == 1
    assert report_shared.key(1, Connection()) == report_shared.key(1, Connection())

    @cached(ttl=60, key="report:{day}")
    async def report_keyed(day: int, db: Connection = Depends(open_connection)) -> int:
        return bump("report_keyed")

    assert await report_keyed(2, Connection()) == await report_keyed(2, Connection()) == 1
