"""``/healthz`` and the index page."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from app.api.deps import RedisDep, SettingsDep
from app.core.errors import RedisUnavailable
from app.core.redis import describe_client, health

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    summary="Redis health: status and ping latency (details with HEALTH_DETAILS=true)",
    responses={503: {"description": "Redis is unavailable (problem+json)"}},
)
async def healthz(redis: RedisDep, settings: SettingsDep) -> dict[str, Any]:
    """200 ``{"status", "latency_ms"}`` when Redis answers within the socket timeout, else 503.

    The route is public, so by default it names nothing internal. With
    ``HEALTH_DETAILS=true`` it adds version, role, breaker state and the URL
    (password masked, host and port shown): for a route only operators reach.
    """
    try:
        async with asyncio.timeout(settings.redis_socket_timeout):
            report = await health(redis, details=settings.health_details)
    except TimeoutError as exc:
        raise RedisUnavailable("Redis health check timed out") from exc
    if settings.health_details:
        report["url"] = describe_client(redis, settings)
    return report


@router.get("/", summary="What this demo service shows")
async def index(request: Request) -> dict[str, Any]:
    """Every documented demo route, grouped by capability (from the OpenAPI schema)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for path, operations in request.app.openapi().get("paths", {}).items():
        for method, op in operations.items():
            tag = (op.get("tags") or ["other"])[0]
            groups.setdefault(tag, []).append(
                {"method": method.upper(), "path": path, "summary": op.get("summary", "")}
            )
    return {"service": request.app.title, "docs": "/docs", "capabilities": groups}
