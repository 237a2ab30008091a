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

from app.http.client_ip import ClientIP
from app.middleware.rate_limit._dependency import rate_limit
from app.middleware.rate_limit._headers import (
    RateLimitHeadersMiddleware,
    attach_decision,
    rate_limit_headers,
    rejection,
    retry_after_seconds,
)
from app.middleware.rate_limit._identity import (
    APIKey,
    KeyFunc,
    KeyValidator,
    Principal,
    first_of,
    identify,
)
from app.middleware.rate_limit._limiters import LimiterCache, PolicyResolver
from app.middleware.rate_limit._middleware import RateLimitMiddleware, RateLimitRule

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
