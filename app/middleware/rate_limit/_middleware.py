"""Pure ASGI rate limiting with the IETF ``RateLimit`` header fields.

``RateLimitMiddleware`` checks each HTTP request against the first rule whose
method and path template match, before routing::

    app.add_middleware(
        RateLimitMiddleware,
        rules=[
            RateLimitRule("/healthz", None),                       # exempt
            RateLimitRule("/login", "5/minute", methods=["POST"]),
            RateLimitRule("/items/{item_id}", "burst=10/second;daily=1000/day"),
            RateLimitRule("/reports/*", "2 concurrent", key=APIKey(validator=check_key)),
            RateLimitRule("*", plan_resolver, key=first_of(APIKey(validator=check_key), ClientIP())),
        ],
        trusted_proxies=["10.0.0.0/8"],
    )

Route templates, not raw paths: the middleware runs before FastAPI routes
the request, so it matches rule templates itself (Starlette's path syntax,
``{param}``, ``{param:path}``, a trailing ``/*`` for a subtree, ``*`` for
everything) and scopes each counter to the *rule* (``"GET /items/{item_id}"``),
never to the raw path: ``/items/1`` and ``/items/2`` share one quota. (FastAPI
0.165 no longer exposes the matched route to code that runs before routing,
so resolving templates through ``app.router`` would mean relying on its
private objects.) The per-route dependency (``app.api.deps.rate_limit``)
runs after routing and scopes to the template FastAPI resolved.

Identity (``key=``): ``ClientIP`` (peer address; ``X-Forwarded-For`` is read
right to left and only trusted proxies are skipped, so a spoofed header from
an untrusted peer changes nothing), ``APIKey(validator=...)`` (only a key the
validator accepts identifies the caller; hashed, never stored raw),
``Principal`` (any callable returning a user id an authentication layer
established) and ``first_of(...)``. A key that finds nothing (no key, or a
key the validator refused) falls back to the client IP. Never key a limit by a
value the client picks freely and nobody checked: each random value would
start a fresh quota, so ``APIKey`` has no unvalidated form.

Headers (draft-ietf-httpapi-ratelimit-headers): every response of a checked
request carries ``RateLimit-Policy: "burst";q=10;w=1, ...`` and
``RateLimit: "burst";r=9;t=1, ...``, errors included. A refusal is a 429
``application/problem+json`` (type ``...#quota-exceeded`` with
``violated-policies``) whose ``RateLimit`` lists the violated policies and
whose ``Retry-After`` is whole seconds, rounded up, never earlier than any
``t`` it carries. ``legacy_headers=True`` adds ``X-RateLimit-Limit``,
``-Remaining`` and ``-Reset`` (delta seconds) for the most constrained policy.

Redis down: fail-open by default (the request goes through, no ``RateLimit``
field since nothing was counted); ``failure_mode="closed"`` (or
``RATE_LIMIT_FAILURE_MODE=closed``) answers 503 problem+json.

Decisions made by the per-route dependency are collected in the ASGI scope
and written by whichever of ``RateLimitMiddleware`` / ``RateLimitHeadersMiddleware``
is outermost, so dependency limits get their headers on every response too.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from fastapi import Request, Response
from fastapi.params import Depends as DependsParam
from starlette.requests import HTTPConnection
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.config import FailureMode
from app.core.errors import ConfigurationError, RateLimitExceeded, RedisUnavailable
from app.core.keys import digest
from app.core.redis import AnyRedis, get_redis
from app.http.client_ip import ClientIP
from app.http.problems import send_problem
from app.services.rate_limit import (
    Algorithm,
    ConcurrencyLimiter,
    RateLimitDecision,
    RateLimiter,
    RateLimitResult,
    validate_policies,
)
from app.services.rate_limit_policy import Policy, PolicyLike, as_policies

__all__ = [
    "APIKey",
    "ClientIP",
    "KeyFunc",
    "KeyValidator",
    "LimiterCache",
    "PolicyResolver",
    "Principal",
    "RateLimitHeadersMiddleware",
    "RateLimitMiddleware",
    "RateLimitRule",
    "attach_decision",
    "first_of",
    "identify",
    "rate_limit",
    "rate_limit_headers",
    "rejection",
    "retry_after_seconds",
]

KeyFunc: TypeAlias = Callable[[HTTPConnection], "str | Awaitable[str | None] | None"]
"""Who is asking: ``(conn) -> identity`` (sync or async); None means "not known here"."""

PolicyResolver: TypeAlias = Callable[[HTTPConnection, str], Awaitable["PolicyLike | None"]]
"""``async (conn, identity) -> policies`` per request (plans, tenants); None: no limit."""

log = logging.getLogger("app.rate_limit")

_HOLDER = "app.rate_limit"
_ANONYMOUS = "anonymous"


# -- identity -----------------------------------------------------------------


KeyValidator: TypeAlias = Callable[[str], Any]
"""``(api_key) -> bool | principal`` (sync or async): does this key belong to a caller?"""


class APIKey:
    """The caller named by a *validated* API key header (the raw key never reaches Redis).

    Args:
        validator: ``(key) -> result`` (sync or async), called with the header's
            value on every checked request. ``True`` -> the identity is
            ``"key:<sha256 prefix of the key>"``; a principal (a user or account
            id, anything else truthy) -> ``"user:<principal>"``, so every key of
            one account shares its quota, as with ``Principal``; ``False`` /
            ``None`` -> no identity here (``first_of`` tries the next key
            function, the limit falls back to the client IP). Make it cheap
            (an in-process cache in front of your key store): it runs before
            the request is counted. Its exceptions propagate.
        header: the header carrying the key (default ``X-API-Key``).

    Required: an API-key identity that nobody checked lets a client send a
    fresh random key with every request and get a fresh quota each time, so
    ``APIKey()`` without a validator raises ``ConfigurationError``. When an
    authentication layer in front already rejects bad keys, key the limit by
    what it established (``Principal(...)``) instead.
    """

    __slots__ = ("_header", "_validator")

    def __init__(self, header: str = "x-api-key", *, validator: KeyValidator | None = None) -> None:
        if validator is None or not callable(validator):
            raise ConfigurationError(
                "APIKey() needs validator=...: an unvalidated API key lets every random "
                "X-API-Key value start a fresh quota. Pass a function (sync or async) that "
                "returns True, or the caller's principal, for a valid key and False otherwise, "
                "or key the limit by Principal(...) set by your authentication"
            )
        self._header = header
        self._validator = validator

    async def __call__(self, conn: HTTPConnection) -> str | None:
        value = conn.headers.get(self._header)
        if not value:
            return None
        verdict = self._validator(value)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        if verdict is True:
            return "key:" + digest(value)
        if verdict is None or verdict is False or verdict == "":
            return None
        return f"user:{verdict}"


class Principal:
    """A user or principal id from *getter* as ``"user:<id>"``.

    *getter* is ``(conn) -> id | None`` (sync or async): read ``conn.scope["user"]``
    set by an authentication middleware, decode a token, look up a session...
    """

    __slots__ = ("_getter",)

    def __init__(self, getter: Callable[[HTTPConnection], Any]) -> None:
        self._getter = getter

    async def __call__(self, conn: HTTPConnection) -> str | None:
        value = self._getter(conn)
        if inspect.isawaitable(value):
            value = await value
        return None if value is None or value == "" else f"user:{value}"


def first_of(*keys: KeyFunc) -> KeyFunc:
    """A key function answering with the first of *keys* that identifies the request."""

    async def key(conn: HTTPConnection) -> str | None:
        for candidate in keys:
            found = candidate(conn)
            if inspect.isawaitable(found):
                found = await found
            if found:
                return found
        return None

    return key


async def identify(conn: HTTPConnection, key: KeyFunc | None) -> str:
    """Run *key*, falling back to the client IP (the scope's configured one) and then
    to a shared ``"anonymous"`` bucket."""
    if key is not None:
        found = key(conn)
        if inspect.isawaitable(found):
            found = await found
        if found:
            return found
    holder = conn.scope.get(_HOLDER)
    client_ip = holder.client_ip if isinstance(holder, _Holder) else _PEER
    return client_ip(conn) or _ANONYMOUS


_PEER = ClientIP()


# -- headers ------------------------------------------------------------------


def _policy_item(policy: Policy) -> str:
    item = f'"{policy.name}";q={policy.limit}'
    if policy.is_concurrency:
        return item + ';qu="concurrent-requests"'
    window = policy.window or 0.0
    if window >= 1 and window == int(window):
        item += f";w={int(window)}"
    return item


def _limit_item(result: RateLimitResult) -> str:
    item = f'"{result.name}";r={result.remaining}'
    if result.policy.is_concurrency:
        return item
    return item + f";t={math.ceil(result.reset_after)}"


def _shown(decision: RateLimitDecision) -> tuple[RateLimitResult, ...]:
    return decision.results if decision.allowed else decision.violated


def rate_limit_headers(
    decisions: Iterable[RateLimitDecision], *, legacy: bool = False
) -> list[tuple[str, str]]:
    """``RateLimit-Policy`` and ``RateLimit`` (plus ``X-RateLimit-*`` if *legacy*) fields.

    An allowed decision reports all its policies; a refused one reports in
    ``RateLimit`` only the policies it violated (their ``t`` never exceeds
    ``Retry-After``); a degraded one (Redis down) only its policies.
    ``Retry-After`` itself is left to the caller (``retry_after_seconds``).
    """
    policy_items: list[str] = []
    limit_items: list[str] = []
    shown: list[RateLimitResult] = []
    for decision in decisions:
        policy_items.extend(_policy_item(r.policy) for r in decision.results)
        if decision.degraded:
            continue
        results = _shown(decision)
        limit_items.extend(_limit_item(r) for r in results)
        shown.extend(results)
    headers: list[tuple[str, str]] = []
    if policy_items:
        headers.append(("RateLimit-Policy", ", ".join(policy_items)))
    if limit_items:
        headers.append(("RateLimit", ", ".join(limit_items)))
    if legacy and shown:
        tightest = min(shown, key=lambda r: (r.remaining, -r.reset_after))
        headers += [
            ("X-RateLimit-Limit", str(tightest.limit)),
            ("X-RateLimit-Remaining", str(tightest.remaining)),
            ("X-RateLimit-Reset", str(math.ceil(tightest.reset_after))),
        ]
    return headers


def retry_after_seconds(decision: RateLimitDecision) -> int:
    """Whole seconds for ``Retry-After`` of a refusal: rounded up, at least 1, and
    never earlier than the ``t`` of any policy the 429 reports."""
    shown_t = (math.ceil(r.reset_after) for r in decision.violated if not r.policy.is_concurrency)
    return max(1, math.ceil(decision.retry_after), *shown_t)


def rejection(decision: RateLimitDecision, *, legacy: bool = False) -> RateLimitExceeded:
    """The 429 error for a refused *decision*, carrying its ``RateLimit`` fields."""
    names = [r.name for r in decision.violated]
    seconds = retry_after_seconds(decision)
    return RateLimitExceeded(
        f"quota exceeded for {', '.join(repr(n) for n in names)}; retry after {seconds} s",
        retry_after=float(seconds),
        violated_policies=names,
        extra_headers=dict(rate_limit_headers([decision], legacy=legacy)),
    )


class _Holder:
    """Per-request collection point for decisions (lives in the ASGI scope)."""

    __slots__ = ("client_ip", "decisions")

    def __init__(self, client_ip: ClientIP) -> None:
        self.decisions: list[RateLimitDecision] = []
        self.client_ip = client_ip


def attach_decision(scope: Scope, decision: RateLimitDecision) -> bool:
    """Queue *decision*'s headers for the response; False when no rate-limit
    middleware is outermost to write them (the caller must then set them itself)."""
    holder = scope.get(_HOLDER)
    if not isinstance(holder, _Holder):
        return False
    holder.decisions.append(decision)
    return True


def _has_ratelimit(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    return any(name.lower() in (b"ratelimit", b"ratelimit-policy") for name, _ in headers)


def _header_writer(send: Send, holder: _Holder, legacy: bool) -> Send:
    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start" and holder.decisions:
            headers = list(message.get("headers", ()))
            if not _has_ratelimit(headers):
                headers += [
                    (name.lower().encode("latin-1"), value.encode("latin-1"))
                    for name, value in rate_limit_headers(holder.decisions, legacy=legacy)
                ]
                message = {**message, "headers": headers}
        await send(message)

    return send_with_headers


class RateLimitHeadersMiddleware:
    """Writes the headers of decisions made by ``Depends(rate_limit(...))`` onto
    every response, errors included. Not needed when ``RateLimitMiddleware`` is
    installed (it does the same). ``trusted_proxies`` configures the client IP
    the dependencies key on by default."""

    def __init__(
        self, app: ASGIApp, *, trusted_proxies: Iterable[str] = (), legacy_headers: bool = False
    ) -> None:
        self.app = app
        self.client_ip = ClientIP(trusted_proxies)
        self.legacy_headers = legacy_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or isinstance(scope.get(_HOLDER), _Holder):
            await self.app(scope, receive, send)
            return
        holder = _Holder(self.client_ip)
        scope[_HOLDER] = holder
        await self.app(scope, receive, _header_writer(send, holder, self.legacy_headers))


# -- limiters -----------------------------------------------------------------


class LimiterCache:
    """Limiters by policies for the current client (rebuilt when the client changes).

    Bounded: past *maxsize* distinct policy sets (e.g. per-tenant quotas from
    a resolver) the oldest limiter is dropped; rebuilding one costs no I/O.
    """

    def __init__(
        self,
        *,
        failure_mode: FailureMode | None = None,
        lease_seconds: float = 60.0,
        maxsize: int = 512,
    ) -> None:
        self.failure_mode = failure_mode
        self.lease_seconds = lease_seconds
        self.maxsize = maxsize
        self._client: AnyRedis | None = None
        self._items: dict[tuple[Any, ...], RateLimiter | ConcurrencyLimiter] = {}
        self._parsed: dict[str, tuple[Policy, ...]] = {}

    def policies(self, spec: PolicyLike) -> tuple[Policy, ...]:
        """``as_policies`` with parsed strings remembered."""
        if not isinstance(spec, str):
            return as_policies(spec)
        found = self._parsed.get(spec)
        if found is None:
            if len(self._parsed) >= self.maxsize:
                self._parsed.pop(next(iter(self._parsed)))
            found = self._parsed[spec] = as_policies(spec)
        return found

    def _get(
        self, client: AnyRedis, key: tuple[Any, ...]
    ) -> RateLimiter | ConcurrencyLimiter | None:
        if client is not self._client:
            self._items.clear()
            self._client = client
        return self._items.get(key)

    def _put(self, key: tuple[Any, ...], limiter: RateLimiter | ConcurrencyLimiter) -> None:
        if len(self._items) >= self.maxsize:
            self._items.pop(next(iter(self._items)))
        self._items[key] = limiter

    def rate(
        self, client: AnyRedis, policies: tuple[Policy, ...], algorithm: Algorithm
    ) -> RateLimiter:
        key = ("rate", algorithm, policies)
        limiter = self._get(client, key)
        if not isinstance(limiter, RateLimiter):
            limiter = RateLimiter(
                client, policies=policies, algorithm=algorithm, failure_mode=self.failure_mode
            )
            self._put(key, limiter)
        return limiter

    def concurrency(self, client: AnyRedis, policies: tuple[Policy, ...]) -> ConcurrencyLimiter:
        key = ("concurrency", policies)
        limiter = self._get(client, key)
        if not isinstance(limiter, ConcurrencyLimiter):
            limiter = ConcurrencyLimiter(
                client,
                policies=policies,
                lease_seconds=self.lease_seconds,
                failure_mode=self.failure_mode,
            )
            self._put(key, limiter)
        return limiter


# -- rules --------------------------------------------------------------------


@dataclass(frozen=True)
class RateLimitRule:
    """Requests matching *path* (and *methods*) are limited by *limits*.

    Args:
        path: a route template: ``"/items/{item_id}"``, ``"/files/{p:path}"``,
            ``"/admin/*"`` (the subtree), or ``"*"`` (everything).
        limits: policies (``"10/second;1000/day"``, ``"4 concurrent"``,
            ``Policy`` objects), an async ``PolicyResolver`` ``(conn, identity)
            -> policies | None``, or None to exempt matching requests.
        methods: HTTP methods (default any; ``GET`` implies ``HEAD``).
        key: identity function (default: the middleware's ``key``).
        algorithm: for rate policies (default ``"gcra"``).
        cost: units per request, or ``(conn) -> int``.
        scope: counter scope name; default ``"<METHODS> <path>"`` so every
            path matching the template shares one quota per identity. Give
            several rules the same scope to share a quota between them.
    """

    path: str
    limits: PolicyLike | PolicyResolver | None
    methods: Collection[str] | None = None
    key: KeyFunc | None = None
    algorithm: Algorithm = "gcra"
    cost: int | Callable[[HTTPConnection], int] = 1
    scope: str | None = None


@dataclass(frozen=True, slots=True)
class _Compiled:
    rule: RateLimitRule
    regex: re.Pattern[str]
    methods: frozenset[str]
    scope: str
    static: tuple[Policy, ...] | None
    resolver: PolicyResolver | None


def _compile(rule: RateLimitRule, cache: LimiterCache) -> _Compiled:
    path = rule.path
    if path == "*":
        regex = re.compile(r"^.*$")
    elif path.endswith("/*"):
        base = compile_path(path[:-2] or "/")[0].pattern.removesuffix("$")
        regex = re.compile(base.removesuffix("/") + r"(?:/.*)?$")
    elif path.startswith("/"):
        regex = compile_path(path)[0]
    else:
        raise ValueError(f"rule path {path!r} must start with '/' or be '*'")
    methods = frozenset(m.upper() for m in rule.methods or ())
    if "GET" in methods:
        methods |= {"HEAD"}
    scope = rule.scope or f"{','.join(sorted(methods)) or '*'} {path}"
    static: tuple[Policy, ...] | None = None
    resolver: PolicyResolver | None = None
    if rule.limits is None:
        pass
    elif isinstance(rule.limits, (str, Policy)) or not callable(rule.limits):
        static = cache.policies(rule.limits)
        _validate(static, rule.algorithm)
    else:
        resolver = rule.limits
    return _Compiled(rule, regex, methods, scope, static, resolver)


def _validate(policies: tuple[Policy, ...], algorithm: Algorithm) -> None:
    """Fail at startup, not on the first request, for impossible combinations."""
    rates = tuple(p for p in policies if not p.is_concurrency)
    if rates:
        validate_policies(rates, algorithm)


async def _release(limiter: ConcurrencyLimiter | None, lease: RateLimitDecision | None) -> None:
    """Give a concurrency slot back; if Redis refuses (fail-closed), it expires on its own."""
    if limiter is None or lease is None:
        return
    try:
        await limiter.release(lease)
    except RedisUnavailable as exc:
        log.warning("concurrency slot not released (%s); it expires with its lease", exc)


def _split(policies: tuple[Policy, ...]) -> tuple[tuple[Policy, ...], tuple[Policy, ...]]:
    return (
        tuple(p for p in policies if not p.is_concurrency),
        tuple(p for p in policies if p.is_concurrency),
    )


class RateLimitMiddleware:
    """Pure ASGI rate limiting by rules (see the module docstring).

    Args:
        app: the ASGI app.
        rules: ``RateLimitRule``s; the first match decides (order specific
            rules before catch-alls). A rule's policies are checked in one
            round trip, all-or-nothing; rate and concurrency policies in one
            rule take one round trip each (concurrency first, released again
            if the rate policies refuse).
        key: default identity (default ``ClientIP(trusted_proxies)``).
        trusted_proxies: CIDRs whose ``X-Forwarded-For`` is believed.
        headers: emit ``RateLimit-Policy`` / ``RateLimit`` (default True).
        legacy_headers: also emit ``X-RateLimit-Limit/-Remaining/-Reset``.
        failure_mode: ``"open"`` / ``"closed"`` when Redis is down (default
            ``RATE_LIMIT_FAILURE_MODE``).
        lease_seconds: how long a concurrency slot outlives a dead worker.
        redis: a client; default the global one, looked up per request.

    Concurrency slots are released when the response has been sent (or the
    app raised, or the client went away); if the process dies first they
    expire after ``lease_seconds``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        rules: Sequence[RateLimitRule] = (),
        key: KeyFunc | None = None,
        trusted_proxies: Iterable[str] = (),
        headers: bool = True,
        legacy_headers: bool = False,
        failure_mode: FailureMode | None = None,
        lease_seconds: float = 60.0,
        redis: AnyRedis | None = None,
    ) -> None:
        self.app = app
        self.client_ip = ClientIP(trusted_proxies)
        self.key = key
        self.headers = headers
        self.legacy_headers = legacy_headers
        self.redis = redis
        self.limiters = LimiterCache(failure_mode=failure_mode, lease_seconds=lease_seconds)
        self.rules = tuple(_compile(rule, self.limiters) for rule in rules)

    def match(self, scope: Scope) -> _Compiled | None:
        """The first rule matching the request's method and route path, if any."""
        path: str = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        method: str = scope["method"]
        for rule in self.rules:
            if (not rule.methods or method in rule.methods) and rule.regex.match(path):
                return rule
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        holder = scope.get(_HOLDER)
        if not isinstance(holder, _Holder) and self.headers:
            holder = scope[_HOLDER] = _Holder(self.client_ip)  # outermost: we write headers
            send = _header_writer(send, holder, self.legacy_headers)
        decisions = holder.decisions if isinstance(holder, _Holder) else []
        rule = self.match(scope)
        if rule is None or rule.rule.limits is None:
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        identity = await identify(conn, rule.rule.key or self.key or self.client_ip)
        if rule.static is not None:
            policies = rule.static
        else:
            assert rule.resolver is not None
            resolved = await rule.resolver(conn, identity)
            if resolved is None:
                await self.app(scope, receive, send)
                return
            policies = self.limiters.policies(resolved)
        cost_spec = rule.rule.cost
        cost = cost_spec if isinstance(cost_spec, int) else cost_spec(conn)
        identifier = f"{rule.scope}|{identity}"
        client = self.redis or get_redis()
        rates, slots = _split(policies)
        concurrency: ConcurrencyLimiter | None = None
        lease: RateLimitDecision | None = None
        try:
            if slots:
                concurrency = self.limiters.concurrency(client, slots)
                lease = await concurrency.acquire(identifier, cost)
                if not lease.allowed:
                    await self._reject(scope, send, lease)
                    return
            if rates:
                limiter = self.limiters.rate(client, rates, rule.rule.algorithm)
                decision = await limiter.hit(identifier, cost)
                if not decision.allowed:
                    await _release(concurrency, lease)
                    await self._reject(scope, send, decision)
                    return
                decisions.append(decision)
        except RedisUnavailable as exc:  # fail-closed mode
            await _release(concurrency, lease)
            items = ", ".join(_policy_item(p) for p in policies)
            extra = [(b"ratelimit-policy", items.encode())] if self.headers else None
            await send_problem(send, exc, scope.get("path"), extra)
            return
        if lease is not None:
            decisions.append(lease)
        try:
            await self.app(scope, receive, send)
        finally:
            await _release(concurrency, lease)

    async def _reject(self, scope: Scope, send: Send, decision: RateLimitDecision) -> None:
        exc = rejection(decision, legacy=self.legacy_headers)
        if not self.headers:
            exc.extra_headers.clear()
        await send_problem(send, exc, scope.get("path"))


# -- per-route dependency ---------------------------------------------------


def _route_scope(request: Request) -> str:
    """``"GET /items/{item_id}"``: the method and the template FastAPI routed to."""
    route = request.scope.get("route")
    template = getattr(route, "path", None) or request.scope["path"]
    method = "GET" if request.method == "HEAD" else request.method
    return f"{method} {request.scope.get('root_path', '')}{template}"


def rate_limit(
    limits: PolicyLike | PolicyResolver,
    *,
    key: KeyFunc | DependsParam | None = None,
    scope: str | None = None,
    algorithm: Algorithm = "gcra",
    cost: int = 1,
    failure_mode: FailureMode | None = None,
    legacy_headers: bool = False,
) -> Callable[..., Awaitable[RateLimitDecision]]:
    """A dependency that rate-limits one route: ``Depends(rate_limit("10/minute"))``.

    *limits* are policies (``"burst=10/second;daily=1000/day"``: one round
    trip, all-or-nothing) or an async resolver ``(request, identity) ->
    policies | None`` for plans and tenants (None: no limit). Stack several
    ``Depends(rate_limit(...))`` for limits on different identities.

    *key* identifies the caller: a key function (``ClientIP(...)``,
    ``APIKey(validator=...)``, ``Principal(...)``, ``first_of(...)``) or a FastAPI
    dependency wrapped in ``Depends(...)`` returning a user id (keyed as
    ``user:<id>``); default (or when it finds nothing) the client IP, as
    configured on the outermost rate-limit middleware. *scope* names the
    counter; default
    ``"<METHOD> <route template>"`` so ``/items/1`` and ``/items/2`` share it.

    Refused: ``RateLimitExceeded`` (429 problem+json with ``Retry-After`` and
    ``RateLimit`` fields; needs ``install_problem_handlers``). Allowed: the
    headers land on the response (through ``RateLimitMiddleware`` or
    ``RateLimitHeadersMiddleware`` when installed, so error responses get
    them too; otherwise on the route's response). Redis down: allowed
    (fail-open, default) or 503 (*failure_mode* / ``RATE_LIMIT_FAILURE_MODE``
    ``closed``). Returns the ``RateLimitDecision``. Concurrency limits need
    the middleware (a dependency cannot see the response end).
    """
    limiters = LimiterCache(failure_mode=failure_mode)
    static: tuple[Policy, ...] | None = None
    resolver: PolicyResolver | None = None
    if isinstance(limits, (str, Policy)) or not callable(limits):
        static = limiters.policies(limits)
        if any(p.is_concurrency for p in static):
            raise ValueError("concurrency policies need RateLimitMiddleware, not a dependency")
        validate_policies(static, algorithm)
    else:
        resolver = limits
    key_function = None if isinstance(key, DependsParam) else key

    async def dependency(
        request: Request, response: Response, identity: Any = None
    ) -> RateLimitDecision:
        if key_function is not None or not identity:
            identity = await identify(request, key_function)
        else:
            identity = f"user:{identity}"
        policies = static
        if policies is None:
            assert resolver is not None
            resolved = await resolver(request, identity)
            if resolved is None:
                return RateLimitDecision(True, (), identity, 0)
            policies = limiters.policies(resolved)
        limiter = limiters.rate(get_redis(), policies, algorithm)
        decision = await limiter.hit(f"{scope or _route_scope(request)}|{identity}", cost)
        if not decision.allowed:
            raise rejection(decision, legacy=legacy_headers)
        if not attach_decision(request.scope, decision):
            for name, value in rate_limit_headers([decision], legacy=legacy_headers):
                response.headers.append(name, value)
        return decision

    # Built by hand: this module's string annotations cannot see the closure's values.
    keyword = inspect.Parameter.KEYWORD_ONLY
    parameters = [
        inspect.Parameter("request", keyword, annotation=Request),
        inspect.Parameter("response", keyword, annotation=Response),
    ]
    if isinstance(key, DependsParam):
        parameters.append(inspect.Parameter("identity", keyword, default=key, annotation=Any))
    dependency.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        parameters, return_annotation=RateLimitDecision
    )
    return dependency
