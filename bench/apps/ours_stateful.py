"""Our routes that need app-wide middleware: sessions and idempotent POSTs.

``SessionMiddleware`` (lazy: a route that does not load the session makes no
Redis call) and ``IdempotencyMiddleware`` (guarding ``/idem`` only) wrap the
whole app, as a user installs them (``install_toolkit``); ``/bare`` shows what they cost a route
that uses neither.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from app.api.deps import SessionDep
from app.api.problems import install_problem_handlers
from app.core.redis import redis_lifespan
from app.middleware.sessions import load_session
from app.middleware.stack import install_toolkit
from bench.common import SMALL

app = FastAPI(lifespan=redis_lifespan())
install_problem_handlers(app)
# The one safe order (sessions inside idempotency); a wrong one now fails at startup.
install_toolkit(app, idempotency={"paths": ["/idem"]}, sessions=True)


@app.get("/bare")
async def bare() -> dict[str, Any]:
    return SMALL


@app.post("/session/login")
async def login(request: Request) -> dict[str, Any]:
    session = await load_session(request)
    session["user"] = 1
    session["name"] = "Ada Lovelace"
    return SMALL


@app.get("/session")
async def session_read(session: SessionDep) -> dict[str, Any]:
    if session.get("user") != 1:
        raise RuntimeError("the session was not found")
    return SMALL


@app.post("/idem")
async def idempotent() -> dict[str, Any]:
    return SMALL
