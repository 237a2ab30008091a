"""A test app guarded by IdempotencyMiddleware, and a worker process that drives it.

``build_app(**middleware_options)`` is the app the middleware tests use. Run as
``python -m tests.integration.middleware._idempotency_worker MODE ...``
(``REDIS_URL`` and ``SECRET_KEY`` in the environment) it is one OS process of
a multi-process test:

* ``burst N KEY MODE``: the demo's payment routes, guarded as in the demo
  (``MODE`` ``reject`` or ``wait``); waits at a Redis barrier, fires N
  concurrent identical ``POST /payments``, prints one JSON line per answer.
* ``hang KEY``: sends one ``POST /hang`` whose handler never returns, to be
  killed mid-request (a crashed worker).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
import sys
from typing import Any, Literal

import httpx
from asgi_lifespan import LifespanManager
from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from redis.asyncio import Redis

from app.api.deps import IDEMPOTENCY_RESPONSES, idempotency_key
from app.api.problems import install_problem_handlers
from app.api.routes import idempotency as demo
from app.core.redis import get_redis, redis_lifespan
from app.middleware.idempotency import IdempotencyMiddleware
from app.testing.waiting import pop_signal

GUARDED = ("/items", "/fail", "/status", "/big", "/stream", "/echo", "/hang")
READY_LIST = "idem-test:ready"
GO_LIST = "idem-test:go"
HANG_STARTED = "idem-test:hang-started"
HANG_RUNS = "idem-test:hang-runs"


def _tenant(request: Request) -> str:
    return request.headers.get("x-tenant", "")


def build_app(**options: Any) -> FastAPI:
    """Routes that count their runs in ``app.state.calls`` behind the middleware."""
    app = FastAPI()
    install_problem_handlers(app)
    calls: collections.Counter[str] = collections.Counter()
    app.state.calls = calls
    app.state.gate = asyncio.Event()
    app.state.entered = asyncio.Event()
    app.state.hang = False
    options.setdefault("paths", GUARDED)
    app.add_middleware(IdempotencyMiddleware, **options)

    async def maybe_gate(request: Request) -> None:
        if request.query_params.get("gate"):
            app.state.entered.set()
            await app.state.gate.wait()

    @app.post("/items")
    async def create_item(request: Request) -> Response:
        calls["items"] += 1
        run = calls["items"]
        await maybe_gate(request)
        return JSONResponse(
            {"run": run, "body": (await request.body()).decode()},
            status_code=201,
            headers={
                "Location": f"/items/{run}",
                "ETag": f'"v{run}"',
                "Link": '</items>; rel="collection"',
                "X-Other": f"other-{run}",
                "Set-Cookie": f"session=secret-{run}",
            },
        )

    @app.get("/items")
    async def list_items() -> dict[str, int]:
        calls["list"] += 1
        return {"count": calls["items"]}

    @app.post("/unguarded")
    async def unguarded() -> dict[str, int]:
        calls["unguarded"] += 1
        return {"run": calls["unguarded"]}

    @app.post("/fail")
    async def fail() -> dict[str, int]:
        calls["fail"] += 1
        if calls["fail"] == 1:
            raise RuntimeError("the payment provider timed out")
        return {"run": calls["fail"]}

    @app.post("/status/{code}")
    async def status(code: int) -> Response:
        calls["status"] += 1
        return JSONResponse({"run": calls["status"]}, status_code=code)

    @app.post("/big")
    async def big(n: int) -> Response:
        calls["big"] += 1
        return Response(b"x" * n, status_code=201, headers={"Location": "/big/1"})

    @app.post("/stream")
    async def stream(n: int = 3) -> StreamingResponse:
        calls["stream"] += 1

        async def chunks() -> Any:
            yield b"first|"
            await app.state.gate.wait()
            for i in range(n):
                yield f"chunk-{i}|".encode()

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        calls["echo"] += 1
        return Response(await request.body(), media_type="application/octet-stream")

    @app.post("/hang")
    async def hang() -> dict[str, int]:
        runs = int(await get_redis().incr(HANG_RUNS))
        if app.state.hang:
            await get_redis().set(HANG_STARTED, os.getpid())
            await asyncio.Event().wait()
        return {"run": runs}

    @app.post(
        "/orders/{order_id}",
        dependencies=[Depends(idempotency_key(required=True))],
        responses=IDEMPOTENCY_RESPONSES,
    )
    async def create_order(order_id: int, request: Request) -> dict[str, Any]:
        calls["orders"] += 1
        return {"order": order_id, "run": calls["orders"], "body": (await request.body()).decode()}

    @app.post("/tenant-orders", responses=IDEMPOTENCY_RESPONSES)
    async def create_tenant_order(
        key: str | None = Depends(idempotency_key(principal=_tenant)),
    ) -> dict[str, Any]:
        calls["tenant"] += 1
        return {"run": calls["tenant"], "key": key}

    return app


def demo_app(on_conflict: Literal["reject", "wait"]) -> FastAPI:
    """The demo's payment routes and middleware, in an app of their own."""
    app = FastAPI(lifespan=redis_lifespan())
    install_problem_handlers(app)
    app.include_router(demo.router)
    if on_conflict == "reject":
        demo.setup(app)  # exactly the demo's middleware
    else:
        app.add_middleware(
            IdempotencyMiddleware, paths=demo.PATHS, on_conflict="wait", wait_timeout=20
        )
    return app


async def _burst(n: int, key: str, on_conflict: Literal["reject", "wait"]) -> None:
    url = os.environ["REDIS_URL"]
    app = demo_app(on_conflict)
    control = Redis.from_url(url)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://w", timeout=60) as c:
            await control.rpush(READY_LIST, os.getpid())
            await pop_signal(control, GO_LIST, "the go signal", timeout=60)
            body = {"amount": 500, "currency": "EUR", "processing_seconds": 0.3}
            answers = await asyncio.gather(
                *(
                    c.post("/payments", json=body, headers={"Idempotency-Key": key})
                    for _ in range(n)
                )
            )
    await control.aclose()
    for r in answers:
        record = {
            "status": r.status_code,
            "body": base64.b64encode(r.content).decode(),
            "replayed": r.headers.get("idempotent-replayed"),
            "retry_after": r.headers.get("retry-after"),
            "location": r.headers.get("location"),
            "content_type": r.headers.get("content-type"),
        }
        print(json.dumps(record), flush=True)


async def _hang(key: str) -> None:
    app = build_app(lease=0.5)
    app.state.hang = True
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://w", timeout=None
    ) as c:
        await c.post("/hang", json={"x": 1}, headers={"Idempotency-Key": key})


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "burst":
        on_conflict: Literal["reject", "wait"] = "wait" if argv[3] == "wait" else "reject"
        asyncio.run(_burst(int(argv[1]), argv[2], on_conflict))
    elif mode == "hang":
        asyncio.run(_hang(argv[1]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
