"""Issue 16 attacks 2, 3, 5, 6, 7 and issue 17 item 7, replayed as an attacker would.

One app, stacked by ``install_toolkit`` on a real Redis, driven through ASGI
(httpx ``ASGITransport``, lifespan included). Each test has a victim and an
attacker (or a caller and the condition it must not be fooled by); the
victim's data never appears in the attacker's answer.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from redis.asyncio import Redis
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.problems import install_problem_handlers
from app.core.errors import ConfigurationError
from app.core.redis import redis_lifespan
from app.http.caller import set_principal
from app.middleware.http_cache import HttpCacheMiddleware, HttpCachePolicy
from app.middleware.idempotency import IdempotencyMiddleware
from app.middleware.rate_limit import RateLimitMiddleware, RateLimitRule
from app.middleware.sessions import SessionMiddleware, load_session
from app.middleware.stack import SAFE_ORDER, install_toolkit, toolkit_order

SECRET = "attack-test-session-secret-0123456789abcdef"
KEY = '"3f1c8a2e-attack-key"'
BIG = 2 * 1024 * 1024

AppClientFactory = Callable[..., Awaitable[httpx.AsyncClient]]


@dataclass
class _State:
    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    busy_status: int | None = None
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    gate: asyncio.Event = field(default_factory=asyncio.Event)


async def _who(request: Request) -> str:
    """The route's own idea of the caller: API key, else the session's user."""
    key = request.headers.get("x-api-key")
    if key:
        return key
    if "session" in request.scope:
        session = await load_session(request)
        return str(session.get("user", "anonymous"))
    return "anonymous"


TOKENS = {"token-1": "alice", "token-2-refreshed": "alice", "token-3": "bob"}


class BearerAuth:
    """The app's own authentication, outermost: declares the principal of a valid token."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            token = Headers(scope=scope).get("authorization", "").removeprefix("Bearer ")
            if token in TOKENS:
                set_principal(scope, TOKENS[token])
        await self.app(scope, receive, send)


def build_app(layers: tuple[str, ...] = SAFE_ORDER, *, auth: bool = False) -> FastAPI:
    """The attacked service: orders (idempotent), account and form pages (cached), sessions."""
    app = FastAPI(lifespan=redis_lifespan())
    install_problem_handlers(app)
    state = _State()
    app.state.t = state

    @app.post("/login")
    async def login(request: Request, user: str) -> dict[str, str]:
        session = await load_session(request)
        session["user"] = user
        session.regenerate()
        return {"user": user}

    @app.post("/orders")
    async def create_order(request: Request) -> JSONResponse:
        state.calls["orders"] += 1
        who = await _who(request)
        body = (await request.body()).decode()
        return JSONResponse(
            {
                "order": state.calls["orders"],
                "owner": who,
                "card": f"{who}-card-4242",
                "body": body,
            },
            status_code=201,
            headers={"Location": f"/orders/{state.calls['orders']}"},
        )

    @app.get("/account")
    async def account(request: Request) -> dict[str, Any]:
        state.calls["account"] += 1
        who = request.headers.get("x-api-key") or "nobody"
        return {"owner": who, "balance": f"{who}-balance-1000"}

    @app.get("/form")
    async def form(request: Request) -> dict[str, str]:
        state.calls["form"] += 1
        session = await load_session(request)
        if "csrf" not in session:
            session["csrf"] = f"csrf-{state.calls['form']}"
        return {"csrf": session["csrf"]}

    @app.post("/note")
    async def note(request: Request, text: str) -> dict[str, str]:
        state.calls["note"] += 1
        session = await load_session(request)
        session["note"] = text
        if text == "slow":
            state.entered.set()
            await state.gate.wait()
        return {"note": text}

    @app.post("/busy")
    async def busy() -> Response:
        state.calls["busy"] += 1
        if state.busy_status is not None:
            return JSONResponse(
                {"busy": True}, status_code=state.busy_status, headers={"Retry-After": "7"}
            )
        return JSONResponse({"done": state.calls["busy"]}, status_code=201)

    @app.post("/accepted")
    async def accepted() -> Response:
        state.calls["accepted"] += 1
        return JSONResponse(
            {"job": state.calls["accepted"]}, status_code=202, headers={"Retry-After": "3"}
        )

    @app.post("/big")
    async def big() -> Response:
        state.calls["big"] += 1
        return Response(b"x" * BIG, status_code=201, media_type="application/octet-stream")

    options: dict[str, Any] = {
        "rate_limit": {"rules": [RateLimitRule("*", "1000/minute")]},
        "idempotency": {"paths": ["/orders", "/note", "/busy", "/accepted", "/big"]},
        "http_cache": {"paths": ["/account", "/form"], "policy": HttpCachePolicy(ttl=60)},
        "sessions": {"secret_key": SECRET},
    }
    install_toolkit(app, **{name: options[name] for name in layers})
    if auth:
        app.add_middleware(BearerAuth)
    return app


