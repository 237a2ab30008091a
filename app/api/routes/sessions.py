"""Demo routes for sessions: log in, see a profile, count, log out.

``POST /session/login`` stores the user and regenerates the session id
(fixation defence); ``GET /session/profile`` shows it; ``POST
/session/counter`` increments a per-session counter (``?delay=`` keeps the
request open, to watch a concurrent increment get 409 instead of being lost);
``POST /session/logout`` deletes the session, and a request still in flight
cannot bring it back.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Query
from pydantic import BaseModel, Field

from app.api.deps import SessionDep
from app.core.config import get_settings
from app.core.redis import Lifespan
from app.middleware.sessions import SessionMiddleware

__all__ = ["lifespan", "router", "setup"]

router = APIRouter(prefix="/session", tags=["sessions"])
lifespan: Lifespan | None = None

_PROBLEMS: dict[int | str, dict[str, Any]] = {
    409: {"description": "A concurrent request changed the same session key (problem+json)"},
    503: {"description": "Redis is unavailable (problem+json)"},
}


class LoginIn(BaseModel):
    user: str = Field(min_length=1, max_length=64, examples=["alice"])


class Profile(BaseModel):
    user: str
    counter: int
    login_count: int


@router.post(
    "/login", summary="Log in: store the user and issue a new session id", responses=_PROBLEMS
)
async def login(body: LoginIn, session: SessionDep) -> dict[str, str]:
    """Sets ``user`` and regenerates the id; the old id stops working at once (fixation)."""
    session["user"] = body.user
    session["login_count"] = int(session.get("login_count", 0)) + 1
    session.regenerate()
    return {"user": body.user}


@router.post("/logout", summary="Log out: delete the session", responses=_PROBLEMS)
async def logout(session: SessionDep) -> dict[str, bool]:
    """Deletes the session and clears the cookie; in-flight requests cannot resurrect it."""
    was_logged_in = "user" in session
    session.invalidate()
    return {"logged_out": was_logged_in}


@router.get(
    "/profile",
    summary="The logged-in user's profile",
    responses={401: {"description": "Not logged in"}, **_PROBLEMS},
)
async def profile(session: SessionDep) -> Profile:
    user = session.get("user")
    if user is None:
        raise HTTPException(status_code=401, detail="not logged in: POST /session/login first")
    return Profile(
        user=user,
        counter=int(session.get("counter", 0)),
        login_count=int(session.get("login_count", 0)),
    )


@router.post("/counter", summary="Increment a per-session counter", responses=_PROBLEMS)
async def counter(
    session: SessionDep,
    delay: float = Query(default=0.0, ge=0, le=5, description="Seconds to hold the request."),
) -> dict[str, int]:
    """Works without logging in (creates a session). Concurrent increments: one wins, one 409."""
    value = int(session.get("counter", 0)) + 1
    if delay:
        await asyncio.sleep(delay)
    session["counter"] = value
    return {"counter": value}


def setup(app: FastAPI) -> None:
    """Install ``SessionMiddleware`` signed with the settings' keys (current first)."""
    app.add_middleware(SessionMiddleware, secret_key=get_settings().signing_keys())
