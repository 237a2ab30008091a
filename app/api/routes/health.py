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
    summary="Redis health: ping latency, version and role",
    responses={503: {"description": "Redis is unavailable (problem+json)"}},
)
async def healthz(redis: RedisDep, settings: SettingsDep) -> dict[str, Any]:
    """200 with latency when Redis answers within the socket timeout, else 503 problem+json."""
    try:
        async with asyncio.timeout(settings.redis_socket_timeout):
            report = await health(redis)
    except TimeoutError as exc:
        raise RedisUnavailable("Redis health check timed out") from exc
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