@dataclass
class Service:
    app: FastAPI
    first: httpx.AsyncClient
    extra: list[httpx.AsyncClient]

    @property
    def state(self) -> _State:
        state: _State = self.app.state.t
        return state

    def client(self, address: str = "127.0.0.1") -> httpx.AsyncClient:
        """Another browser (own cookie jar) on the same running app."""
        transport = httpx.ASGITransport(app=self.app, client=(address, 40000))
        client = httpx.AsyncClient(transport=transport, base_url="http://testserver")
        self.extra.append(client)
        return client


@pytest_asyncio.fixture
async def service(
    real_redis: Redis, make_app_client: AppClientFactory
) -> AsyncIterator[Callable[..., Awaitable[Service]]]:
    made: list[Service] = []

    async def make(layers: tuple[str, ...] = SAFE_ORDER, *, auth: bool = False) -> Service:
        app = build_app(layers, auth=auth)
        first = await make_app_client(app, real_redis)
        svc = Service(app, first, [])
        made.append(svc)
        return svc

    yield make
    for svc in made:
        for client in svc.extra:
            await client.aclose()


def idem(**headers: str) -> dict[str, str]:
    return {"Idempotency-Key": KEY, **headers}


async def session_cookie(client: httpx.AsyncClient, user: str) -> None:
    response = await client.post("/login", params={"user": user})
    assert response.status_code == 200 and "session" in client.cookies


# -- attack 2: idempotency records shared by callers without Authorization ------------------


@pytest.mark.parametrize("credential", ["session", "x-api-key"])
async def test_same_key_and_body_from_two_users_never_replays_across_them(
    service: Callable[..., Awaitable[Service]], credential: str
) -> None:
    svc = await service()
    alice, bob = svc.client(), svc.client()
    if credential == "session":
        await session_cookie(alice, "alice")
        await session_cookie(bob, "bob")
        alice_headers, bob_headers = idem(), idem()
    else:
        alice_headers, bob_headers = idem(**{"X-API-Key": "alice"}), idem(**{"X-API-Key": "bob"})
    body = {"amount": 100}
    victim = await alice.post("/orders", json=body, headers=alice_headers)
    assert victim.status_code == 201 and victim.json()["owner"] == "alice"
    attacker = await bob.post("/orders", json=body, headers=bob_headers)
    assert attacker.status_code == 201 and "idempotent-replayed" not in attacker.headers
    assert attacker.json()["owner"] == "bob" and "alice" not in attacker.text
    # other body, same key: the attacker learns nothing (no 422 saying the key is in use)
    probe = await bob.post(
        "/orders", json={"amount": 1}, headers={**bob_headers, "Idempotency-Key": '"k2"'}
    )
    other_body = await bob.post("/orders", json={"amount": 5}, headers=bob_headers)
    assert probe.status_code == 201 and other_body.status_code == 422  # bob's own key, reused
    fresh = await svc.client().post(
        "/orders", json={"amount": 5}, headers=idem(**{"X-API-Key": "carol"})
    )
    assert fresh.status_code == 201 and "alice" not in fresh.text
    # the victim's own retry still replays the victim's response
    retry = await alice.post("/orders", json=body, headers=alice_headers)
    assert retry.headers["idempotent-replayed"] == "true" and retry.content == victim.content


