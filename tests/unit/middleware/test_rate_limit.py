"""RateLimitMiddleware, the rate_limit dependency and the IETF headers, on fakeredis."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import math
import re
import secrets
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import AsyncExitStack
from typing import Any

import fakeredis
import httpx
import pytest
import pytest_asyncio
from asgi_lifespan import LifespanManager
from fastapi import Depends, FastAPI, Header, HTTPException, WebSocket
from fastapi.responses import StreamingResponse
from starlette.requests import HTTPConnection

from app.api.deps import rate_limit
from app.api.problems import install_problem_handlers
from app.core import redis as core_redis
from app.core.errors import ConfigurationError
from app.core.keys import digest
from app.middleware.rate_limit import (
    APIKey,
    ClientIP,
    LimiterCache,
    Principal,
    RateLimitHeadersMiddleware,
    RateLimitMiddleware,
    RateLimitRule,
    first_of,
    rate_limit_headers,
    retry_after_seconds,
)
from app.services.rate_limit import Policy, RateLimitDecision, RateLimitResult

# -- a strict RFC 9651 List parser (independent of the code under test) -------


class Token(str):
    """An sf-token (told apart from an sf-string)."""


BareItem = int | float | str | bytes | bool
Member = tuple[BareItem, dict[str, BareItem]]

_NUMBER = re.compile(r"-?(\d{1,15})(?:\.(\d{1,3}))?")
_TOKEN = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*")
_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*")


class SFError(ValueError):
    pass


class _SF:
    def __init__(self, text: str) -> None:
        self.s, self.i = text, 0

    def _peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def _skip(self, chars: str) -> None:
        while self._peek() and self._peek() in chars:
            self.i += 1

    def parse_list(self) -> list[Member]:
        self._skip(" ")
        members: list[Member] = []
        while self.i < len(self.s):
            members.append((self._bare(), self._params()))
            self._skip(" \t")
            if self.i == len(self.s):
                return members
            if self._peek() != ",":
                raise SFError(f"expected ',' at {self.i} in {self.s!r}")
            self.i += 1
            self._skip(" \t")
            if self.i == len(self.s):
                raise SFError("trailing comma")
        return members

    def _params(self) -> dict[str, BareItem]:
        params: dict[str, BareItem] = {}
        while self._peek() == ";":
            self.i += 1
            self._skip(" ")
            key = _KEY.match(self.s, self.i)
            if key is None:
                raise SFError(f"bad parameter key at {self.i} in {self.s!r}")
            self.i = key.end()
            value: BareItem = True
            if self._peek() == "=":
                self.i += 1
                value = self._bare()
            params[key.group()] = value
        return params

    def _bare(self) -> BareItem:
        c = self._peek()
        if c == "-" or c.isdigit():
            number = _NUMBER.match(self.s, self.i)
            if number is None or (number.group(2) is None and len(number.group(1)) > 15):
                raise SFError(f"bad number at {self.i}")
            self.i = number.end()
            return float(number.group()) if number.group(2) else int(number.group())
        if c == '"':
            out, self.i = [], self.i + 1
            while True:
                ch = self._peek()
                if ch == "":
                    raise SFError("unterminated string")
                self.i += 1
                if ch == "\\":
                    nxt = self._peek()
                    if nxt not in ('"', "\\"):
                        raise SFError("bad escape")
                    out.append(nxt)
                    self.i += 1
                elif ch == '"':
                    return "".join(out)
                elif not 0x20 <= ord(ch) <= 0x7E:
                    raise SFError("non-printable character in string")
                else:
                    out.append(ch)
        if c == ":":
            end = self.s.index(":", self.i + 1)
            data = base64.b64decode(self.s[self.i + 1 : end], validate=True)
            self.i = end + 1
            return data
        if c == "?":
            flag = self.s[self.i + 1 : self.i + 2]
            if flag not in ("0", "1"):
                raise SFError("bad boolean")
            self.i += 2
            return flag == "1"
        token = _TOKEN.match(self.s, self.i)
        if token is None:
            raise SFError(f"unexpected {c!r} at {self.i} in {self.s!r}")
        self.i = token.end()
        return Token(token.group())


def parse_sf_list(text: str) -> list[Member]:
    """Parse a Structured Fields List (RFC 9651 section 4.2.1) or raise SFError."""
    return _SF(text).parse_list()


def check_ratelimit_headers(
    response: httpx.Response,
) -> tuple[dict[str, dict[str, BareItem]], dict[str, dict[str, BareItem]]]:
    """Validate RateLimit-Policy / RateLimit / Retry-After / 429 body against the draft;
    returns ``(policies, limits)`` as ``{name: parameters}``."""
    policy_lines = response.headers.get_list("ratelimit-policy")
    limit_lines = response.headers.get_list("ratelimit")
    policies: dict[str, dict[str, BareItem]] = {}
    if policy_lines:
        members = parse_sf_list(", ".join(policy_lines))
        assert members, "RateLimit-Policy must be a non-empty list"
        for name, params in members:
            assert isinstance(name, str) and not isinstance(name, Token), name  # an sf-string
            q = params["q"]
            assert isinstance(q, int) and not isinstance(q, bool) and q >= 0
            if "w" in params:
                w = params["w"]
                assert isinstance(w, int) and not isinstance(w, bool) and w > 0
            if "qu" in params:
                assert params["qu"] in ("requests", "content-bytes", "concurrent-requests")
                assert not isinstance(params["qu"], Token)
            if "pk" in params:
                assert isinstance(params["pk"], bytes)
            policies[name] = params
    limits: dict[str, dict[str, BareItem]] = {}
    if limit_lines:
        for name, params in parse_sf_list(", ".join(limit_lines)):
            assert isinstance(name, str) and not isinstance(name, Token), name
            assert name in policies, f"{name!r} is not in RateLimit-Policy"
            r = params["r"]
            assert isinstance(r, int) and not isinstance(r, bool) and r >= 0
            if "t" in params:
                t = params["t"]
                assert isinstance(t, int) and not isinstance(t, bool) and t >= 0
            limits[name] = params
    if response.status_code == 429:
        retry = response.headers["retry-after"]
        assert re.fullmatch(r"\d+", retry), retry  # delay-seconds
        assert all(int(retry) >= int(p.get("t", 0)) for p in limits.values())
        body = response.json()
        assert response.headers["content-type"] == "application/problem+json"
        assert body["type"] == "https://iana.org/assignments/http-problem-types#quota-exceeded"
        assert body["status"] == 429
        assert sorted(body["violated-policies"]) == sorted(limits)
    return policies, limits


def test_the_parser_itself_refuses_malformed_fields() -> None:
    assert parse_sf_list('"a";q=1;w=2, b;r=-3;x=?1;y=:aGk=:;z="q\\"x"') == [
        ("a", {"q": 1, "w": 2}),
        ("b", {"r": -3, "x": True, "y": b"hi", "z": 'q"x'}),
    ]
    for bad in ('"a";q=1,', '"a" "b"', '"a";Q=1', '"a;q=1', '"a";q=1.2345', "a;q=@"):
        with pytest.raises(SFError):
            parse_sf_list(bad)


# -- fixtures -----------------------------------------------------------------


@pytest.fixture
def redis(fake_client: Any) -> Any:
    return fake_client


Serve = Callable[..., Any]


@pytest_asyncio.fixture
async def serve(redis: Any) -> AsyncIterator[Serve]:
    """``client = await serve(app, peer=("1.2.3.4", 5))``: the app (lifespan running) over
    ASGI with the global client set to the test's fakeredis; one client per peer address."""
    core_redis.redis_client = redis
    stack = AsyncExitStack()
    started: dict[int, Any] = {}

    async def make(
        app: FastAPI, peer: tuple[str, int] = ("127.0.0.1", 50000), **transport: Any
    ) -> httpx.AsyncClient:
        if id(app) not in started:
            started[id(app)] = await stack.enter_async_context(LifespanManager(app))
        asgi = httpx.ASGITransport(app=started[id(app)].app, client=peer, **transport)
        return await stack.enter_async_context(
            httpx.AsyncClient(transport=asgi, base_url="http://testserver")
        )

    async with stack:
        yield make


