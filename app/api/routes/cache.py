"""Demo routes for cache (filled in by its issue)."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from app.core.redis import Lifespan

__all__ = ["lifespan", "router", "setup"]

router = APIRouter(tags=["cache"])
lifespan: Lifespan | None = None


def setup(app: FastAPI) -> None:
    """Nothing to install yet."""