async def test_a_key_claimed_in_advance_gives_the_attacker_nothing(
    service: Callable[..., Awaitable[Service]],
) -> None:
    svc = await service()
    attacker, victim = svc.client(), svc.client()
    planted = await attacker.post(
        "/orders", json={"amount": 1}, headers=idem(**{"X-API-Key": "mallory"})
    )
    assert planted.status_code == 201
    real = await victim.post(
        "/orders", json={"amount": 900}, headers=idem(**{"X-API-Key": "alice"})
    )
    assert real.status_code == 201 and real.json()["owner"] == "alice"
    assert "idempotent-replayed" not in real.headers
    again = await attacker.post(
        "/orders", json={"amount": 1}, headers=idem(**{"X-API-Key": "mallory"})
    )
    assert again.headers["idempotent-replayed"] == "true" and "alice" not in again.text


async def test_a_token_refresh_keeps_the_scope_and_another_principal_gets_nothing(
    service: Callable[..., Awaitable[Service]],
) -> None:
    svc = await service(auth=True)
    body = {"amount": 5}
    first = await svc.first.post("/orders", json=body, headers=idem(Authorization="Bearer token-1"))
    assert first.status_code == 201
    refreshed = await svc.first.post(
        "/orders", json=body, headers=idem(Authorization="Bearer token-2-refreshed")
    )
    assert refreshed.headers["idempotent-replayed"] == "true"
    assert refreshed.content == first.content and svc.state.calls["orders"] == 1
    bob = await svc.client().post(
        "/orders", json=body, headers=idem(Authorization="Bearer token-3")
    )
    assert bob.status_code == 201 and "idempotent-replayed" not in bob.headers
    assert svc.state.calls["orders"] == 2


async def test_a_planted_session_cookie_does_not_share_the_victims_records(
    service: Callable[..., Awaitable[Service]],
) -> None:
    svc = await service()
    attacker = svc.client()
    await session_cookie(attacker, "mallory")
    planted = attacker.cookies["session"]
    victim = svc.client()
    victim.cookies.set("session", planted)  # cookie tossing from a sibling subdomain
    body = {"amount": 700}
    paid = await victim.post("/orders", json=body, headers=idem(**{"X-API-Key": "alice"}))
    assert paid.status_code == 201 and paid.json()["owner"] == "alice"
    stolen = await attacker.post("/orders", json=body, headers=idem(**{"X-API-Key": "mallory"}))
    assert "idempotent-replayed" not in stolen.headers and "alice" not in stolen.text


# -- attack 3: the HTTP cache shares responses authenticated by X-API-Key --------------------


async def test_an_api_key_response_is_never_served_to_another_key_or_to_no_key(
    service: Callable[..., Awaitable[Service]],
) -> None:
    svc = await service()
    alice = [await svc.first.get("/account", headers={"X-API-Key": "alice"}) for _ in range(2)]
    assert [r.headers["x-cache"] for r in alice] == ["MISS", "HIT"]
    assert "public" not in alice[0].headers["cache-control"]
    assert alice[0].headers["cache-control"].startswith("private")
    bob = await svc.client().get("/account", headers={"X-API-Key": "bob"})
    keyless = await svc.client().get("/account")
    for attacker in (bob, keyless):
        assert attacker.status_code == 200 and "alice" not in attacker.text
        assert "public" not in attacker.headers["cache-control"]
    assert bob.json()["owner"] == "bob" and keyless.json()["owner"] == "nobody"


# -- attack 5: the stack breaks each other ------------------------------------------------------


async def test_a_per_session_csrf_token_is_never_served_to_another_client(
    service: Callable[..., Awaitable[Service]],
) -> None:
    svc = await service()
    victim, attacker = svc.client(), svc.client()
    token = (await victim.get("/form")).json()["csrf"]
    assert "session" in victim.cookies  # the token was bound to the victim's new session
    stolen = await attacker.get("/form")
    assert stolen.json()["csrf"] != token and stolen.headers["x-cache"] == "MISS"
    keyless = await svc.client().get("/form")
    assert keyless.json()["csrf"] not in (token, stolen.json()["csrf"])
    assert (await victim.get("/form")).json()["csrf"] == token  # the victim's own page