def build_app(*rules: RateLimitRule, **options: Any) -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/items/{item_id}")
    async def get_item(item_id: str) -> dict[str, str]:
        return {"item": item_id}

    @app.post("/items/{item_id}")
    async def post_item(item_id: str) -> dict[str, str]:
        return {"posted": item_id}

    @app.get("/admin/{rest:path}")
    async def admin(rest: str) -> dict[str, str]:
        return {"admin": rest}

    @app.get("/missing")
    async def missing() -> None:
        raise HTTPException(404, "no such thing")

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"chunk{i};".encode()

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.get("/crash")
    async def crash() -> None:
        raise RuntimeError("handler bug")

    @app.websocket("/ws")
    async def ws(socket: WebSocket) -> None:
        await socket.accept()
        await socket.send_text("hello")
        await socket.close()

    app.add_middleware(RateLimitMiddleware, rules=list(rules), **options)
    return app


async def statuses(client: httpx.AsyncClient, path: str, n: int, **kw: Any) -> list[int]:
    return [(await client.get(path, **kw)).status_code for _ in range(n)]


# -- headers ------------------------------------------------------------------


async def test_headers_follow_the_draft_on_allowed_and_refused_responses(serve: Serve) -> None:
    client = await serve(build_app(RateLimitRule("/items/{item_id}", "burst=2/minute;daily=5/day")))
    first = await client.get("/items/1")
    assert first.status_code == 200
    policies, limits = check_ratelimit_headers(first)
    assert policies == {"burst": {"q": 2, "w": 60}, "daily": {"q": 5, "w": 86400}}
    assert limits["burst"]["r"] == 1 and limits["daily"]["r"] == 4
    assert first.headers["ratelimit-policy"] == '"burst";q=2;w=60, "daily";q=5;w=86400'
    assert re.fullmatch(r'"burst";r=1;t=\d+, "daily";r=4;t=\d+', first.headers["ratelimit"])

    await client.get("/items/2")
    refused = await client.get("/items/3")
    assert refused.status_code == 429
    policies, limits = check_ratelimit_headers(refused)
    assert list(limits) == ["burst"]  # only what was violated; daily is untouched
    assert refused.json()["violated-policies"] == ["burst"]
    assert refused.json()["instance"] == "/items/3"
    assert 29 <= int(refused.headers["retry-after"]) <= 30  # GCRA: one unit every 30 s


