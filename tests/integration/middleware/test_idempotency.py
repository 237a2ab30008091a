"""IdempotencyMiddleware through real ASGI apps on real Redis: every rule of issue 4.

The core rules (replay, 409/422, waiting, release, scoping, the demo) run on standalone,
Cluster and Sentinel (``make_on_topology``); the rest on the standalone server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from redis.asyncio import Redis
from starlette.types import Message

from app.api.problems import PROBLEM_TYPE_BASE, install_problem_handlers
from app.api.routes import health
from app.api.routes import idempotency as demo
from app.core import redis as core_redis
from app.core.redis import redis_lifespan, scan_keys
from app.middleware.idempotency import IdempotencyMiddleware
from app.testing.clients import ready
from app.testing.plugin import RedisServerInfo
from app.testing.servers import RedisServer
from tests.integration.middleware._idempotency_worker import build_app

Client = httpx.AsyncClient
MakeClient = Callable[..., Awaitable[tuple[FastAPI, Client]]]

KEY = {"Idempotency-Key": '"8e03978e-40d5-43e8-bc93-6894a57f9324"'}


@contextlib.asynccontextmanager
async def _factory(default: Any) -> AsyncIterator[MakeClient]:
    async with contextlib.AsyncExitStack() as stack:

        async def make(redis: Any = default, **options: Any) -> tuple[FastAPI, Client]:
            core_redis.redis_client = redis
            app = build_app(**options)
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            client = httpx.AsyncClient(transport=transport, base_url="http://testserver")

            async def forget_cookies(response: httpx.Response) -> None:
                # The test app sets a cookie (to show it is never replayed); a cookie is a
                # credential, so keeping it would make each retry another caller.
                client.cookies.clear()

            client.event_hooks["response"] = [forget_cookies]
            return app, await stack.enter_async_context(client)

        yield make


@pytest_asyncio.fixture
async def make_client(real_redis: Redis) -> AsyncIterator[MakeClient]:
    """``app, client = await make_client(**middleware_options)`` on the real server."""
    async with _factory(real_redis) as make:
        yield make


@pytest_asyncio.fixture
async def make_on_topology(topology_redis: Any) -> AsyncIterator[MakeClient]:
    """``make_client`` on standalone, Cluster and Sentinel (the core behaviour runs on all)."""
    async with _factory(await ready(topology_redis)) as make:
        yield make


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def problem_type(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/problem+json"
    return str(response.json()["type"]).removeprefix(PROBLEM_TYPE_BASE)


# -- the demo app ----------------------------------------------------------------------------


@pytest_asyncio.fixture
async def demo_client(
    topology_redis: Any, make_app_client: Callable[..., Awaitable[Client]]
) -> Client:
    """The demo wired as ``create_app()`` wires it, with only this capability (and health)."""
    app = FastAPI(lifespan=redis_lifespan())
    install_problem_handlers(app)
    app.include_router(health.router)
    app.include_router(demo.router)
    demo.setup(app)
    return await make_app_client(app, await ready(topology_redis))


async def test_demo_payment_runs_once_and_replays_byte_identical(demo_client: Client) -> None:
    body = {"amount": 1250, "currency": "EUR"}
    first = await demo_client.post("/payments", json=body, headers=KEY)
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    retry = await demo_client.post("/payments", json=body, headers=KEY)
    assert retry.status_code == 201
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.content == first.content
    assert retry.headers["location"] == first.headers["location"]
    assert retry.headers["content-type"] == first.headers["content-type"]
    executions = await demo_client.get("/payments/executions")
    assert executions.json() == {"executions": 1}
    stored = await demo_client.get(first.headers["location"])
    assert stored.json() == first.json()


async def test_demo_requires_a_key_and_leaves_other_routes_alone(demo_client: Client) -> None:
    missing = await demo_client.post("/payments", json={"amount": 1})
    assert missing.status_code == 400 and problem_type(missing) == "idempotency-key-missing"
    assert (await demo_client.get("/payments/executions")).json() == {"executions": 0}
    unguarded = await demo_client.get("/healthz")
    assert unguarded.status_code == 200 and "idempotent-replayed" not in unguarded.headers


async def test_demo_openapi_documents_the_header_and_errors(demo_client: Client) -> None:
    spec = (await demo_client.get("/openapi.json")).json()
    operation = spec["paths"]["/payments"]["post"]
    header = next(p for p in operation["parameters"] if p["name"] == "Idempotency-Key")
    assert header["in"] == "header" and "Required" in header["description"]
    assert {"400", "409", "422", "503"} <= set(operation["responses"])
    assert "application/problem+json" in operation["responses"]["409"]["content"]
    assert "Retry-After" in operation["responses"]["409"]["headers"]


def test_create_app_installs_the_demo_middleware() -> None:
    from app.main import create_app

    app = create_app()
    installed: list[Any] = [m.cls for m in app.user_middleware]
    assert IdempotencyMiddleware in installed


# -- replay ----------------------------------------------------------------------------------


async def test_replay_carries_allowlisted_headers_only(make_on_topology: MakeClient) -> None:
    app, client = await make_on_topology()
    first = await client.post("/items", json={"a": 1}, headers=KEY)
    replay = await client.post("/items", json={"a": 1}, headers=KEY)
    assert app.state.calls["items"] == 1
    assert replay.status_code == 201 and replay.content == first.content
    assert replay.headers["idempotent-replayed"] == "true"
    for name in ("content-type", "location", "etag", "link"):
        assert replay.headers[name] == first.headers[name]
    assert "set-cookie" in first.headers and "set-cookie" not in replay.headers
    assert "x-other" in first.headers and "x-other" not in replay.headers


async def test_stored_headers_are_configurable(make_client: MakeClient) -> None:
    _app, client = await make_client(stored_headers=("content-type", "x-other"))
    first = await client.post("/items", json={}, headers=KEY)
    replay = await client.post("/items", json={}, headers=KEY)
    assert replay.headers["x-other"] == first.headers["x-other"]
    assert "location" not in replay.headers


async def test_quoted_and_bare_forms_are_the_same_key(make_client: MakeClient) -> None:
    app, client = await make_client()
    await client.post("/items", json={}, headers={"Idempotency-Key": '"order-1"'})
    replay = await client.post("/items", json={}, headers={"Idempotency-Key": "order-1"})
    assert replay.headers["idempotent-replayed"] == "true"
    assert app.state.calls["items"] == 1


async def test_request_body_reaches_the_handler_intact(make_client: MakeClient) -> None:
    app, client = await make_client()
    chunks = [b"alpha-", b"beta-", b"gamma"]

    async def stream() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    first = await client.post("/echo", content=stream(), headers=KEY)
    assert first.content == b"alpha-beta-gamma"
    again = await client.post("/echo", content=b"alpha-beta-gamma", headers=KEY)
    assert again.headers["idempotent-replayed"] == "true" and app.state.calls["echo"] == 1


# -- key syntax and required mode --------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ['""', '"unterminated', "has space", "x" * 256, '"tab\there"', "caf\u00e9", '"a"junk'],
)
async def test_malformed_keys_are_400(make_client: MakeClient, value: str) -> None:
    app, client = await make_client()
    response = await client.post(
        "/items", json={}, headers=[(b"idempotency-key", value.encode("utf-8"))]
    )
    assert response.status_code == 400 and problem_type(response) == "idempotency-key-invalid"
    assert app.state.calls["items"] == 0


async def test_two_key_headers_are_400(make_client: MakeClient) -> None:
    app, client = await make_client()
    response = await client.post(
        "/items", json={}, headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
    )
    assert response.status_code == 400 and app.state.calls["items"] == 0


async def test_required_mode_refuses_requests_without_a_key(make_client: MakeClient) -> None:
    app, client = await make_client(required=True)
    response = await client.post("/items", json={})
    assert response.status_code == 400 and problem_type(response) == "idempotency-key-missing"
    assert "Idempotency-Key" in response.json()["detail"]
    assert (await client.get("/items")).status_code == 200  # safe methods are not guarded
    assert app.state.calls["items"] == 0


async def test_without_a_key_optional_mode_runs_every_time(make_client: MakeClient) -> None:
    app, client = await make_client()
    await client.post("/items", json={})
    await client.post("/items", json={})
    assert app.state.calls["items"] == 2


async def test_only_configured_paths_and_methods_are_guarded(
    make_client: MakeClient, real_redis: Redis
) -> None:
    app, client = await make_client()
    for _ in range(2):
        assert (await client.post("/unguarded", headers=KEY)).status_code == 200
    assert app.state.calls["unguarded"] == 2
    assert await real_redis.dbsize() == 0  # nothing was claimed


# -- fingerprint -----------------------------------------------------------------------------


async def test_same_key_other_body_is_422(make_on_topology: MakeClient) -> None:
    app, client = await make_on_topology()
    await client.post("/items", json={"amount": 10}, headers=KEY)
    other = await client.post("/items", json={"amount": 11}, headers=KEY)
    assert other.status_code == 422 and problem_type(other) == "idempotency-key-reused"
    other_query = await client.post("/items?x=1", json={"amount": 10}, headers=KEY)
    assert other_query.status_code == 422
    assert app.state.calls["items"] == 1


async def test_same_key_on_another_route_is_a_separate_request(make_client: MakeClient) -> None:
    _app, client = await make_client()
    await client.post("/items", json={}, headers=KEY)
    echo = await client.post("/echo", content=b"{}", headers=KEY)
    assert echo.status_code == 200 and "idempotent-replayed" not in echo.headers


async def test_json_fingerprint_ignores_key_order_and_spacing(make_client: MakeClient) -> None:
    app, client = await make_client(fingerprint="json")
    await client.post("/echo", content=b'{"a": 1, "b": [1, 2]}', headers=KEY)
    replay = await client.post("/echo", content=b'{"b":[1,2],"a":1}', headers=KEY)
    assert replay.headers["idempotent-replayed"] == "true"
    changed = await client.post("/echo", content=b'{"b":[2,1],"a":1}', headers=KEY)
    assert changed.status_code == 422 and app.state.calls["echo"] == 1


async def test_raw_fingerprint_is_byte_exact(make_client: MakeClient) -> None:
    _app, client = await make_client()
    await client.post("/echo", content=b'{"a":1,"b":2}', headers=KEY)
    reordered = await client.post("/echo", content=b'{"b":2,"a":1}', headers=KEY)
    assert reordered.status_code == 422


async def test_callable_fingerprint_selects_fields(make_client: MakeClient) -> None:
    def amount_only(body: bytes) -> str:
        return str(json.loads(body)["amount"])

    _app, client = await make_client(fingerprint=amount_only)
    await client.post("/echo", content=b'{"amount": 5, "note": "a"}', headers=KEY)
    same = await client.post("/echo", content=b'{"amount": 5, "note": "b"}', headers=KEY)
    assert same.headers["idempotent-replayed"] == "true"
    assert (await client.post("/echo", content=b'{"amount": 6}', headers=KEY)).status_code == 422


# -- concurrency -----------------------------------------------------------------------------


async def test_concurrent_duplicates_get_409_with_retry_after(make_on_topology: MakeClient) -> None:
    app, client = await make_on_topology(conflict_retry_after=2.5)
    first = asyncio.create_task(client.post("/items?gate=1", json={"n": 1}, headers=KEY))
    await app.state.entered.wait()
    duplicates = await asyncio.gather(
        *(client.post("/items?gate=1", json={"n": 1}, headers=KEY) for _ in range(20))
    )
    for response in duplicates:
        assert response.status_code == 409 and response.headers["retry-after"] == "3"
        assert problem_type(response) == "idempotency-key-in-use"
    app.state.gate.set()
    original = await first
    assert original.status_code == 201
    replay = await client.post("/items?gate=1", json={"n": 1}, headers=KEY)
    assert replay.content == original.content and app.state.calls["items"] == 1


async def test_wait_mode_replays_to_concurrent_duplicates(make_on_topology: MakeClient) -> None:
    app, client = await make_on_topology(on_conflict="wait", wait_timeout=20)
    first = asyncio.create_task(client.post("/items?gate=1", json={}, headers=KEY))
    await app.state.entered.wait()
    waiting = [
        asyncio.create_task(client.post("/items?gate=1", json={}, headers=KEY)) for _ in range(20)
    ]
    await asyncio.sleep(0.1)
    assert not any(task.done() for task in waiting)
    app.state.gate.set()
    original = await first
    for response in await asyncio.gather(*waiting):
        assert response.status_code == 201 and response.content == original.content
        assert response.headers["idempotent-replayed"] == "true"
    assert app.state.calls["items"] == 1


async def test_wait_mode_is_bounded(make_client: MakeClient) -> None:
    app, client = await make_client(on_conflict="wait", wait_timeout=0.2)
    first = asyncio.create_task(client.post("/items?gate=1", json={}, headers=KEY))
    await app.state.entered.wait()
    late = await client.post("/items?gate=1", json={}, headers=KEY)
    assert late.status_code == 409 and "after waiting" in late.json()["detail"]
    app.state.gate.set()
    assert (await first).status_code == 201


async def test_heartbeat_keeps_a_slow_request_claimed(make_client: MakeClient) -> None:
    app, client = await make_client(lease=1.0)  # renewed every 1/3 s: a loaded loop keeps it
    first = asyncio.create_task(client.post("/items?gate=1", json={}, headers=KEY))
    await app.state.entered.wait()
    await asyncio.sleep(3.0)  # three leases: only the heartbeat keeps the claim
    # A lost claim would let this request in, to wait on the gate: bounded, so it fails, not hangs.
    second = await asyncio.wait_for(client.post("/items?gate=1", json={}, headers=KEY), 10)
    assert second.status_code == 409
    app.state.gate.set()
    assert (await first).status_code == 201
    assert app.state.calls["items"] == 1


# -- failures of the handler -----------------------------------------------------------------


async def test_handler_exception_releases_the_key_for_a_retry(make_on_topology: MakeClient) -> None:
    app, client = await make_on_topology()
    crashed = await client.post("/fail", json={}, headers=KEY)
    assert crashed.status_code == 500
    retry = await client.post("/fail", json={}, headers=KEY)
    assert retry.status_code == 200 and retry.json() == {"run": 2}
    replay = await client.post("/fail", json={}, headers=KEY)
    assert replay.headers["idempotent-replayed"] == "true" and replay.content == retry.content
    assert app.state.calls["fail"] == 2


@pytest.mark.parametrize("code", [500, 503])
async def test_server_errors_release_by_default(make_client: MakeClient, code: int) -> None:
    _app, client = await make_client()
    assert (await client.post(f"/status/{code}", headers=KEY)).status_code == code
    again = await client.post(f"/status/{code}", headers=KEY)
    assert "idempotent-replayed" not in again.headers and again.json() == {"run": 2}


async def test_stripe_mode_stores_server_errors(make_client: MakeClient) -> None:
    app, client = await make_client(store_server_errors=True)
    first = await client.post("/status/500", headers=KEY)
    replay = await client.post("/status/500", headers=KEY)
    assert replay.status_code == 500 and replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content and app.state.calls["status"] == 1


async def test_client_errors_are_stored(make_client: MakeClient) -> None:
    _app, client = await make_client()
    await client.post("/status/404", headers=KEY)
    replay = await client.post("/status/404", headers=KEY)
    assert replay.status_code == 404 and replay.headers["idempotent-replayed"] == "true"


# -- scope -----------------------------------------------------------------------------------


async def test_two_principals_with_one_key_are_independent(make_on_topology: MakeClient) -> None:
    app, client = await make_on_topology()
    alice = {**KEY, "Authorization": "Bearer alice-token"}
    bob = {**KEY, "Authorization": "Bearer bob-token"}
    a1 = await client.post("/items", json={"who": "a"}, headers=alice)
    b1 = await client.post("/items", json={"who": "b"}, headers=bob)
    assert a1.json()["run"] == 1 and b1.json()["run"] == 2  # no 422, no leaked replay
    a2 = await client.post("/items", json={"who": "a"}, headers=alice)
    b2 = await client.post("/items", json={"who": "b"}, headers=bob)
    assert a2.content == a1.content and b2.content == b1.content
    anonymous = await client.post("/items", json={"who": "a"}, headers=KEY)
    assert anonymous.json()["run"] == 3
    assert app.state.calls["items"] == 3


async def test_anonymous_callers_are_scoped_by_address(make_client: MakeClient) -> None:
    # Was: anonymous callers from any address shared one scope (issue 16, attack 2).
    app, client = await make_client()
    await client.post("/items", json={}, headers=KEY)
    other_transport = httpx.ASGITransport(app=app, client=("10.9.9.9", 5555))
    async with httpx.AsyncClient(transport=other_transport, base_url="http://testserver") as c2:
        other = await c2.post("/items", json={}, headers=KEY)
        assert "idempotent-replayed" not in other.headers and other.json()["run"] == 2
        c2.cookies.clear()  # the app set one: a cookie is a credential (another caller)
        again = await c2.post("/items", json={}, headers=KEY)
    assert again.headers["idempotent-replayed"] == "true" and app.state.calls["items"] == 2


async def test_anonymous_keys_can_be_refused(make_client: MakeClient) -> None:
    app, client = await make_client(anonymous="refuse")
    refused = await client.post("/items", json={}, headers=KEY)
    assert refused.status_code == 400 and problem_type(refused) == "idempotency-caller-unknown"
    accepted = await client.post("/items", json={}, headers={**KEY, "X-API-Key": "k1"})
    assert accepted.status_code == 201 and app.state.calls["items"] == 1


async def test_records_are_hmac_scoped_never_raw_keys(
    make_on_topology: MakeClient, topology_redis: Any
) -> None:
    _app, client = await make_on_topology()
    await client.post("/items", json={}, headers=KEY)
    keys = [_text(k) async for k in scan_keys(topology_redis, "*")]
    assert keys and all(k.startswith("app:idempotency.http:{") for k in keys)
    assert not any("8e03978e" in k for k in keys)


# -- response capture ------------------------------------------------------------------------


async def test_a_streamed_response_is_sent_as_it_is_produced(
    make_client: MakeClient, real_redis: Redis
) -> None:
    app, client = await make_client()
    messages: list[Message] = []
    first_byte = asyncio.Event()
    request_done = asyncio.Event()

    async def receive() -> Message:
        if not messages and not request_done.is_set():
            request_done.set()
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        messages.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            first_byte.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/stream",
        "raw_path": b"/stream",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"idempotency-key", b"stream-1"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
    task = asyncio.create_task(app(scope, receive, send))
    async with asyncio.timeout(10):
        await first_byte.wait()
    # The handler is parked on the gate the test holds: the body has not ended yet.
    assert not app.state.gate.is_set() and not task.done()
    assert [m.get("body") for m in messages if m["type"] == "http.response.body"] == [b"first|"]
    assert messages[0]["type"] == "http.response.start"
    app.state.gate.set()
    async with asyncio.timeout(10):
        await task
    sent = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    assert sent == b"first|chunk-0|chunk-1|chunk-2|"
    replay = await client.post("/stream", content=b"{}", headers={"Idempotency-Key": "stream-1"})
    assert replay.content == sent and replay.headers["idempotent-replayed"] == "true"
    assert replay.headers["content-type"].startswith("text/plain")
    assert app.state.calls["stream"] == 1


async def test_response_over_the_cap_is_sent_and_marked_not_stored(
    make_client: MakeClient,
) -> None:
    app, client = await make_client(max_stored_body=100)
    first = await client.post("/big?n=1000", headers=KEY)
    assert first.status_code == 201 and len(first.content) == 1000
    assert first.headers["idempotency-stored"] == "false"
    replay = await client.post("/big?n=1000", headers=KEY)
    # Never an empty success: a problem that states the original status (issue 16, attack 7).
    assert replay.status_code == 410 and problem_type(replay) == "idempotency-response-not-kept"
    assert replay.json()["original-status"] == 201
    assert replay.headers["idempotency-stored"] == "false"
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.headers["location"] == "/big/1"
    assert app.state.calls["big"] == 1  # the side effect still ran once
    small = await client.post("/big?n=100", headers={"Idempotency-Key": "small"})
    assert "idempotency-stored" not in small.headers
    assert (await client.post("/big?n=100", headers={"Idempotency-Key": "small"})).content == (
        small.content
    )


async def test_stream_outgrowing_the_cap_is_not_stored(make_client: MakeClient) -> None:
    app, client = await make_client(max_stored_body=10)
    app.state.gate.set()
    first = await client.post("/stream?n=5", headers=KEY)
    assert len(first.content) > 10
    replay = await client.post("/stream?n=5", headers=KEY)
    assert replay.status_code == 410 and replay.json()["original-status"] == first.status_code
    assert replay.headers["idempotency-stored"] == "false"
    assert app.state.calls["stream"] == 1


async def test_request_body_over_the_limit_is_413(make_client: MakeClient) -> None:
    app, client = await make_client(max_request_body=10)
    response = await client.post("/echo", content=b"x" * 11, headers=KEY)
    assert response.status_code == 413 and app.state.calls["echo"] == 0


# -- the per-route dependency ----------------------------------------------------------------


async def test_dependency_form_guards_its_route(make_client: MakeClient) -> None:
    app, client = await make_client(paths=())
    missing = await client.post("/orders/1", json={"n": 1})
    assert missing.status_code == 400 and problem_type(missing) == "idempotency-key-missing"
    first = await client.post("/orders/1", json={"n": 1}, headers=KEY)
    replay = await client.post("/orders/1", json={"n": 1}, headers=KEY)
    assert replay.content == first.content and replay.headers["idempotent-replayed"] == "true"
    # The route template scopes the key, the concrete path is in the fingerprint.
    other = await client.post("/orders/2", json={"n": 1}, headers=KEY)
    assert other.status_code == 422
    assert app.state.calls["orders"] == 1
    bad = await client.post("/orders/1", json={"n": 1}, headers={"Idempotency-Key": ""})
    assert bad.status_code == 400


async def test_dependency_form_conflict_and_principal(make_client: MakeClient) -> None:
    _app, client = await make_client(paths=())
    a = await client.post("/tenant-orders", headers={**KEY, "X-Tenant": "a"})
    b = await client.post("/tenant-orders", headers={**KEY, "X-Tenant": "b"})
    assert a.json()["run"] == 1 and b.json()["run"] == 2
    assert a.json()["key"] == "8e03978e-40d5-43e8-bc93-6894a57f9324"
    replay = await client.post("/tenant-orders", headers={**KEY, "X-Tenant": "a"})
    assert replay.content == a.content
    no_key = await client.post("/tenant-orders")
    assert no_key.status_code == 200 and no_key.json()["key"] is None


async def test_dependency_form_openapi(make_client: MakeClient) -> None:
    _app, client = await make_client(paths=())
    spec = (await client.get("/openapi.json")).json()
    for path in ("/orders/{order_id}", "/tenant-orders"):
        operation = spec["paths"][path]["post"]
        assert any(p["name"] == "Idempotency-Key" for p in operation["parameters"])
        assert {"400", "409", "422"} <= set(operation["responses"])


async def test_works_with_a_decoding_client(
    make_client: MakeClient, redis_server: RedisServerInfo
) -> None:
    decoding = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        app, client = await make_client(redis=decoding)
        binary = bytes(range(256)) * 4
        first = await client.post("/echo", content=binary, headers=KEY)
        replay = await client.post("/echo", content=binary, headers=KEY)
        assert first.content == binary and replay.content == binary
        assert replay.headers["idempotent-replayed"] == "true" and app.state.calls["echo"] == 1
    finally:
        await decoding.aclose()


# -- Redis down ------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def stopped_redis() -> AsyncIterator[Redis]:
    server = RedisServer().start()
    client = Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    server.stop()
    try:
        yield client
    finally:
        await client.aclose()
        server.cleanup()


async def test_redis_down_is_503_and_the_handler_does_not_run(
    make_client: MakeClient, stopped_redis: Redis
) -> None:
    app, client = await make_client(redis=stopped_redis)
    response = await client.post("/items", json={}, headers=KEY)
    assert response.status_code == 503 and problem_type(response) == "redis-unavailable"
    assert "retry-after" in response.headers
    assert app.state.calls["items"] == 0
    plain = await client.post("/unguarded")  # unguarded routes do not need Redis
    assert plain.status_code == 200


async def test_redis_down_fail_open_runs_unprotected(
    make_client: MakeClient, stopped_redis: Redis, settings_override: Callable[..., None]
) -> None:
    settings_override(idempotency_failure_mode="open")
    app, client = await make_client(redis=stopped_redis)
    response = await client.post("/items", json={}, headers=KEY)
    assert response.status_code == 201 and response.headers["idempotency-stored"] == "false"
    assert app.state.calls["items"] == 1


async def test_stats_count_what_happened(make_client: MakeClient) -> None:
    app, client = await make_client()
    await client.post("/items", json={}, headers=KEY)
    await client.post("/items", json={}, headers=KEY)
    await client.post("/items", json={"x": 1}, headers=KEY)
    middleware = _middleware(app)
    assert middleware.stats["executed"] == 1
    assert middleware.stats["replayed"] == 1
    assert middleware.stats["mismatches"] == 1


def _middleware(app: FastAPI) -> IdempotencyMiddleware:
    layer: Any = app.middleware_stack
    while not isinstance(layer, IdempotencyMiddleware):
        layer = layer.app
    return layer
