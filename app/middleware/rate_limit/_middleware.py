"""``RateLimitMiddleware``: rules matched by route template, checked before routing."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

from starlette.requests import HTTPConnection
from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from app.core.config import FailureMode
from app.core.errors import ConfigurationError, RedisUnavailable
from app.core.guard import Duration
from app.core.redis import AnyRedis, get_redis
from app.http.client_ip import ClientIP
from app.http.problems import send_problem
from app.middleware.rate_limit._headers import (
    HOLDER,
    Holder,
    header_writer,
    policy_item,
    rejection,
)
from app.middleware.rate_limit._identity import KeyFunc, identify
from app.middleware.rate_limit._limiters import (
    LimiterCache,
    PolicyResolver,
    release_slot,
    split_policies,
)
from app.services.rate_limit import (
    Algorithm,
    ConcurrencyLimiter,
    Policy,
    PolicyLike,
    RateLimitDecision,
    validate_policies,
)

__all__ = ["RateLimitMiddleware", "RateLimitRule"]


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
        raise ConfigurationError(f"rule path {path!r} must start with '/' or be '*'")
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


class RateLimitMiddleware:
    """Pure ASGI rate limiting by rules (see the package docstring).

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
        lease_seconds: how long a concurrency slot outlives a dead worker
            (seconds or ``timedelta``; a bad value raises ``ConfigurationError`` here).
        redis: a client; default the global one, looked up per request.
        namespace: the key space of the counters (default ``ratelimit``).

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
        lease_seconds: Duration = 60.0,
        redis: AnyRedis | None = None,
        namespace: str = "ratelimit",
    ) -> None:
        self.app = app
        self.client_ip = ClientIP(trusted_proxies)
        self.key = key
        self.headers = headers
        self.legacy_headers = legacy_headers
        self.redis = redis
        self.limiters = LimiterCache(
            failure_mode=failure_mode, lease_seconds=lease_seconds, namespace=namespace
        )
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
        holder = scope.get(HOLDER)
        if not isinstance(holder, Holder) and self.headers:
            holder = scope[HOLDER] = Holder(self.client_ip)  # outermost: we write headers
            send = header_writer(send, holder, self.legacy_headers)
        decisions = holder.decisions if isinstance(holder, Holder) else []
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
        rates, slots = split_policies(policies)
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
                    await release_slot(concurrency, lease)
                    await self._reject(scope, send, decision)
                    return
                decisions.append(decision)
        except RedisUnavailable as exc:  # fail-closed mode
            await release_slot(concurrency, lease)
            items = ", ".join(policy_item(p) for p in policies)
            extra = [(b"ratelimit-policy", items.encode())] if self.headers else None
            await send_problem(send, exc, scope.get("path"), extra)
            return
        if lease is not None:
            decisions.append(lease)
        try:
            await self.app(scope, receive, send)
        finally:
            await release_slot(concurrency, lease)

    async def _reject(self, scope: Scope, send: Send, decision: RateLimitDecision) -> None:
        exc = rejection(decision, legacy=self.legacy_headers)
        if not self.headers:
            exc.extra_headers.clear()
        await send_problem(send, exc, scope.get("path"))
