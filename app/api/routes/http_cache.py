"""Demo routes for HTTP response caching (filled in by its issue)."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from app.core.redis import Lifespan

__all__ = ["lifespan", "router", "setup"]

router = APIRouter(tags=["http-cache"])
lifespan: Lifespan | None = None


def setup(app: FastAPI) -> None:
    """Nothing to install yet."""
