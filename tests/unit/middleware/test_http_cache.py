"""HttpCacheMiddleware through real ASGI apps on fakeredis: what a client of the cached app sees."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import fakeredis
import httpx
import pytest
from fastapi import APIRouter, FastAPI, Header, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.types import Message, Receive, Scope, Send

from app.api.deps import SessionDep
from app.core import redis as core_redis
from app.core.errors import ConfigurationError
from app.middleware.http_cache import (
    HttpCacheMiddleware,
    HttpCachePolicy,
    HttpCacheRoute,
    cache_response,
)
from app.middleware.sessions import SessionMiddleware
from app.services.http_cache import HttpCacheStats, compute_etag, parse_http_date
from app.testing.slots import slot_checking_fake_redis

MakeClient = Callable[..., Awaitable[httpx.AsyncClient]]


def make_app(policy: HttpCachePolicy | None = None, **options: Any) -> FastAPI:
    """A small app whose routes each show one HTTP caching rule; calls[name] counts origin runs."""
    app = FastAPI()
    calls: Counter[str] = Counter()
    state: dict[str, Any] = {"version": 0, "fail": None}
    app.state.calls = calls
    app.state.demo = state

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, Any]:
        calls["item"] += 1
        return {"id": item_id, "version": state["version"]}

    @app.get("/items/{item_id}/view")
    async def view(item_id: int) -> dict[str, Any]:
        calls["view"] += 1
        return {"id": item_id, "version": state["version"], "view": True}

    @app.put("/items/{item_id}")
    async def put_item(item_id: int, response: Response) -> dict[str, Any]:
        state["version"] += 1
        response.headers["Content-Location"] = f"/items/{item_id}/view"
        return {"id": item_id}

    @app.put("/forbidden")
    async def forbidden() -> JSONResponse:
        return JSONResponse({"error": "no"}, status_code=403)

    @app.get("/lang")
    async def lang(
        response: Response, accept_language: str = Header(default="en")
    ) -> dict[str, str]:
        calls["lang"] += 1
        response.headers["Vary"] = "Accept-Language"
        return {"lang": accept_language}

    @app.get("/me")
    async def me(request: Request) -> dict[str, str]:
        calls["me"] += 1
        who = request.headers.get("authorization") or request.headers.get("cookie") or "anonymous"
        return {"user": who}

    @app.get("/cc")
    async def cc(request: Request) -> Response:
        """Answers with the Cache-Control (and status) the test asks for."""
        calls["cc"] += 1
        headers = (
            {"Cache-Control": request.query_params["cc"]} if "cc" in request.query_params else {}
        )
        status = int(request.query_params.get("status", "200"))
        return PlainTextResponse(f"v{state['version']}", status_code=status, headers=headers)

    @app.get("/cookie")
    async def cookie(response: Response) -> dict[str, int]:
        calls["cookie"] += 1
        response.set_cookie("session", "secret")
        return {"n": calls["cookie"]}

    @app.get("/vary-star")
    async def vary_star(response: Response) -> dict[str, int]:
        calls["vary-star"] += 1
        response.headers["Vary"] = "*"
        return {"n": calls["vary-star"]}

    @app.get("/flaky")
    async def flaky() -> Response:
        calls["flaky"] += 1
        if state["fail"] == "raise":
            raise RuntimeError("origin broke")
        if state["fail"] == "status":
            return PlainTextResponse("down", status_code=503)
        headers = {"Cache-Control": "max-age=10, stale-if-error=60"}
        return PlainTextResponse(f"v{state['version']}", headers=headers)

    @app.get("/clock")
    async def clock() -> Response:
        calls["clock"] += 1
        headers = {"Cache-Control": "max-age=10, stale-while-revalidate=60"}
        return PlainTextResponse(f"v{calls['clock']}", headers=headers)

    @app.get("/stream")
    async def stream(size: int, chunk: int = 1000) -> StreamingResponse:
        calls["stream"] += 1

        async def body() -> AsyncIterator[bytes]:
            for start in range(0, size, chunk):
                yield b"x" * min(chunk, size - start)

        return StreamingResponse(body(), media_type="text/plain")

    @app.get("/events")
    async def events() -> StreamingResponse:
        calls["events"] += 1

        async def body() -> AsyncIterator[bytes]:
            yield b"data: 1\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    app.add_middleware(HttpCacheMiddleware, policy=policy, **options)
    return app


def cache_layer(app: Any) -> HttpCacheMiddleware:
    layer = app.middleware_stack
    while layer is not None and not isinstance(layer, HttpCacheMiddleware):
        layer = getattr(layer, "app", None)
    assert isinstance(layer, HttpCacheMiddleware)
    return layer


async def age_entries(redis: Any, seconds: float) -> None:
    """Make every stored response *seconds* older (its stored-at time moves back)."""
    async for key in redis.scan_iter(match="*:httpcache:*:e:*"):
        await redis.hincrby(key, "s", -int(seconds * 1000))


async def client_for(
    make_app_client: MakeClient, redis: Any, policy: HttpCachePolicy | None = None, **options: Any
) -> tuple[httpx.AsyncClient, FastAPI]:
    app = make_app(policy, **options)
    return await make_app_client(app, redis), app


# -- hits, ETags, 304 ---------------------------------------------------------


@pytest.mark.parametrize("decode", [False, True], ids=["bytes", "decode_responses"])
async def test_miss_then_hit_with_strong_etag_age_and_x_cache(
    make_app_client: MakeClient, decode: bool
) -> None:
    redis = slot_checking_fake_redis(server=fakeredis.FakeServer(), decode_responses=decode)
    client, app = await client_for(make_app_client, redis)
    first = await client.get("/items/1")
    second = await client.get("/items/1")
    await redis.aclose()
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json() == {"id": 1, "version": 0}
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert app.state.calls["item"] == 1
    etag = first.headers["etag"]
    assert etag == second.headers["etag"] == compute_etag(first.content, b"application/json")
    assert etag.startswith('"') and etag.endswith('"')
    assert second.headers["age"] == "0" and "age" not in first.headers
    assert second.headers["cache-control"] == first.headers["cache-control"] == "max-age=60"
    assert second.headers["content-type"] == "application/json"
    assert second.headers["content-length"] == str(len(second.content))
    assert second.headers["last-modified"] == first.headers["last-modified"]


@pytest.mark.parametrize(
    "if_none_match",
    ["{etag}", "W/{etag}", '"nope", {etag}', ' "a" , W/{etag} ,"b"', "*"],
    ids=["exact", "weak", "list", "spaced-list", "star"],
)
async def test_if_none_match_answers_304_with_validators(
    make_app_client: MakeClient, fake_redis: Any, if_none_match: str
) -> None:
    client, _ = await client_for(make_app_client, fake_redis)
    first = await client.get("/lang", headers={"accept-language": "fr"})
    etag = first.headers["etag"]
    response = await client.get(
        "/lang",
        headers={"accept-language": "fr", "if-none-match": if_none_match.format(etag=etag)},
    )
    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["etag"] == etag
    assert response.headers["cache-control"] == "max-age=60"
    assert response.headers["vary"] == "Accept-Language"
    assert response.headers["age"] == "0"
    assert response.headers["x-cache"] == "HIT"
    assert "content-type" not in response.headers and "content-length" not in response.headers


@pytest.mark.parametrize("if_none_match", ['"other"', 'W/"other", "x"', "garbage", '"', ", ,"])
async def test_non_matching_if_none_match_gets_the_body(
    make_app_client: MakeClient, fake_redis: Any, if_none_match: str
) -> None:
    client, _ = await client_for(make_app_client, fake_redis)
    await client.get("/items/1")
    response = await client.get("/items/1", headers={"if-none-match": if_none_match})
    assert response.status_code == 200 and response.json() == {"id": 1, "version": 0}


async def test_304_on_a_miss_when_the_client_already_holds_the_body(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    client, app = await client_for(make_app_client, fake_redis)
    etag = compute_etag(b'{"id":7,"version":0}', b"application/json")
    response = await client.get("/items/7", headers={"if-none-match": etag})
    assert response.status_code == 304 and response.headers["x-cache"] == "MISS"
    assert response.headers["etag"] == etag
    follow = await client.get("/items/7")
    assert follow.headers["x-cache"] == "HIT" and follow.json() == {"id": 7, "version": 0}
    assert app.state.calls["item"] == 1


async def test_if_modified_since_with_the_synthesized_last_modified(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    client, _ = await client_for(make_app_client, fake_redis)
    first = await client.get("/items/1")
    last_modified = first.headers["last-modified"]
    seconds = parse_http_date(last_modified)
    assert seconds is not None
    same = await client.get("/items/1", headers={"if-modified-since": last_modified})
    assert same.status_code == 304
    older = await client.get(
        "/items/1", headers={"if-modified-since": "Sun, 06 Nov 1994 08:49:37 GMT"}
    )
    assert older.status_code == 200
    garbage = await client.get("/items/1", headers={"if-modified-since": "yesterday"})
    assert garbage.status_code == 200
    # If-None-Match decides when both are present (RFC 9110 §13.2.2)
    both = await client.get(
        "/items/1", headers={"if-modified-since": last_modified, "if-none-match": '"other"'}
    )
    assert both.status_code == 200


async def test_query_parameter_order_shares_one_entry_but_values_do_not(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    client, app = await client_for(make_app_client, fake_redis)
    assert (await client.get("/cc?a=1&b=2")).headers["x-cache"] == "MISS"
    assert (await client.get("/cc?b=2&a=1")).headers["x-cache"] == "HIT"
    assert (await client.get("/cc?b=3&a=1")).headers["x-cache"] == "MISS"
    assert app.state.calls["cc"] == 2


# -- Vary and private entries -------------------------------------------------


async def test_vary_keeps_one_entry_per_header_value(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    client, app = await client_for(make_app_client, fake_redis)
    seen = []
    for language in ["fr", "de", "fr", "de", "es"]:
        response = await client.get("/lang", headers={"accept-language": language})
        assert response.json() == {"lang": language}
        seen.append(response.headers["x-cache"])
    assert seen == ["MISS", "MISS", "HIT", "HIT", "MISS"]
    assert app.state.calls["lang"] == 3
    fr = await client.get("/lang", headers={"accept-language": "fr"})
    de_with_fr_tag = await client.get(
        "/lang", headers={"accept-language": "de", "if-none-match": fr.headers["etag"]}
    )
    assert de_with_fr_tag.status_code == 200 and de_with_fr_tag.json() == {"lang": "de"}


async def test_policy_vary_adds_request_headers_to_the_key(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    client, _ = await client_for(make_app_client, fake_redis, HttpCachePolicy(vary=("X-Tenant",)))
    a = await client.get("/cc", headers={"x-tenant": "a"})
    b = await client.get("/cc", headers={"x-tenant": "b"})
    a2 = await client.get("/cc", headers={"x-tenant": "a"})
    assert [r.headers["x-cache"] for r in (a, b, a2)] == ["MISS", "MISS", "HIT"]
    assert a.headers["vary"] == "x-tenant"


@pytest.mark.parametrize("credential", ["authorization", "cookie"])
async def test_no_cross_caller_leak_with_credentials(
    make_app_client: MakeClient, fake_redis: Any, credential: str
) -> None:
    client, app = await client_for(make_app_client, fake_redis)
    a = {credential: "alice-token"}
    b = {credential: "bob-token"}
    order = [a, b, a, b, {}, a, {}]
    bodies = []
    for headers in order:
        response = await client.get("/me", headers=headers)
        expected = headers.get(credential, "anonymous")
        assert response.json() == {"user": expected}
        private = bool(headers)
        cache_control = response.headers["cache-control"]
        assert cache_control.startswith("private") if private else "public" not in cache_control
        bodies.append((expected, response.headers["x-cache"]))
    assert [x for _, x in bodies] == ["MISS", "MISS", "HIT", "HIT", "MISS", "HIT", "HIT"]
    assert app.state.calls["me"] == 3
    # one caller's ETag does not earn another caller a 304 of the first caller's entry
    alice_tag = (await client.get("/me", headers=a)).headers["etag"]
    bob = await client.get("/me", headers={**b, "if-none-match": alice_tag})
    assert bob.status_code == 200 and bob.json() == {"user": "bob-token"}


async def test_x_api_key_callers_get_private_entries_and_never_public(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    client, app = await client_for(make_app_client, fake_redis)
    alice = [await client.get("/cc", headers={"x-api-key": "alice"}) for _ in range(2)]
    assert [r.headers["x-cache"] for r in alice] == ["MISS", "HIT"]
    assert alice[0].headers["cache-control"] == "private, max-age=60"
    bob = await client.get("/cc", headers={"x-api-key": "bob"})
    keyless = await client.get("/cc")
    assert bob.headers["x-cache"] == keyless.headers["x-cache"] == "MISS"
    assert keyless.headers["cache-control"] == "max-age=60"
    assert app.state.calls["cc"] == 3


async def test_spellings_of_a_path_share_one_entry_and_one_invalidation(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    client, app = await client_for(make_app_client, fake_redis)
    first = await client.get("/items/1")
    assert first.headers["x-cache"] == "MISS"
    assert (await client.get("/%69tems/1")).headers["x-cache"] == "HIT"
    # httpx removes dot segments itself, so this one is sent raw: it may route elsewhere,
    # so it is never served from nor stored under the normalised URL
    _, headers = await raw_request(app, "GET", b"/items/./1")
    assert headers[b"x-cache"] == b"MISS" and app.state.calls["item"] == 1
    await raw_request(app, "PUT", b"/x/../items/1")  # 404 from the app: nothing stored
    assert (await client.get("/items/1")).headers["x-cache"] == "HIT"
    assert (await client.put("/items/%31")).status_code == 200
    after = await client.get("/items/1")
    assert after.headers["x-cache"] == "MISS" and after.json()["version"] == 1


async def raw_request(app: Any, method: str, raw_path: bytes) -> tuple[int, dict[bytes, bytes]]:
    """One request with *raw_path* exactly as given (httpx would normalise it)."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(raw_path.decode("latin-1")),
        "raw_path": raw_path,
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], dict(start["headers"])


