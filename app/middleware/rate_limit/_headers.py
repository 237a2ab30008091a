"""The ``RateLimit-Policy`` / ``RateLimit`` fields, the 429 refusal, and who writes them."""

from __future__ import annotations

import math
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import RateLimitExceeded
from app.http.client_ip import ClientIP
from app.http.headers import sf_item
from app.services.rate_limit import Policy, RateLimitDecision, RateLimitResult

__all__ = [
    "HOLDER",
    "Holder",
    "RateLimitHeadersMiddleware",
    "attach_decision",
    "header_writer",
    "policy_item",
    "rate_limit_headers",
    "rejection",
    "retry_after_seconds",
]

HOLDER = "app.rate_limit"
"""Where the outermost rate-limit layer keeps the request's ``Holder`` in the ASGI scope."""


def policy_item(policy: Policy) -> str:
    """*policy* as a ``RateLimit-Policy`` member: ``"burst";q=10;w=1``."""
    params: dict[str, int | str] = {"q": policy.limit}
    if policy.is_concurrency:
        params["qu"] = "concurrent-requests"
        return sf_item(policy.name, params)
    window = policy.window or 0.0
    if window >= 1 and window == int(window):
        params["w"] = int(window)
    return sf_item(policy.name, params)


def _limit_item(result: RateLimitResult) -> str:
    params: dict[str, int | str] = {"r": result.remaining}
    if not result.policy.is_concurrency:
        params["t"] = math.ceil(result.reset_after)
    return sf_item(result.name, params)


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
        policy_items.extend(policy_item(r.policy) for r in decision.results)
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


class Holder:
    """Per-request collection point for decisions (lives in the ASGI scope)."""

    __slots__ = ("client_ip", "decisions")

    def __init__(self, client_ip: ClientIP) -> None:
        self.decisions: list[RateLimitDecision] = []
        self.client_ip = client_ip


def attach_decision(scope: Scope, decision: RateLimitDecision) -> bool:
    """Queue *decision*'s headers for the response; False when no rate-limit
    middleware is outermost to write them (the caller must then set them itself)."""
    holder = scope.get(HOLDER)
    if not isinstance(holder, Holder):
        return False
    holder.decisions.append(decision)
    return True


def _has_ratelimit(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    return any(name.lower() in (b"ratelimit", b"ratelimit-policy") for name, _ in headers)


def header_writer(send: Send, holder: Holder, legacy: bool) -> Send:
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
        if scope["type"] != "http" or isinstance(scope.get(HOLDER), Holder):
            await self.app(scope, receive, send)
            return
        holder = Holder(self.client_ip)
        scope[HOLDER] = holder
        await self.app(scope, receive, header_writer(send, holder, self.legacy_headers))