@pytest.mark.parametrize(
    ("retry", "reset", "expected"),
    [(0.0001, 0.0001, 1), (0.2, 0.2, 1), (1.0, 1.0, 1), (1.01, 1.01, 2), (1.5, 2.5, 3)],
)
def test_retry_after_is_whole_seconds_rounded_up_and_never_before_t(
    retry: float, reset: float, expected: int
) -> None:
    policy = Policy(1, 60, name="p")
    result = RateLimitResult(policy, False, 1, 0, reset, retry)
    decision = RateLimitDecision(False, (result,), "u", 1)
    assert retry_after_seconds(decision) == expected
    header = dict(rate_limit_headers([decision]))["RateLimit"]
    assert int(header.rsplit("t=", 1)[1]) <= expected


def test_header_values_for_concurrency_sub_second_and_degraded_policies() -> None:
    slots = Policy(2, name="slots", unit="concurrent-requests")
    fast = Policy(5, 0.5, name="fast")
    allowed = RateLimitDecision(
        True,
        (
            RateLimitResult(slots, True, 2, 1, 0.0, 0.0),
            RateLimitResult(fast, True, 5, 4, 0.1, 0.0),
        ),
        "u",
        1,
    )
    headers = dict(rate_limit_headers([allowed], legacy=True))
    assert headers["RateLimit-Policy"] == '"slots";q=2;qu="concurrent-requests", "fast";q=5'
    assert headers["RateLimit"] == '"slots";r=1, "fast";r=4;t=1'
    assert (headers["X-RateLimit-Limit"], headers["X-RateLimit-Remaining"]) == ("2", "1")
    degraded = RateLimitDecision(True, allowed.results, "u", 1, degraded=True)
    assert [name for name, _ in rate_limit_headers([degraded])] == ["RateLimit-Policy"]


async def test_headers_land_on_error_responses_too(serve: Serve) -> None:
    client = await serve(build_app(RateLimitRule("*", "100/minute")))
    missing = await client.get("/missing")
    assert missing.status_code == 404
    assert check_ratelimit_headers(missing)[1]["100-per-minute"]["r"] == 99
    unvalidated = await client.post("/nowhere")
    assert unvalidated.status_code in (404, 405)
    assert check_ratelimit_headers(unvalidated)[1]["100-per-minute"]["r"] == 98


async def test_legacy_headers_and_no_headers(serve: Serve, redis: Any) -> None:
    legacy = await serve(build_app(RateLimitRule("*", "3/minute"), legacy_headers=True))
    response = await legacy.get("/items/1")
    assert response.headers["x-ratelimit-limit"] == "3"
    assert response.headers["x-ratelimit-remaining"] == "2"
    assert response.headers["x-ratelimit-reset"] == "20"
    quiet = await serve(build_app(RateLimitRule("*", "q=1/minute"), headers=False))
    assert "ratelimit" not in (await quiet.get("/items/1")).headers
    refused = await quiet.get("/items/1")
    assert refused.status_code == 429 and "ratelimit" not in refused.headers
    assert refused.headers["retry-after"] == "60"


async def test_streamed_bodies_pass_through_intact(serve: Serve) -> None:
    client = await serve(build_app(RateLimitRule("*", "10/minute")))
    response = await client.get("/stream")
    assert response.text == "chunk0;chunk1;chunk2;"
    assert check_ratelimit_headers(response)[1]["10-per-minute"]["r"] == 9