async def test_a_session_409_is_not_stored_as_a_success_and_its_retry_runs_again(
    service: Callable[..., Awaitable[Service]],
) -> None:
    svc = await service()
    browser = svc.client()
    await session_cookie(browser, "alice")
    other_tab = svc.client()
    other_tab.cookies = browser.cookies
    first = asyncio.create_task(browser.post("/note", params={"text": "slow"}, headers=idem()))
    await asyncio.wait_for(svc.state.entered.wait(), 10)
    # the other tab changes the same session key while the first request holds its copy
    assert (await other_tab.post("/note", params={"text": "other"})).status_code == 200
    svc.state.gate.set()
    conflicted = await first
    assert conflicted.status_code == 409
    assert conflicted.json()["type"].endswith("/session-conflict")
    runs = svc.state.calls["note"]
    retry = await browser.post("/note", params={"text": "slow"}, headers=idem())
    assert retry.status_code == 200 and "idempotent-replayed" not in retry.headers
    assert svc.state.calls["note"] == runs + 1
    replay = await browser.post("/note", params={"text": "slow"}, headers=idem())
    assert replay.headers["idempotent-replayed"] == "true" and replay.json() == {"note": "slow"}


# -- attack 6: transient answers stored for 24 hours --------------------------------------------


@pytest.mark.parametrize("status", [429, 409, 503])
async def test_a_transient_handler_answer_is_not_stored_and_the_retry_runs_again(
    service: Callable[..., Awaitable[Service]], status: int
) -> None:
    svc = await service()
    svc.state.busy_status = status
    busy = await svc.first.post("/busy", headers=idem(**{"X-API-Key": "alice"}))
    assert busy.status_code == status and busy.headers["retry-after"] == "7"
    svc.state.busy_status = None  # the condition cleared
    retry = await svc.first.post("/busy", headers=idem(**{"X-API-Key": "alice"}))
    assert retry.status_code == 201 and "idempotent-replayed" not in retry.headers
    assert svc.state.calls["busy"] == 2
    replay = await svc.first.post("/busy", headers=idem(**{"X-API-Key": "alice"}))
    assert replay.headers["idempotent-replayed"] == "true" and replay.status_code == 201


async def test_retry_after_is_kept_with_a_stored_response(
    service: Callable[..., Awaitable[Service]],
) -> None:
    svc = await service()
    first = await svc.first.post("/accepted", headers=idem(**{"X-API-Key": "alice"}))
    replay = await svc.first.post("/accepted", headers=idem(**{"X-API-Key": "alice"}))
    assert first.status_code == replay.status_code == 202
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.headers["retry-after"] == first.headers["retry-after"] == "3"
    assert svc.state.calls["accepted"] == 1


# -- attack 7: a body over the cap replays as an empty success ------------------------------


async def test_a_2_mb_response_is_never_replayed_as_an_empty_success(
    service: Callable[..., Awaitable[Service]],
) -> None:
    svc = await service()
    first = await svc.first.post("/big", headers=idem(**{"X-API-Key": "alice"}))
    assert first.status_code == 201 and len(first.content) == BIG
    retry = await svc.first.post("/big", headers=idem(**{"X-API-Key": "alice"}))
    assert not (200 <= retry.status_code < 300)
    assert retry.status_code == 410
    assert retry.headers["content-type"] == "application/problem+json"
    problem = retry.json()
    assert problem["original-status"] == 201 and "not kept" in problem["detail"]
    assert svc.state.calls["big"] == 1  # the side effect did not run twice


# -- the stack: every combination in install_toolkit's order works; a wrong one refuses -----


COMBINATIONS = [combo for size in range(1, 5) for combo in itertools.combinations(SAFE_ORDER, size)]


