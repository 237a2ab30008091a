"""Demo routes for rate limiting: per IP, per user, stacked, per plan and concurrency.

* ``GET /limits/ip``: ``RateLimitMiddleware`` rule, 5 per 10 s per client IP.
* ``GET /limits/user``: ``Depends(rate_limit(...))`` keyed by the demo user
  (``X-User`` header; the client IP without one), 5 per minute.
* ``GET /limits/user/status``: the same quota, read with ``peek`` (no charge).
* ``GET /limits/stacked``: ``burst`` 2 per second and ``daily`` 20 per day,
  checked in one round trip; a request refused by ``burst`` costs no ``daily``.
* ``GET /limits/plan``: an async resolver picks the policy from ``X-Plan``
  (``free`` 3 per minute, ``pro`` 20 per minute).
* ``GET /limits/concurrency?seconds=1``: at most 2 in flight per client IP.

Every response carries ``RateLimit-Policy`` and ``RateLimit``; a refusal is a
429 problem+json with ``Retry-After`` and ``violated-policies``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from starlette.requests import HTTPConnection

from app.api.deps import RedisDep, rate_limit
from app.core.redis import Lifespan
from app.middleware.rate_limit import RateLimitMiddleware, RateLimitRule, identify
from app.services.rate_limit import RateLimitDecision, RateLimiter

__all__ = ["RULES", "lifespan", "router", "setup"]

router = APIRouter(prefix="/limits", tags=["rate-limit"])
lifespan: Lifespan | None = None

_USER_POLICY = "user=5/minute"
_USER_SCOPE = "demo-user"
_PLANS = {"free": "free=3/minute", "pro": "pro=20/minute"}
_LIMITED: dict[int | str, dict[str, Any]] = {
    429: {"description": "Quota exceeded (problem+json, Retry-After)"}
}


async def _plan_policies(conn: HTTPConnection, identity: str) -> str:
    """The quota of the caller's plan (a real service would look the plan up)."""
    return _PLANS.get(conn.headers.get("x-plan", "free"), _PLANS["free"])


RULES = (
    RateLimitRule("/limits/ip", "ip=5 per 10 seconds", methods=["GET"]),
    RateLimitRule("/limits/plan", _plan_policies, methods=["GET"]),
    RateLimitRule("/limits/concurrency", "slots=2 concurrent", methods=["GET"]),
)
"""The demo middleware's rules (everything else passes through untouched)."""


async def demo_user(x_user: str | None = Header(default=None)) -> str | None:
    """Demo authentication: the ``X-User`` header is the user id."""
    return x_user or None


def _summary(decision: RateLimitDecision) -> dict[str, Any]:
    return {
        "identity": decision.identifier,
        "allowed": decision.allowed,
        "degraded": decision.degraded,
        "policies": [
            {
                "name": r.name,
                "limit": r.limit,
                "remaining": r.remaining,
                "reset_after": round(r.reset_after, 3),
            }
            for r in decision.results
        ],
    }


@router.get("/ip", summary="5 per 10 seconds per client IP (middleware rule)", responses=_LIMITED)
async def per_ip() -> dict[str, str]:
    return {"limited_by": "RateLimitMiddleware rule 'GET /limits/ip', keyed by client IP"}


@router.get("/user", summary="5 per minute per user (X-User header)", responses=_LIMITED)
async def per_user(
    decision: RateLimitDecision = Depends(
        rate_limit(_USER_POLICY, key=Depends(demo_user), scope=_USER_SCOPE)
    ),
) -> dict[str, Any]:
    return _summary(decision)


@router.get("/user/status", summary="The per-user quota, read without spending it")
async def per_user_status(
    request: Request, redis: RedisDep, user: str | None = Depends(demo_user)
) -> dict[str, Any]:
    identity = f"user:{user}" if user else await identify(request, None)
    limiter = RateLimiter(redis, policies=_USER_POLICY)
    return _summary(await limiter.peek(f"{_USER_SCOPE}|{identity}"))


@router.get("/stacked", summary="2 per second and 20 per day, checked together", responses=_LIMITED)
async def stacked(
    decision: RateLimitDecision = Depends(rate_limit("burst=2/second;daily=20/day")),
) -> dict[str, Any]:
    return _summary(decision)


@router.get(
    "/plan", summary="Quota chosen per request by plan (X-Plan: free|pro)", responses=_LIMITED
)
async def per_plan(x_plan: str = Header(default="free")) -> dict[str, str]:
    return {"plan": x_plan if x_plan in _PLANS else "free"}


@router.get(
    "/concurrency", summary="At most 2 requests in flight per client IP", responses=_LIMITED
)
async def concurrency(
    seconds: float = Query(default=1.0, ge=0, le=10, description="How long to hold the slot."),
) -> dict[str, float]:
    await asyncio.sleep(seconds)
    return {"held_seconds": seconds}


def setup(app: FastAPI) -> None:
    """Install the demo's ``RateLimitMiddleware`` (it also writes dependency headers)."""
    app.add_middleware(RateLimitMiddleware, rules=RULES)