async def test_non_http_scopes_pass_through(serve: Serve, redis: Any) -> None:
    app = build_app(RateLimitRule("*", "1/minute"))
    await serve(app)  # the lifespan scope went through the middleware untouched
    incoming: list[dict[str, Any]] = [{"type": "websocket.connect"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "path": "/ws",
        "raw_path": b"/ws",
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "scheme": "ws",
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
        "subprotocols": [],
    }
    for _ in range(2):  # twice: a websocket is never counted against "1/minute"
        incoming[:] = [{"type": "websocket.connect"}]
        sent.clear()
        await app(scope, receive, send)
        assert [m["type"] for m in sent] == [
            "websocket.accept",
            "websocket.send",
            "websocket.close",
        ]
    assert [k async for k in redis.scan_iter("*")] == []


# -- rules --------------------------------------------------------------------


async def test_counters_are_scoped_to_the_route_template_not_the_raw_path(serve: Serve) -> None:
    client = await serve(build_app(RateLimitRule("/items/{item_id}", "2/minute", methods=["GET"])))
    assert await statuses(client, "/items/1", 1) == [200]
    assert await statuses(client, "/items/2", 1) == [200]
    assert await statuses(client, "/items/3", 1) == [429]
    assert (await client.head("/items/4")).status_code == 429  # HEAD counts as GET
    assert (await client.post("/items/5")).status_code == 200  # POST is not in this rule


async def test_two_apps_in_different_namespaces_count_separately(serve: Serve, redis: Any) -> None:
    rule = RateLimitRule("/items/{item_id}", "1/minute")
    shop = await serve(build_app(rule, namespace="shop"))
    admin = await serve(build_app(rule, namespace="admin"))
    assert await statuses(shop, "/items/1", 2) == [200, 429]
    assert await statuses(admin, "/items/1", 2) == [200, 429]  # its own quota
    keys = {k.decode() if isinstance(k, bytes) else k async for k in redis.scan_iter("*")}
    assert keys and all(k.split(":")[1] in {"shop", "admin"} for k in keys)


async def test_methods_get_their_own_quota_and_a_scope_can_be_shared(serve: Serve) -> None:
    app = build_app(
        RateLimitRule("/items/{item_id}", "1/minute", methods=["POST"]),
        RateLimitRule("/items/{item_id}", "1/minute", methods=["GET"]),
        RateLimitRule("/admin/*", "1/minute", scope="shared"),
        RateLimitRule("/stream", "1/minute", scope="shared"),
    )
    client = await serve(app)
    assert (await client.post("/items/1")).status_code == 200
    assert (await client.get("/items/1")).status_code == 200
    assert (await client.post("/items/2")).status_code == 429
    assert (await client.get("/admin/users")).status_code == 200
    assert (await client.get("/stream")).status_code == 429  # same scope, same quota


async def test_first_matching_rule_wins_and_none_exempts(serve: Serve) -> None:
    app = build_app(
        RateLimitRule("/items/free", None),
        RateLimitRule("/items/{item_id}", "1/minute"),
        RateLimitRule("*", "100/minute"),
    )
    client = await serve(app)
    assert await statuses(client, "/items/free", 3) == [200, 200, 200]
    assert "ratelimit" not in (await client.get("/items/free")).headers
    assert await statuses(client, "/items/1", 2) == [200, 429]
    assert await statuses(client, "/missing", 2) == [404, 404]


async def test_subtree_and_catch_all_patterns(serve: Serve) -> None:
    client = await serve(build_app(RateLimitRule("/admin/*", "2/minute")))
    assert await statuses(client, "/admin", 1) == [307]  # the subtree's root counts too
    assert await statuses(client, "/admin/a/b", 2) == [200, 429]
    assert await statuses(client, "/administrator", 3) == [404, 404, 404]  # not in the subtree


async def test_the_root_path_is_not_part_of_the_template(serve: Serve) -> None:
    app = build_app(RateLimitRule("/items/{item_id}", "1/minute"))
    client = await serve(app, root_path="/api")
    assert (await client.get("/api/items/1")).status_code == 200
    assert (await client.get("/api/items/2")).status_code == 429


def test_rules_are_validated_when_the_middleware_is_built() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    with pytest.raises(ValueError, match="must start with"):
        RateLimitMiddleware(app, rules=[RateLimitRule("items", "1/second")])
    with pytest.raises(ValueError, match="microsecond"):
        RateLimitMiddleware(app, rules=[RateLimitRule("*", "5000000/second")])
    with pytest.raises(ValueError, match="cannot parse"):
        RateLimitMiddleware(app, rules=[RateLimitRule("*", "lots")])


def test_rule_and_lease_errors_are_configuration_errors() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    with pytest.raises(ConfigurationError, match="must start with"):
        RateLimitMiddleware(app, rules=[RateLimitRule("items", "1/second")])
    for lease in (-1, math.nan, "60"):
        with pytest.raises(ConfigurationError, match="lease_seconds"):
            RateLimitMiddleware(app, lease_seconds=lease)  # type: ignore[arg-type]
    middleware = RateLimitMiddleware(app, lease_seconds=dt.timedelta(minutes=2))
    assert middleware.limiters.lease_seconds == 120.0
    with pytest.raises(ConfigurationError, match="need RateLimitMiddleware"):
        rate_limit("2 concurrent")


async def test_limiters_are_built_once_per_client_and_kept_with_it(redis: Any) -> None:
    cache = LimiterCache()
    rates, slots = cache.policies("3/second"), cache.policies("2 concurrent")
    other = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    try:
        first = cache.rate(redis, rates, "gcra")
        assert cache.rate(redis, rates, "gcra") is first and first.redis is redis
        second = cache.rate(other, rates, "gcra")
        assert second is not first and second.redis is other
        assert cache.rate(redis, rates, "gcra") is first  # a client switch rebuilds nothing
        assert cache.rate(redis, rates, "sliding_log") is not first
        assert cache.concurrency(redis, slots) is cache.concurrency(redis, slots)
    finally:
        await other.aclose()


async def test_a_resolver_picks_policies_per_request(serve: Serve) -> None:
    seen: list[str] = []

    async def plans(conn: HTTPConnection, identity: str) -> str | None:
        seen.append(identity)
        plan = conn.headers.get("x-plan", "free")
        return (
            None if plan == "internal" else {"free": "free=1/minute", "pro": "pro=3/minute"}[plan]
        )

    client = await serve(build_app(RateLimitRule("*", plans)))
    assert await statuses(client, "/items/1", 2) == [200, 429]
    assert await statuses(client, "/items/1", 4, headers={"x-plan": "pro"}) == [200, 200, 200, 429]
    internal = await client.get("/items/1", headers={"x-plan": "internal"})
    assert internal.status_code == 200 and "ratelimit" not in internal.headers
    assert set(seen) == {"ip:127.0.0.1"}


async def test_cost_may_depend_on_the_request(serve: Serve) -> None:
    def cost(conn: HTTPConnection) -> int:
        return 3 if conn.url.path.startswith("/admin") else 1

    client = await serve(build_app(RateLimitRule("*", "4/minute", cost=cost)))
    assert check_ratelimit_headers(await client.get("/admin/x"))[1]["4-per-minute"]["r"] == 1
    assert (await client.get("/admin/x")).status_code == 429
    assert (await client.get("/items/1")).status_code == 200


# -- identity -----------------------------------------------------------------


def scope_with(peer: str | None, *forwarded: str) -> dict[str, Any]:
    return {
        "type": "http",
        "client": (peer, 1234) if peer else None,
        "headers": [(b"x-forwarded-for", value.encode()) for value in forwarded],
    }


def test_client_ip_reads_forwarded_for_right_to_left_past_trusted_proxies() -> None:
    untrusting = ClientIP()
    assert untrusting.address(scope_with("203.0.113.9", "1.1.1.1")) == "203.0.113.9"
    proxies = ClientIP(["10.0.0.0/8", "192.168.1.1/32"])
    assert proxies.address(scope_with("203.0.113.9", "1.1.1.1")) == "203.0.113.9"  # untrusted
    assert proxies.address(scope_with("10.0.0.2", "198.51.100.7")) == "198.51.100.7"
    assert proxies.address(scope_with("10.0.0.2", "6.6.6.6, 198.51.100.7, 192.168.1.1")) == (
        "198.51.100.7"  # the spoofed left part is never read
    )
    assert proxies.address(scope_with("10.0.0.2", "6.6.6.6", "198.51.100.7")) == "198.51.100.7"
    assert proxies.address(scope_with("10.0.0.2", "10.0.0.3, 10.0.0.4")) == "10.0.0.3"
    assert proxies.address(scope_with("10.0.0.2", "bogus, 10.0.0.4")) == "10.0.0.4"
    assert proxies.address(scope_with("10.0.0.2")) == "10.0.0.2"
    assert proxies.address(scope_with("10.0.0.2", "198.51.100.7:4711")) == "198.51.100.7"
    assert proxies.address(scope_with("10.0.0.2", "[2001:db8::1]:80")) == "2001:db8::/64"
    assert proxies.address(scope_with("::ffff:10.0.0.2", "198.51.100.7")) == "198.51.100.7"
    assert ClientIP(ipv6_prefix=128).address(scope_with("2001:db8::1")) == "2001:db8::1"
    assert proxies.address(scope_with(None)) is None
    assert proxies.address(scope_with("testclient")) == "testclient"
    with pytest.raises(ValueError):
        ClientIP(["not-a-network"])


def test_client_ip_remembers_untrusted_peers_within_a_bound() -> None:
    """Answers for direct peers are remembered (one parse per peer), never a proxy's (its
    answer depends on the header), and many peers cannot grow the memory without bound."""
    proxies = ClientIP(["10.0.0.0/8"])
    for _ in range(3):
        assert proxies.address(scope_with("203.0.113.9", "1.1.1.1")) == "203.0.113.9"
        assert proxies.address(scope_with("2001:db8::1")) == "2001:db8::/64"
    assert proxies.address(scope_with("10.0.0.2", "198.51.100.7")) == "198.51.100.7"
    assert proxies.address(scope_with("10.0.0.2", "198.51.100.8")) == "198.51.100.8"
    many = [f"198.{n // 65536}.{n // 256 % 256}.{n % 256}" for n in range(10_000)]
    assert [proxies.address(scope_with(peer)) for peer in many] == many
    assert len(proxies._peers) <= 4096
    assert proxies.address(scope_with("203.0.113.9")) == "203.0.113.9"


async def test_a_spoofed_forwarded_for_from_an_untrusted_peer_changes_nothing(
    serve: Serve,
) -> None:
    app = build_app(RateLimitRule("*", "2/minute"), trusted_proxies=["10.0.0.0/8"])
    attacker = await serve(app, peer=("203.0.113.9", 1))
    assert await statuses(attacker, "/items/1", 2) == [200, 200]
    for fake in ("1.2.3.4", "10.0.0.1", "1.2.3.4, 10.0.0.1"):
        assert (
            await attacker.get("/items/1", headers={"x-forwarded-for": fake})
        ).status_code == 429
    proxy = await serve(app, peer=("10.0.0.5", 2))
    forwarded = {"x-forwarded-for": "198.51.100.1"}
    assert await statuses(proxy, "/items/1", 3, headers=forwarded) == [200, 200, 429]
    other = {"x-forwarded-for": "6.6.6.6, 198.51.100.2"}  # spoofed left part, real client right
    assert await statuses(proxy, "/items/1", 3, headers=other) == [200, 200, 429]


KNOWN_KEYS = {"secret-1", "secret-2", "k1", "k2"}


def known_key(key: str) -> bool:
    """The application's key check (a set here; a cached key-store lookup in real life)."""
    return key in KNOWN_KEYS


async def test_api_keys_principals_and_fallback_to_the_client_ip(serve: Serve, redis: Any) -> None:
    def user(conn: HTTPConnection) -> str | None:
        return conn.headers.get("x-user")

    app = build_app(
        RateLimitRule("/items/{item_id}", "1/minute", key=APIKey(validator=known_key)),
        RateLimitRule(
            "/admin/*", "1/minute", key=first_of(Principal(user), APIKey(validator=known_key))
        ),
    )
    client = await serve(app)
    assert await statuses(client, "/items/1", 2, headers={"x-api-key": "secret-1"}) == [200, 429]
    assert await statuses(client, "/items/1", 1, headers={"x-api-key": "secret-2"}) == [200]
    assert await statuses(client, "/items/1", 2) == [200, 429]  # no key: the client IP
    assert await statuses(client, "/admin/x", 2, headers={"x-user": "ann"}) == [200, 429]
    assert await statuses(client, "/admin/x", 1, headers={"x-api-key": "secret-1"}) == [200]
    keys = [k.decode() if isinstance(k, bytes) else k async for k in redis.scan_iter("*")]
    assert not any("secret" in k for k in keys)
    assert any(digest("secret-1") in k for k in keys)
    assert any("user%3Aann" in k for k in keys)


async def test_async_principals_are_awaited(serve: Serve) -> None:
    async def user(conn: HTTPConnection) -> int | None:
        await asyncio.sleep(0)
        return 42 if conn.headers.get("authorization") else None

    client = await serve(build_app(RateLimitRule("*", "1/minute", key=Principal(user))))
    assert await statuses(client, "/items/1", 2, headers={"authorization": "x"}) == [200, 429]
    assert await statuses(client, "/items/1", 1) == [200]


# -- concurrency and failures -------------------------------------------------


async def test_concurrency_slots_are_held_during_the_request_and_released_after(
    serve: Serve, redis: Any
) -> None:
    entered, release = asyncio.Event(), asyncio.Event()
    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        entered.set()
        await release.wait()
        return {"done": True}

    @app.get("/crash")
    async def crash() -> None:
        raise RuntimeError("handler bug")

    app.add_middleware(
        RateLimitMiddleware, rules=[RateLimitRule("*", "slots=1 concurrent;rate=2/minute")]
    )
    client = await serve(app)
    held = asyncio.create_task(client.get("/slow"))
    await entered.wait()
    refused = await client.get("/slow")
    assert refused.status_code == 429
    _, limits = check_ratelimit_headers(refused)
    assert limits == {"slots": {"r": 0}} and refused.headers["retry-after"] == "1"
    release.set()
    done = await held
    assert done.status_code == 200
    assert check_ratelimit_headers(done)[1]["slots"] == {"r": 0}
    assert [k async for k in redis.scan_iter("*concurrency*")] == []  # released (and emptied)
    with pytest.raises(RuntimeError):
        await client.get("/crash")
    assert [k async for k in redis.scan_iter("*concurrency*")] == []  # released on errors too
    entered.clear()
    refused_by_rate = await client.get("/slow")  # 2 counted: /slow, /crash (not the 429)
    assert refused_by_rate.status_code == 429
    assert refused_by_rate.json()["violated-policies"] == ["rate"]
    assert [k async for k in redis.scan_iter("*concurrency*")] == []  # the slot went back


async def test_redis_down_fails_open_by_default(serve: Serve, redis: Any) -> None:
    client = await serve(build_app(RateLimitRule("*", "1/minute")))
    redis.connection_pool.connection_kwargs["server"].connected = False
    responses = [await client.get("/items/1") for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert "ratelimit" not in responses[0].headers  # nothing was counted, nothing to report
    assert responses[0].headers["ratelimit-policy"] == '"1-per-minute";q=1;w=60'


async def test_redis_down_fails_closed_when_configured(
    serve: Serve, redis: Any, settings_override: Any
) -> None:
    settings_override(rate_limit_failure_mode="closed")
    client = await serve(build_app(RateLimitRule("*", "1/minute;2 concurrent")))
    redis.connection_pool.connection_kwargs["server"].connected = False
    response = await client.get("/items/1")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith("redis-unavailable")
    assert "retry-after" in response.headers
    check_ratelimit_headers(response)


# -- the dependency -----------------------------------------------------------


async def current_user(x_user: str | None = Header(default=None)) -> str | None:
    return x_user


def dependency_app(*, headers_middleware: bool) -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)
    per_ip = rate_limit("ip=3/minute")
    per_user = rate_limit("user=2/minute", key=Depends(current_user))

    @app.get("/things/{thing_id}", dependencies=[Depends(per_ip), Depends(per_user)])
    async def thing(thing_id: str) -> dict[str, str]:
        return {"thing": thing_id}

    @app.get("/decision")
    async def decision(
        checked: RateLimitDecision = Depends(rate_limit("d=5/minute;e=9/hour")),
    ) -> dict[str, Any]:
        return {"remaining": [r.remaining for r in checked.results]}

    @app.get("/fails", dependencies=[Depends(rate_limit("f=5/minute"))])
    async def fails() -> None:
        raise HTTPException(409, "conflict")

    @app.get("/shared-a", dependencies=[Depends(rate_limit("s=1/minute", scope="shared"))])
    async def shared_a() -> None:
        return None

    @app.get("/shared-b", dependencies=[Depends(rate_limit("s=1/minute", scope="shared"))])
    async def shared_b() -> None:
        return None

    async def plan(conn: HTTPConnection, identity: str) -> str | None:
        return None if conn.headers.get("x-plan") == "unlimited" else "plan=1/minute"

    @app.get("/plan", dependencies=[Depends(rate_limit(plan, key=APIKey(validator=known_key)))])
    async def by_plan() -> None:
        return None

    if headers_middleware:
        app.add_middleware(RateLimitHeadersMiddleware)
    return app


@pytest.mark.parametrize("headers_middleware", [True, False], ids=["middleware", "response"])
async def test_stacked_dependencies_emit_every_policy(
    serve: Serve, headers_middleware: bool
) -> None:
    client = await serve(dependency_app(headers_middleware=headers_middleware))
    ann = {"x-user": "ann"}
    first = await client.get("/things/1", headers=ann)
    assert first.status_code == 200
    policies, limits = check_ratelimit_headers(first)
    assert set(policies) == {"ip", "user"}
    assert (limits["ip"]["r"], limits["user"]["r"]) == (2, 1)
    assert (await client.get("/things/2", headers=ann)).status_code == 200  # template scope
    refused = await client.get("/things/3", headers=ann)
    assert refused.status_code == 429
    assert refused.json()["violated-policies"] == ["user"]
    check_ratelimit_headers(refused)
    # Stacked dependencies are separate checks, run in order: ann's refused third request
    # had already spent this IP's third unit (one rate_limit() with several policies on
    # one identity is all-or-nothing; see the docs).
    bob = await client.get("/things/4", headers={"x-user": "bob"})
    assert bob.status_code == 429 and bob.json()["violated-policies"] == ["ip"]


@pytest.mark.parametrize("headers_middleware", [True, False], ids=["middleware", "response"])
async def test_the_dependency_returns_its_decision_and_scopes_can_be_shared(
    serve: Serve, headers_middleware: bool
) -> None:
    client = await serve(dependency_app(headers_middleware=headers_middleware))
    assert (await client.get("/decision")).json() == {"remaining": [4, 8]}
    assert (await client.get("/shared-a")).status_code == 200
    assert (await client.get("/shared-b")).status_code == 429
    assert await statuses(client, "/plan", 2, headers={"x-api-key": "k1"}) == [200, 429]
    assert await statuses(client, "/plan", 1, headers={"x-api-key": "k2"}) == [200]
    unlimited = await client.get("/plan", headers={"x-plan": "unlimited", "x-api-key": "k1"})
    assert unlimited.status_code == 200 and "ratelimit" not in unlimited.headers


async def test_dependency_headers_reach_error_responses_through_the_middleware(
    serve: Serve,
) -> None:
    client = await serve(dependency_app(headers_middleware=True))
    response = await client.get("/fails")
    assert response.status_code == 409
    assert check_ratelimit_headers(response)[1]["f"]["r"] == 4


async def test_dependency_decisions_share_the_rate_limit_middlewares_headers(
    serve: Serve,
) -> None:
    app = dependency_app(headers_middleware=False)
    app.add_middleware(RateLimitMiddleware, rules=[RateLimitRule("/decision", "m=10/minute")])
    client = await serve(app)
    response = await client.get("/decision")
    assert set(check_ratelimit_headers(response)[0]) == {"m", "d", "e"}
    assert len(response.headers.get_list("ratelimit")) == 1  # one field, no duplicates


async def test_the_dependency_fails_closed_with_503(
    serve: Serve, redis: Any, settings_override: Any
) -> None:
    settings_override(rate_limit_failure_mode="closed")
    client = await serve(dependency_app(headers_middleware=True))
    redis.connection_pool.connection_kwargs["server"].connected = False
    response = await client.get("/decision")
    assert response.status_code == 503
    assert response.json()["type"].endswith("redis-unavailable")


def test_the_dependency_refuses_concurrency_policies() -> None:
    with pytest.raises(ValueError, match="RateLimitMiddleware"):
        rate_limit("2 concurrent")
    with pytest.raises(ValueError, match="microsecond"):
        rate_limit("5000000/second")


# -- the demo service ---------------------------------------------------------


async def test_demo_routes(app_client: httpx.AsyncClient) -> None:
    assert await statuses(app_client, "/limits/ip", 6) == [200] * 5 + [429]
    alice = {"X-User": "alice"}
    assert await statuses(app_client, "/limits/user", 6, headers=alice) == [200] * 5 + [429]
    status = (await app_client.get("/limits/user/status", headers=alice)).json()
    assert status["policies"][0]["remaining"] == 0 and status["identity"].endswith("user:alice")
    assert await statuses(app_client, "/limits/user", 1, headers={"X-User": "bob"}) == [200]
    stacked = [await app_client.get("/limits/stacked") for _ in range(3)]
    assert [r.status_code for r in stacked] == [200, 200, 429]
    assert stacked[1].json()["policies"][1]["remaining"] == 18
    assert check_ratelimit_headers(stacked[2])[1] == {"burst": {"r": 0, "t": 1}}
    assert await statuses(app_client, "/limits/plan", 4) == [200, 200, 200, 429]
    pro = {"X-Plan": "pro"}
    assert await statuses(app_client, "/limits/plan", 4, headers=pro) == [200] * 4
    slow = [app_client.get("/limits/concurrency", params={"seconds": 0.3}) for _ in range(3)]
    assert sorted(r.status_code for r in await asyncio.gather(*slow)) == [200, 200, 429]
    assert (await app_client.get("/limits/concurrency", params={"seconds": 0})).status_code == 200


async def test_a_silent_middleware_leaves_dependency_headers_to_the_response(
    serve: Serve,
) -> None:
    app = dependency_app(headers_middleware=False)
    app.add_middleware(
        RateLimitMiddleware, rules=[RateLimitRule("/decision", "m=10/minute")], headers=False
    )
    client = await serve(app)
    response = await client.get("/decision")
    assert set(check_ratelimit_headers(response)[0]) == {"d", "e"}  # the middleware's "m" is silent


# -- unvalidated identities (issue 16, attack 8) --------------------------------


def test_an_api_key_identity_without_a_validator_is_refused_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="validator"):
        APIKey()
    with pytest.raises(ConfigurationError, match="validator"):
        APIKey("x-token", validator=None)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_random_api_keys_do_not_buy_fresh_quotas(serve: Serve, asynchronous: bool) -> None:
    async def known_async(key: str) -> bool:
        await asyncio.sleep(0)
        return key in KNOWN_KEYS

    validator = known_async if asynchronous else known_key
    key = first_of(APIKey(validator=validator), ClientIP())
    client = await serve(build_app(RateLimitRule("*", "3/minute", key=key)))
    attacker = [
        (await client.get("/items/1", headers={"x-api-key": secrets.token_hex(8)})).status_code
        for _ in range(10)
    ]
    assert attacker == [200] * 3 + [429] * 7  # every refused key falls back to one address
    # a valid key is its own identity, untouched by the attacker's spending
    assert await statuses(client, "/items/1", 4, headers={"x-api-key": "secret-1"}) == [
        *[200] * 3,
        429,
    ]


async def test_a_validator_returning_a_principal_keys_every_key_of_the_account_together(
    serve: Serve, redis: Any
) -> None:
    accounts = {"ak-1": "acme", "ak-2": "acme", "ak-3": "initech"}
    key = APIKey(validator=accounts.get)
    client = await serve(build_app(RateLimitRule("*", "2/minute", key=key)))
    assert await statuses(client, "/items/1", 1, headers={"x-api-key": "ak-1"}) == [200]
    assert await statuses(client, "/items/1", 2, headers={"x-api-key": "ak-2"}) == [200, 429]
    assert await statuses(client, "/items/1", 1, headers={"x-api-key": "ak-3"}) == [200]
    keys = [k.decode() if isinstance(k, bytes) else k async for k in redis.scan_iter("*")]
    assert any("acme" in k for k in keys) and not any("ak-" in k for k in keys)