@pytest.mark.parametrize("layers", COMBINATIONS, ids=["+".join(c) for c in COMBINATIONS])
async def test_every_combination_in_the_toolkit_order_works(
    service: Callable[..., Awaitable[Service]], layers: tuple[str, ...]
) -> None:
    svc = await service(layers)
    assert toolkit_order(svc.app) == list(layers)
    alice, bob = svc.client(), svc.client()
    if "sessions" in layers:
        await session_cookie(alice, "alice")
    a1 = await alice.post("/orders", json={"n": 1}, headers=idem(**{"X-API-Key": "alice"}))
    a2 = await alice.post("/orders", json={"n": 1}, headers=idem(**{"X-API-Key": "alice"}))
    b1 = await bob.post("/orders", json={"n": 1}, headers=idem(**{"X-API-Key": "bob"}))
    assert a1.status_code == a2.status_code == b1.status_code == 201
    assert b1.json()["owner"] == "bob" and "alice" not in b1.text
    replayed = a2.headers.get("idempotent-replayed") == "true"
    assert replayed == ("idempotency" in layers)
    assert (a2.content == a1.content) == replayed
    g1 = await alice.get("/account", headers={"X-API-Key": "alice"})
    g2 = await alice.get("/account", headers={"X-API-Key": "alice"})
    gb = await bob.get("/account", headers={"X-API-Key": "bob"})
    assert g2.json()["owner"] == "alice" and gb.json()["owner"] == "bob"
    assert (g2.headers.get("x-cache") == "HIT") == ("http_cache" in layers)
    assert ("ratelimit" in g1.headers) == ("rate_limit" in layers)
    assert "public" not in g1.headers.get("cache-control", "")


WRONG = [
    order
    for order in itertools.permutations(("idempotency", "http_cache", "sessions"))
    if order != ("idempotency", "http_cache", "sessions")
]


@pytest.mark.parametrize("order", WRONG, ids=["-".join(o) for o in WRONG])
async def test_a_wrong_order_is_a_startup_error_naming_the_right_one(
    real_redis: Redis, make_app_client: AppClientFactory, order: tuple[str, ...]
) -> None:
    app = FastAPI(lifespan=redis_lifespan())
    classes: dict[str, Any] = {
        "idempotency": (IdempotencyMiddleware, {}),
        "http_cache": (HttpCacheMiddleware, {}),
        "sessions": (SessionMiddleware, {"secret_key": SECRET}),
    }
    for name in reversed(order):  # *order* is outermost first
        cls, kwargs = classes[name]
        app.add_middleware(cls, **kwargs)
    app.add_middleware(RateLimitMiddleware, rules=[RateLimitRule("*", "10/second")])
    with pytest.raises(ConfigurationError) as failed:
        await make_app_client(app, real_redis)
    assert "RateLimitMiddleware -> IdempotencyMiddleware -> HttpCacheMiddleware -> " in str(
        failed.value
    )
    assert "SessionMiddleware -> app" in str(failed.value)


# -- issue 17 item 7: rotation ---------------------------------------------------------------


async def test_a_retry_after_a_key_rotation_finds_its_record_and_its_cache_entry(
    service: Callable[..., Awaitable[Service]], settings_override: Callable[..., None]
) -> None:
    old, new = "old-secret-" + "o" * 40, "new-secret-" + "n" * 40
    settings_override(secret_key=old)
    svc = await service()
    alice = {"X-API-Key": "alice"}
    first = await svc.first.post("/orders", json={"n": 1}, headers=idem(**alice))
    cached = await svc.first.get("/account", headers=alice)
    assert first.status_code == 201 and cached.headers["x-cache"] == "MISS"
    settings_override(secret_key=new, secret_key_fallbacks=f'["{old}"]')
    retry = await svc.first.post("/orders", json={"n": 1}, headers=idem(**alice))
    assert retry.headers["idempotent-replayed"] == "true" and retry.content == first.content
    assert svc.state.calls["orders"] == 1
    hit = await svc.first.get("/account", headers=alice)
    assert hit.headers["x-cache"] == "HIT" and svc.state.calls["account"] == 1
    # another caller still gets nothing of alice's, under either key
    bob = await svc.first.post("/orders", json={"n": 1}, headers=idem(**{"X-API-Key": "bob"}))
    assert "idempotent-replayed" not in bob.headers and "alice" not in bob.text
    # once the old key is dropped, its records are no longer reachable
    settings_override(secret_key_fallbacks=None)
    after = await svc.first.post("/orders", json={"n": 1}, headers=idem(**alice))
    assert "idempotent-replayed" not in after.headers and svc.state.calls["orders"] == 3
