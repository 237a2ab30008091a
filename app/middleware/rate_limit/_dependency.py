"""``rate_limit(...)``: the per-route dependency, run after FastAPI routed the request."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request, Response
from fastapi.params import Depends as DependsParam

from app.core.config import FailureMode
from app.core.errors import ConfigurationError
from app.core.redis import get_redis
from app.middleware.rate_limit._headers import attach_decision, rate_limit_headers, rejection
from app.middleware.rate_limit._identity import KeyFunc, identify
from app.middleware.rate_limit._limiters import LimiterCache, PolicyResolver
from app.services.rate_limit import (
    Algorithm,
    Policy,
    PolicyLike,
    RateLimitDecision,
    validate_policies,
)

__all__ = ["rate_limit"]


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
    namespace: str = "ratelimit",
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
    the middleware (a dependency cannot see the response end). *namespace* is the
    key space of the counters (default ``ratelimit``).
    """
    limiters = LimiterCache(failure_mode=failure_mode, namespace=namespace)
    static: tuple[Policy, ...] | None = None
    resolver: PolicyResolver | None = None
    if isinstance(limits, (str, Policy)) or not callable(limits):
        static = limiters.policies(limits)
        if any(p.is_concurrency for p in static):
            raise ConfigurationError(
                "concurrency policies need RateLimitMiddleware, not a dependency"
            )
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
