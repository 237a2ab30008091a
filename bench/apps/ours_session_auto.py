"""The stateful app's session read without the FastAPI dependency.

The same middleware as ``ours_stateful`` (sessions inside idempotency), but
``SessionMiddleware(autoload=True)``: the middleware loads the session of every
request that carries a cookie, and the route reads ``request.session`` as in
Starlette. Beside ``ours-stateful /session`` (which declares ``SessionDep``) it
shows what resolving the dependency costs. The cookie is the one the bench got
from ``ours_stateful`` (same secret, same Redis, same namespace).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from app.api.problems import install_problem_handlers
from app.core.redis import redis_lifespan
from app.middleware.stack import install_toolkit
from bench.common import SMALL

app = FastAPI(lifespan=redis_lifespan())
install_problem_handlers(app)
install_toolkit(app, idempotency={"paths": ["/idem"]}, sessions={"autoload": True})


@app.get("/bare")
async def bare() -> dict[str, Any]:
    return SMALL


@app.get("/session")
async def session_read(request: Request) -> dict[str, Any]:
    if request.session.get("user") != 1:
        raise RuntimeError("the session was not found")
    return SMALL