async def test_a_miss_after_a_key_rotation_finds_the_entry_under_the_old_key(
    make_app_client: MakeClient, fake_redis: Any, settings_override: Callable[..., None]
) -> None:
    old, new = "o" * 40, "n" * 40
    settings_override(secret_key=old)
    client, app = await client_for(make_app_client, fake_redis)
    assert (await client.get("/me", headers={"x-api-key": "alice"})).headers["x-cache"] == "MISS"
    settings_override(secret_key=new, secret_key_fallbacks=f'["{old}"]')
    rotated = await client.get("/me", headers={"x-api-key": "alice"})
    assert rotated.headers["x-cache"] == "HIT" and app.state.calls["me"] == 1
    bob = await client.get("/me", headers={"x-api-key": "bob"})
    assert bob.headers["x-cache"] == "MISS"


async def test_credentials_bypass_mode_never_caches_them(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    client, app = await client_for(
        make_app_client, fake_redis, HttpCachePolicy(credentials="bypass")
    )
    for _ in range(2):
        response = await client.get("/me", headers={"authorization": "alice"})
        assert response.headers["x-cache"] == "MISS" and "etag" not in response.headers
    assert app.state.calls["me"] == 2


async def test_origin_private_response_is_kept_per_caller_only(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    client, _ = await client_for(make_app_client, fake_redis)
    cc = "/cc?cc=private,%20max-age=30"
    anonymous = [await client.get(cc) for _ in range(2)]
    assert [r.headers["x-cache"] for r in anonymous] == ["MISS", "MISS"]
    alice = [await client.get(cc, headers={"authorization": "alice"}) for _ in range(2)]
    assert [r.headers["x-cache"] for r in alice] == ["MISS", "HIT"]
    assert alice[1].headers["cache-control"] == "private, max-age=30"


async def test_public_and_s_maxage_of_the_origin_are_its_own_choice_entry_stays_per_caller(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    # Was: rewritten to "private, max-age=5". RFC 9111 §3.5 lets the origin share a
    # credentialed response with public / s-maxage; the cache only never invents them.
    client, _ = await client_for(make_app_client, fake_redis)
    url = "/cc?cc=public,%20max-age=5,%20s-maxage=50"
    response = await client.get(url, headers={"cookie": "s=1"})
    assert response.headers["cache-control"] == "public, max-age=5, s-maxage=50"
    assert (await client.get(url, headers={"cookie": "s=1"})).headers["x-cache"] == "HIT"
    assert (await client.get(url, headers={"cookie": "s=2"})).headers["x-cache"] == "MISS"
    # a private cc for a caller is still made private
    private = await client.get("/cc?cc=max-age=5", headers={"cookie": "s=1"})
    assert private.headers["cache-control"] == "private, max-age=5"


# -- what is never stored -----------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/cookie",
        "/cc?status=500",
        "/cc?status=404",
        "/cc?status=302",
        "/cc?cc=no-store",
        "/cc?cc=no-cache",
        "/cc?cc=private",
        "/cc?cc=max-age=0",
        "/cc?cc=max-age=junk",
        "/vary-star",
        "/events",
    ],
)
async def test_responses_that_are_never_stored(
    make_app_client: MakeClient, fake_redis: Any, path: str
) -> None:
    client, app = await client_for(make_app_client, fake_redis)
    first = await client.get(path, follow_redirects=False)
    second = await client.get(path, follow_redirects=False)
    assert first.headers["x-cache"] == second.headers["x-cache"] == "MISS"
    assert sum(app.state.calls.values()) == 2
    assert [k async for k in fake_redis.scan_iter(match="*:e:*")] == []
    if path == "/cookie":
        assert "session=secret" in second.headers["set-cookie"]


async def test_cacheable_statuses_are_configurable(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    policy = HttpCachePolicy(cacheable_statuses=frozenset({200, 404}))
    client, app = await client_for(make_app_client, fake_redis, policy)
    responses = [await client.get("/cc?status=404") for _ in range(2)]
    assert [r.status_code for r in responses] == [404, 404]
    assert [r.headers["x-cache"] for r in responses] == ["MISS", "HIT"]
    assert app.state.calls["cc"] == 1


async def test_request_no_store_is_served_but_never_stored(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    client, app = await client_for(make_app_client, fake_redis)
    no_store = {"cache-control": "no-store"}
    assert (await client.get("/items/1", headers=no_store)).headers["x-cache"] == "MISS"
    assert (await client.get("/items/1", headers=no_store)).headers["x-cache"] == "MISS"
    await client.get("/items/1")
    assert (await client.get("/items/1", headers=no_store)).headers["x-cache"] == "HIT"
    assert app.state.calls["item"] == 3


async def test_range_requests_bypass_the_cache(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    client, app = await client_for(make_app_client, fake_redis)
    await client.get("/items/1")
    response = await client.get("/items/1", headers={"range": "bytes=0-3"})
    assert response.headers["x-cache"] == "MISS" and app.state.calls["item"] == 2


# -- HEAD ---------------------------------------------------------------------


async def test_head_is_served_from_the_get_entry_and_fills_it(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    client, app = await client_for(make_app_client, fake_redis)
    head_first = await client.head("/items/3")  # FastAPI alone answers 405 to HEAD here
    assert head_first.status_code == 200 and head_first.content == b""
    assert head_first.headers["x-cache"] == "MISS"
    get = await client.get("/items/3")
    head = await client.head("/items/3")
    assert get.headers["x-cache"] == head.headers["x-cache"] == "HIT"
    assert head.content == b"" and head.headers["content-length"] == str(len(get.content))
    assert head.headers["etag"] == get.headers["etag"] == head_first.headers["etag"]
    assert head_first.headers["content-length"] == str(len(get.content))
    assert (
        await client.head("/items/3", headers={"if-none-match": get.headers["etag"]})
    ).status_code == 304
    assert app.state.calls["item"] == 1


async def test_head_of_an_uncacheable_response_sends_headers_only(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    client, _ = await client_for(make_app_client, fake_redis)
    response = await client.head("/stream?size=5000")
    assert response.status_code == 200 and response.content == b""


# -- client revalidation --------------------------------------------------------


@pytest.mark.parametrize(
    "revalidate",
    [{"cache-control": "no-cache"}, {"cache-control": "max-age=0"}, {"pragma": "no-cache"}],
    ids=["no-cache", "max-age=0", "pragma"],
)
async def test_client_no_cache_recomputes_but_never_purges(
    make_app_client: MakeClient, fake_redis: Any, revalidate: dict[str, str]
) -> None:
    client, app = await client_for(make_app_client, fake_redis)
    state = app.state.demo
    assert (await client.get("/cc")).text == "v0"
    state["version"] = 1
    assert (await client.get("/cc")).text == "v0"  # still fresh for everyone else
    fresh = await client.get("/cc", headers=revalidate)
    assert (fresh.text, fresh.headers["x-cache"]) == ("v1", "MISS")
    others = await client.get("/cc")
    assert (others.text, others.headers["x-cache"]) == ("v1", "HIT")  # replaced, not dropped
    failing = await client.get("/cc?status=500", headers=revalidate)
    assert failing.status_code == 500
    kept = await client.get("/cc")
    assert (kept.text, kept.headers["x-cache"]) == ("v1", "HIT")


async def test_request_no_cache_can_be_ignored_by_policy(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    client, app = await client_for(
        make_app_client, fake_redis, HttpCachePolicy(request_no_cache="ignore")
    )
    await client.get("/cc")
    response = await client.get("/cc", headers={"cache-control": "no-cache"})
    assert response.headers["x-cache"] == "HIT" and app.state.calls["cc"] == 1


async def test_client_max_age_refuses_older_entries(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    client, _ = await client_for(make_app_client, fake_redis)
    await client.get("/cc")
    await age_entries(fake_redis, 20)
    young = await client.get("/cc", headers={"cache-control": "max-age=10"})
    assert young.headers["x-cache"] == "MISS"
    tolerant = await client.get("/cc", headers={"cache-control": "max-age=30"})
    assert tolerant.headers["x-cache"] == "HIT"


# -- freshness, Age, Cache-Control -----------------------------------------------


async def test_generated_cache_control_and_age(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    policy = HttpCachePolicy(ttl=60, max_age=10, s_maxage=120, stale_if_error=300)
    client, _ = await client_for(make_app_client, fake_redis, policy)
    first = await client.get("/items/1")
    assert first.headers["cache-control"] == ("max-age=10, s-maxage=120, stale-if-error=300")
    await age_entries(fake_redis, 42.7)
    aged = await client.get("/items/1")
    assert (aged.headers["x-cache"], aged.headers["age"]) == ("HIT", "42")


async def test_origin_freshness_s_maxage_for_shared_max_age_for_private(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    client, _ = await client_for(make_app_client, fake_redis)
    path = "/cc?cc=max-age=5,%20s-maxage=100"
    await client.get(path)
    await client.get(path, headers={"authorization": "alice"})
    await age_entries(fake_redis, 50)
    assert (await client.get(path)).headers["x-cache"] == "HIT"
    assert (await client.get(path, headers={"authorization": "alice"})).headers["x-cache"] == "MISS"
    await age_entries(fake_redis, 60)
    assert (await client.get(path)).headers["x-cache"] == "MISS"


async def test_expires_is_used_without_max_age(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    app = FastAPI()
    calls: Counter[str] = Counter()

    @app.get("/expires")
    async def expires(when: str) -> Response:
        calls["n"] += 1
        return PlainTextResponse("x", headers={"Expires": when})

    app.add_middleware(HttpCacheMiddleware)
    client = await make_app_client(app, fake_redis)
    past = "/expires?when=Sun,%2006%20Nov%201994%2008:49:37%20GMT"
    future = "/expires?when=Fri,%2031%20Dec%209999%2023:59:59%20GMT"
    assert [(await client.get(past)).headers["x-cache"] for _ in range(2)] == ["MISS", "MISS"]
    assert [(await client.get(future)).headers["x-cache"] for _ in range(2)] == ["MISS", "HIT"]
    invalid = "/expires?when=0"
    assert [(await client.get(invalid)).headers["x-cache"] for _ in range(2)] == ["MISS", "MISS"]


# -- stale-while-revalidate and stale-if-error -------------------------------------


async def test_stale_while_revalidate_serves_stale_and_refreshes_once(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    client, app = await client_for(make_app_client, fake_redis)
    assert (await client.get("/clock")).text == "v1"
    await age_entries(fake_redis, 30)  # past max-age=10, inside stale-while-revalidate=60
    responses = await asyncio.gather(*[client.get("/clock") for _ in range(20)])
    seen = [(r.text, r.headers["x-cache"]) for r in responses]
    # served at once from the stale entry until the one background refresh lands
    assert seen[0] == ("v1", "STALE") and set(seen) <= {("v1", "STALE"), ("v2", "HIT")}
    assert all(int(r.headers["age"]) >= 30 for r in responses if r.headers["x-cache"] == "STALE")
    await cache_layer(app).drain()
    assert app.state.calls["clock"] == 2  # exactly one background refresh
    refreshed = await client.get("/clock")
    assert (refreshed.text, refreshed.headers["x-cache"]) == ("v2", "HIT")
    await age_entries(fake_redis, 100)  # past both windows: an ordinary miss
    assert (await client.get("/clock")).headers["x-cache"] == "MISS"


@pytest.mark.parametrize("failure", ["status", "raise"])
async def test_stale_if_error_replaces_origin_failures(
    make_app_client: MakeClient, fake_redis: Any, failure: str
) -> None:
    client, app = await client_for(make_app_client, fake_redis)
    assert (await client.get("/flaky")).text == "v0"
    await age_entries(fake_redis, 30)  # past max-age=10, inside stale-if-error=60
    app.state.demo["fail"] = failure
    app.state.demo["version"] = 1
    stale = await client.get("/flaky")
    assert (stale.status_code, stale.text, stale.headers["x-cache"]) == (200, "v0", "STALE")
    app.state.demo["fail"] = None
    fresh = await client.get("/flaky")
    assert (fresh.text, fresh.headers["x-cache"]) == ("v1", "MISS")
    assert app.state.calls["flaky"] == 3


async def test_without_stale_if_error_a_failure_is_passed_on(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    client, app = await client_for(make_app_client, fake_redis)
    await client.get("/flaky")
    await age_entries(fake_redis, 100)  # past every window
    app.state.demo["fail"] = "status"
    response = await client.get("/flaky")
    assert (response.status_code, response.headers["x-cache"]) == (503, "MISS")


# -- streaming ----------------------------------------------------------------------


async def test_bodies_under_the_cap_are_stored_larger_ones_pass_through(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    client, app = await client_for(make_app_client, fake_redis, HttpCachePolicy(max_body_size=5000))
    small = [await client.get("/stream?size=5000") for _ in range(2)]
    large = [await client.get("/stream?size=5001") for _ in range(2)]
    assert [r.headers["x-cache"] for r in small] == ["MISS", "HIT"]
    assert [r.headers["x-cache"] for r in large] == ["MISS", "MISS"]
    assert all(len(r.content) == 5001 for r in large) and "etag" not in large[0].headers
    assert app.state.calls["stream"] == 3


def _scope(
    method: str = "GET", path: str = "/", headers: list[tuple[bytes, bytes]] | None = None
) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), *(headers or [])],
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 5000),
    }


async def _request(
    app: Any, scope: Scope, on_send: Callable[[Message], None] | None = None
) -> list[Message]:
    messages: list[Message] = []
    done = asyncio.Event()
    asked = False

    async def receive() -> Message:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        messages.append(message)
        if on_send is not None:
            on_send(message)

    try:
        await asyncio.wait_for(app(scope, receive, send), 10)
    finally:
        done.set()
    return messages


@pytest.mark.parametrize("chunk", [100, 1500], ids=["small-chunks", "one-big-chunk"])
async def test_streaming_over_the_cap_reaches_the_client_before_the_origin_finishes(
    fake_redis: Any, chunk: int
) -> None:
    """The origin waits for the client to receive bytes: buffering past the cap would deadlock."""
    core_redis.redis_client = fake_redis
    cap = 1000
    client_got_bytes = asyncio.Event()

    async def origin(scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        sent = 0
        while sent <= cap:
            await send({"type": "http.response.body", "body": b"x" * chunk, "more_body": True})
            sent += chunk
        await asyncio.wait_for(client_got_bytes.wait(), 5)
        await send({"type": "http.response.body", "body": b"tail", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def watch(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            client_got_bytes.set()

    app = HttpCacheMiddleware(origin, policy=HttpCachePolicy(max_body_size=cap))
    messages = await _request(app, _scope(), watch)
    bodies = [m for m in messages if m["type"] == "http.response.body"]
    assert messages[0]["type"] == "http.response.start"
    assert (b"x-cache", b"MISS") in messages[0]["headers"]
    assert b"".join(m["body"] for m in bodies).endswith(b"tail")
    assert [m.get("more_body", False) for m in bodies][-1] is False
    assert all(m.get("more_body") for m in bodies[:-1])
    assert app.stats.uncacheable == 1 and app.stats.stores == 0


async def test_declared_length_over_the_cap_is_never_buffered(fake_redis: Any) -> None:
    core_redis.redis_client = fake_redis
    started = asyncio.Event()

    async def origin(scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"2000")],
            }
        )
        await asyncio.wait_for(started.wait(), 5)  # the start already reached the client
        await send({"type": "http.response.body", "body": b"y" * 2000})

    def watch(message: Message) -> None:
        if message["type"] == "http.response.start":
            started.set()

    app = HttpCacheMiddleware(origin, policy=HttpCachePolicy(max_body_size=1000))
    messages = await _request(app, _scope(), watch)
    assert messages[-1]["body"] == b"y" * 2000


async def test_non_http_scopes_and_unlisted_paths_pass_through(fake_redis: Any) -> None:
    core_redis.redis_client = fake_redis
    seen: list[str] = []

    async def origin(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

    app = HttpCacheMiddleware(origin, paths=["/cached/"], exclude=["/cached/not/"])
    await app({"type": "lifespan"}, _never_receive, _ignore_send)
    for path in ["/other", "/cached/not/this", "/cached/yes"]:
        messages = await _request(app, _scope(path=path))
        has_x_cache = any(n == b"x-cache" for n, _ in messages[0]["headers"])
        assert has_x_cache == (path == "/cached/yes")
    assert seen == ["lifespan", "http", "http", "http"]


async def _never_receive() -> Message:
    await asyncio.Event().wait()
    return {}


async def _ignore_send(message: Message) -> None:
    return None


# -- invalidation --------------------------------------------------------------------


async def test_unsafe_methods_invalidate_the_target_and_content_location(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    client, _ = await client_for(make_app_client, fake_redis)
    await client.get("/items/1?x=1&y=2")
    await client.get("/items/1/view")
    await client.get("/items/2")
    assert (await client.put("/items/1?y=2&x=1")).status_code == 200
    after = await client.get("/items/1?x=1&y=2")
    assert (after.json()["version"], after.headers["x-cache"]) == (1, "MISS")
    view = await client.get("/items/1/view")  # the PUT's Content-Location
    assert (view.json()["version"], view.headers["x-cache"]) == (1, "MISS")
    assert (await client.get("/items/2")).headers["x-cache"] == "HIT"
    assert (await client.put("/forbidden")).status_code == 403


async def test_a_refused_invalidation_is_counted_and_the_response_goes_on(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    client, app = await client_for(make_app_client, fake_redis)
    await client.get("/items/1")
    (meta,) = [key async for key in fake_redis.scan_iter(match="*:httpcache:*:m")]
    await fake_redis.delete(meta)
    await fake_redis.set(meta, b"not a hash")  # every script on this URL answers WRONGTYPE
    assert (await client.put("/items/1")).status_code == 200
    assert cache_layer(app).stats.errors == 1
    served = await client.get("/items/1")  # the lookup fails open: the origin answers
    assert (served.status_code, served.headers["x-cache"]) == (200, "MISS")
    assert served.json()["version"] == 1 and cache_layer(app).stats.errors == 2


@pytest.mark.parametrize(
    ("options", "what"),
    [
        ({"ttl": -1}, "HttpCachePolicy.ttl"),
        ({"ttl": float("inf")}, "HttpCachePolicy.ttl"),
        ({"max_age": float("nan")}, "HttpCachePolicy.max_age"),
        ({"s_maxage": -1}, "HttpCachePolicy.s_maxage"),
        ({"stale_if_error": True}, "HttpCachePolicy.stale_if_error"),
        ({"max_ttl": -1}, "HttpCachePolicy.max_ttl"),
        ({"refresh_lease": 0}, "HttpCachePolicy.refresh_lease"),
        ({"max_body_size": -1}, "HttpCachePolicy.max_body_size"),
        ({"credentials": "shared"}, "HttpCachePolicy.credentials"),
    ],
)
def test_bad_policy_values_are_configuration_errors(options: dict[str, Any], what: str) -> None:
    with pytest.raises(ConfigurationError, match=what):
        HttpCachePolicy(**options)


def test_policy_without_a_cap_and_a_bad_middleware_timeout() -> None:
    assert HttpCachePolicy(max_ttl=float("inf")).max_ttl == float("inf")
    with pytest.raises(ConfigurationError, match="timeout"):
        HttpCacheMiddleware(FastAPI(), timeout=-1)


async def test_failed_writes_do_not_invalidate(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    app = FastAPI()

    @app.get("/doc")
    async def doc() -> dict[str, int]:
        return {"v": 1}

    @app.delete("/doc")
    async def delete() -> JSONResponse:
        return JSONResponse({"error": "conflict"}, status_code=409)

    app.add_middleware(HttpCacheMiddleware)
    client = await make_app_client(app, fake_redis)
    await client.get("/doc")
    await client.delete("/doc")
    assert (await client.get("/doc")).headers["x-cache"] == "HIT"


# -- malformed input ---------------------------------------------------------------

wild = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=60
) | st.sampled_from(
    ['W/"', '"a', "*,", "max-age=-1", 'no-cache="', "max-age=99999999999999999999", "Mon, 99 Foo 1"]
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    request_cc=wild,
    if_none_match=wild,
    if_modified_since=wild,
    response_cc=wild,
    vary=wild,
    etag=wild,
    last_modified=wild,
)
def test_malformed_headers_never_cause_a_5xx(
    request_cc: str,
    if_none_match: str,
    if_modified_since: str,
    response_cc: str,
    vary: str,
    etag: str,
    last_modified: str,
) -> None:
    async def origin(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [
            (b"cache-control", response_cc.encode("latin-1")),
            (b"vary", vary.encode("latin-1")),
            (b"etag", etag.encode("latin-1")),
            (b"last-modified", last_modified.encode("latin-1")),
            (b"expires", last_modified.encode("latin-1")),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"body"})

    async def scenario() -> list[int]:
        redis = slot_checking_fake_redis(server=fakeredis.FakeServer())
        core_redis.redis_client = redis
        try:
            app = HttpCacheMiddleware(origin, secret=b"k")
            headers = [
                (b"cache-control", request_cc.encode("latin-1")),
                (b"if-none-match", if_none_match.encode("latin-1")),
                (b"if-modified-since", if_modified_since.encode("latin-1")),
                (b"accept", b"x"),
            ]
            statuses = []
            for method in ("GET", "GET", "HEAD"):
                messages = await _request(app, _scope(method, "/x", headers))
                statuses.append(messages[0]["status"])
            return statuses
        finally:
            await redis.aclose()

    assert set(asyncio.run(scenario())) <= {200, 304}


# -- per-route form -------------------------------------------------------------------


async def test_per_route_decorator_caches_only_marked_routes(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    stats = HttpCacheStats()
    calls: Counter[str] = Counter()
    router = APIRouter(prefix="/api", route_class=HttpCacheRoute)

    @router.get("/cached/{n}")
    @cache_response(ttl=30, stats=stats)
    async def cached(n: int) -> dict[str, int]:
        calls["cached"] += 1
        return {"n": n}

    @router.get("/plain")
    async def plain() -> dict[str, int]:
        calls["plain"] += 1
        return {"n": 0}

    @router.post("/cached/{n}")
    @cache_response()
    async def write(n: int) -> dict[str, int]:
        return {"n": n}

    app = FastAPI()
    app.include_router(router)
    client = await make_app_client(app, fake_redis)
    first, second = await client.get("/api/cached/1"), await client.get("/api/cached/1")
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert second.headers["cache-control"] == "max-age=30"
    head = await client.head("/api/cached/1")
    assert (head.status_code, head.content, head.headers["x-cache"]) == (200, b"", "HIT")
    assert (await client.get("/api/cached/2")).headers["x-cache"] == "MISS"
    await client.post("/api/cached/1")  # a marked write route invalidates its URL
    assert (await client.get("/api/cached/1")).headers["x-cache"] == "MISS"
    plain_response = await client.get("/api/plain")
    assert "x-cache" not in plain_response.headers
    assert (await client.head("/api/plain")).status_code == 405  # unmarked: FastAPI as usual
    assert calls == Counter({"cached": 3, "plain": 1})
    assert stats.hits == 2 and stats.misses == 3


# -- the demo service -----------------------------------------------------------------


async def test_demo_routes(app_client: httpx.AsyncClient) -> None:
    first = await app_client.get("/http-cache/items/5")
    second = await app_client.get("/http-cache/items/5")
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert first.headers["x-origin-calls"] == "1" and "x-origin-calls" not in second.headers
    assert second.headers["cache-control"] == "max-age=0"
    not_modified = await app_client.get(
        "/http-cache/items/5", headers={"if-none-match": first.headers["etag"]}
    )
    assert not_modified.status_code == 304
    await app_client.put("/http-cache/items/5")
    assert (await app_client.get("/http-cache/items/5")).json()["version"] == 1
    renamed = await app_client.post("/http-cache/items/5/rename")
    assert renamed.json() == {"id": 5, "version": 2, "invalidated": True}
    assert (await app_client.get("/http-cache/items/5")).json()["version"] == 2
    route = [await app_client.get("/http-cache/route/items/9") for _ in range(2)]
    assert [r.headers["x-cache"] for r in route] == ["MISS", "HIT"]
    big = [await app_client.get("/http-cache/report?size=70000") for _ in range(2)]
    assert [r.headers["x-cache"] for r in big] == ["MISS", "MISS"]
    assert len(big[1].content) == 70000
    me = await app_client.get("/http-cache/me", headers={"authorization": "Bearer ann"})
    assert me.json() == {"user": "ann"} and me.headers["cache-control"].startswith("private")
    stats = (await app_client.get("/http-cache/stats")).json()
    assert "x-cache" not in (await app_client.get("/http-cache/stats")).headers
    assert stats["middleware"]["hits"] >= 1 and stats["middleware"]["not_modified"] == 1
    assert stats["route"]["hits"] >= 1


async def test_a_per_route_cache_inside_the_session_layer_never_stores_a_session_response(
    make_app_client: MakeClient, fake_redis: Any
) -> None:
    calls: Counter[str] = Counter()
    router = APIRouter(route_class=HttpCacheRoute)

    @router.get("/form")
    @cache_response(ttl=30)
    async def form(session: SessionDep) -> dict[str, str]:
        calls["form"] += 1
        session.setdefault("csrf", f"csrf-{calls['form']}")
        return {"csrf": session["csrf"]}

    @router.get("/static")
    @cache_response(ttl=30)
    async def static() -> dict[str, str]:
        calls["static"] += 1
        return {"static": "yes"}

    app = FastAPI()
    app.include_router(router)
    app.add_middleware(SessionMiddleware, secret_key="r" * 40)
    victim = await make_app_client(app, fake_redis)
    token = (await victim.get("/form")).json()["csrf"]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as attacker:
        stolen = await attacker.get("/form")
        assert stolen.json()["csrf"] != token and stolen.headers["x-cache"] == "MISS"
        assert (await attacker.get("/static")).headers["x-cache"] == "MISS"
        # a response that did not use the session is stored (per caller: it has a cookie)
        assert (await attacker.get("/static")).headers["x-cache"] == "HIT"
        assert calls["static"] == 1
