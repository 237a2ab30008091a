"""Switches for demo routes that an unauthenticated caller must not reach everywhere."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from app.api.deps import SettingsDep
from app.core.errors import RouteDisabled

__all__ = ["Destructive"]


async def _destructive_allowed(settings: SettingsDep) -> None:
    """403 ``route-disabled`` unless ``APP_ENV=development`` or ``DEMO_DESTRUCTIVE_ROUTES=true``."""
    if not settings.destructive_demo_routes_enabled:
        raise RouteDisabled(
            "this demo route changes or removes shared data and is off outside "
            "APP_ENV=development; set DEMO_DESTRUCTIVE_ROUTES=true to serve it"
        )


Destructive = Annotated[None, Depends(_destructive_allowed)]
"""A parameter of this type makes a route answer 403 unless destructive demo routes are on."""
