"""The console's pages (GET) and actions (POST); see ``create_console`` for access."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any
from urllib.parse import quote

import orjson
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from redis.exceptions import RedisError

from app.console import _actions as act
from app.console import _views as views
from app.console._access import Operator
from app.console._app import COOKIE, Console, Refused, base, cookie_path, wants_html
from app.console._scan import parse_cursor
from app.core.errors import RedisUnavailable, ToolkitError
from app.services.cache import get_cache
from app.services.rate_limit import RateLimitDecision

__all__ = ["add_routes"]


def _q() -> Any:
    return Query(default=None, max_length=300)  # a fresh FieldInfo per parameter


_NEXT_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/-_")


def _cursor(value: str | None) -> str | None:
    try:
        parse_cursor(value)
    except ValueError as exc:
        raise Refused(400, "invalid page cursor") from exc
    return value or None


def _required(form: dict[str, str], name: str, limit: int = 300) -> str:
    value = form.get(name, "").strip()
    if not value or len(value) > limit:
        raise Refused(400, f"field {name!r} is required (at most {limit} characters)")
    return value


def _entry_id(form: dict[str, str]) -> str:
    value = _required(form, "id", 41)
    if not views.is_stream_id(value):
        raise Refused(400, "field 'id' must be a stream entry id like 1700000000000-0")
    return value


def _decision_rows(decision: RateLimitDecision) -> list[dict[str, Any]]:
    return [
        {
            "policy": r.name,
            "limit": r.limit,
            "remaining": r.remaining,
            "reset_after": round(r.reset_after, 2),
            "allowed": r.allowed,
        }
        for r in decision.results
    ]


def add_routes(app: FastAPI, console: Console) -> None:
    """Register every page and action of *console* on *app*."""
    operator_dep: Any = Depends(console.resolve)
    _login_routes(app, console, operator_dep)
    _overview_routes(app, console, operator_dep)
    _stream_routes(app, console, operator_dep)
    _lock_routes(app, console, operator_dep)
    _limit_routes(app, console, operator_dep)
    _cache_routes(app, console, operator_dep)
    _session_routes(app, console, operator_dep)
    _pubsub_routes(app, console, operator_dep)

    @app.exception_handler(ToolkitError)
    async def _toolkit(request: Request, exc: ToolkitError) -> Response:
        return console.refusal(request, Refused(exc.status_code, exc.detail))


def _login_routes(app: FastAPI, console: Console, operator_dep: Any) -> None:
    """Log in with the console token, log out."""

    @app.get("/login")
    async def login_form(request: Request, next: str = "/") -> Response:
        if not console.enabled or console.token is None:
            raise Refused(404, "Not Found")
        return console.render(request, None, "login.html", next=next, title="Log in")

    @app.post("/login")
    async def login(request: Request) -> Response:
        if not console.enabled or console.token is None:
            raise Refused(404, "Not Found")
        form = await console.form(request)
        target = form.get("next", "/")
        if not target.startswith("/") or not set(target) <= _NEXT_OK or "//" in target:
            target = "/"  # never an open redirect
        await console.check_throttle(request)
        if not console.check_login_token(form.get("token")):
            await console.login_failed(request)
            return console.render(
                request,
                None,
                "login.html",
                next=target,
                title="Log in",
                status=401,
                error="wrong token",
            )
        client = console.client_address(request)
        operator = Operator("console-token", "cookie")
        await console.audit.record(
            console.redis(), operator, "console.login", "login form", "logged in", client
        )
        response = RedirectResponse(base(request) + target, status_code=303)
        response.set_cookie(
            COOKIE,
            console.signer.login_cookie(),
            max_age=int(console.signer.ttl),
            path=cookie_path(request),
            httponly=True,
            samesite="strict",
            secure=console.secure(request),
        )
        return response

    @app.post("/logout")
    async def logout(request: Request, op: Operator = operator_dep) -> Response:
        form = await console.form(request)
        if op.needs_csrf and not console.signer.csrf_valid(op, form.get("csrf")):
            raise Refused(403, "missing or invalid CSRF token: reload the page and try again")
        response = RedirectResponse(base(request) + "/login", status_code=303)
        response.delete_cookie(COOKIE, path=cookie_path(request))
        return response


def _overview_routes(app: FastAPI, console: Console, operator_dep: Any) -> None:
    """The overview, its live counters and the audit log."""

    @app.get("/")
    async def overview(request: Request, op: Operator = operator_dep) -> Response:
        data = await views.overview(console.redis(), console.prefix)
        audit = await console.audit.recent(console.redis(), 10)
        return console.render(request, op, "overview.html", title="Overview", audit=audit, **data)

    @app.get("/events")
    async def events(request: Request, op: Operator = operator_dep) -> Response:
        if console.live_views >= console.max_live_views:
            raise Refused(429, "too many live views are open in this worker")

        async def stream() -> AsyncIterator[bytes]:
            # counted from the first iteration: a generator never started never decrements
            console.live_views += 1
            try:
                deadline = time.monotonic() + 300  # EventSource reconnects by itself
                while time.monotonic() < deadline:
                    try:
                        data = await views.live_counters(console.redis())
                    except (RedisUnavailable, RedisError):
                        data = {"error": "Redis unavailable"}
                    yield b"event: counters\ndata: " + orjson.dumps(data) + b"\n\n"
                    await asyncio.sleep(2.0)
            finally:
                console.live_views -= 1

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/audit")
    async def audit(request: Request, op: Operator = operator_dep) -> Response:
        rows = await console.audit.recent(console.redis(), views.PAGE)
        if not wants_html(request):
            return Response(orjson.dumps([asdict(r) for r in rows]), media_type="application/json")
        return console.render(request, op, "audit.html", title="Audit", rows=rows)


def _stream_routes(app: FastAPI, console: Console, operator_dep: Any) -> None:
    """Streams, their dead letters, and replaying, deleting or trimming them."""

    @app.get("/streams")
    async def streams(
        request: Request, op: Operator = operator_dep, cursor: str | None = _q()
    ) -> Response:
        rows, more = await views.streams_page(console.redis(), console.prefix, _cursor(cursor))
        return console.render(request, op, "streams.html", title="Streams", rows=rows, more=more)

    @app.get("/streams/detail")
    async def stream_detail(
        request: Request,
        op: Operator = operator_dep,
        name: str = Query(min_length=1, max_length=200),
        after: str | None = _q(),
    ) -> Response:
        if after is not None and not views.is_stream_id(after):
            raise Refused(400, "invalid page cursor")
        client = console.redis()
        detail = await views.stream_detail(client, name)
        dead, more = await views.dead_letter_page(client, name, after)
        return console.render(
            request,
            op,
            "stream.html",
            title=f"Stream {name}",
            name=name,
            dead=dead,
            more=more,
            describe=act.describe,
            **detail,
        )

    async def _stream_action(request: Request, op: Operator, kind: str) -> Response:
        form = await console.action_form(request, op)
        name = _required(form, "stream", 200)
        client = console.redis()
        if kind == "trim":
            raw = _required(form, "maxlen", 12)
            if not raw.isdigit():
                raise Refused(400, "field 'maxlen' must be a non-negative integer")
            outcome = await act.trim(client, name, int(raw))
            target = f"{name} maxlen={raw}"
        else:
            entry = _entry_id(form)
            run = act.replay_dead_letter if kind == "replay" else act.delete_dead_letter
            outcome = await run(client, name, entry)
            target = f"{name} {entry}"
        back = f"/streams/detail?name={quote(name, safe='')}"
        return await console.done(request, op, f"stream.{kind}", target, outcome, back)

    @app.post("/streams/replay")
    async def replay(request: Request, op: Operator = operator_dep) -> Response:
        return await _stream_action(request, op, "replay")

    @app.post("/streams/delete")
    async def delete_dead(request: Request, op: Operator = operator_dep) -> Response:
        return await _stream_action(request, op, "delete")

    @app.post("/streams/trim")
    async def trim(request: Request, op: Operator = operator_dep) -> Response:
        return await _stream_action(request, op, "trim")


def _lock_routes(app: FastAPI, console: Console, operator_dep: Any) -> None:
    """Locks and semaphores, and force-releasing one."""

    @app.get("/locks")
    async def locks(
        request: Request, op: Operator = operator_dep, cursor: str | None = _q()
    ) -> Response:
        data = await views.locks_page(console.redis(), console.prefix, _cursor(cursor))
        return console.render(request, op, "locks.html", title="Locks and semaphores", **data)

    @app.get("/locks/release")
    async def confirm_release(
        request: Request, op: Operator = operator_dep, name: str = Query(max_length=200)
    ) -> Response:
        holder = await views.lock_holder(console.redis(), console.prefix, name)
        return console.render(
            request, op, "lock_release.html", title="Force release", name=name, holder=holder
        )

    @app.post("/locks/release")
    async def force_release(request: Request, op: Operator = operator_dep) -> Response:
        form = await console.action_form(request, op)
        name, token = _required(form, "name", 200), _required(form, "owner", 200)
        if form.get("confirm") != "yes":
            raise Refused(400, "confirm the force release (field confirm=yes)")
        outcome = await act.force_release_lock(console.redis(), console.prefix, name, token)
        return await console.done(request, op, "lock.force_release", name, outcome, "/locks")


def _limit_routes(app: FastAPI, console: Console, operator_dep: Any) -> None:
    """The configured limiters, an identity's state, resetting it."""

    def _limiter(name: str | None) -> Any:
        found = console.limiters.get(name or "")
        if found is None:
            raise Refused(400, "unknown limiter")
        return found

    @app.get("/limits")
    async def limits(
        request: Request,
        op: Operator = operator_dep,
        limiter: str | None = _q(),
        identity: str | None = _q(),
    ) -> Response:
        client = console.redis()
        state = None
        if limiter and identity:
            chosen = _limiter(limiter)
            built = chosen.build(client)
            state = _decision_rows(await built.peek(chosen.identity(identity)))
        described = {
            name: {
                "policies": ", ".join(
                    f"{p.name} ({p.limit} per {p.window:g} s)"
                    if p.window
                    else f"{p.name} ({p.limit} at once)"
                    for p in lim.build(client).policies
                ),
                "hint": lim.hint,
            }
            for name, lim in console.limiters.items()
        }
        return console.render(
            request,
            op,
            "limits.html",
            title="Rate limits",
            limiters=described,
            chosen=limiter,
            identity=identity,
            state=state,
        )

    @app.post("/limits/reset")
    async def reset_limit(request: Request, op: Operator = operator_dep) -> Response:
        form = await console.action_form(request, op)
        chosen = _limiter(form.get("limiter"))
        identity = _required(form, "identity")
        outcome = await act.reset_rate_limit(
            chosen.build(console.redis()), chosen.identity(identity)
        )
        back = f"/limits?limiter={quote(chosen.name, safe='')}&identity={quote(identity, safe='')}"
        return await console.done(
            request, op, "ratelimit.reset", f"{chosen.name} {identity}", outcome, back
        )


def _cache_routes(app: FastAPI, console: Console, operator_dep: Any) -> None:
    """Cache namespaces, keys and tags, and invalidating them."""

    def _namespace(value: str | None) -> str:
        name = value or console.cache_namespaces[0]
        if name not in console.cache_namespaces:
            raise Refused(400, "unknown cache namespace")
        return name

    @app.get("/cache")
    async def cache(
        request: Request,
        op: Operator = operator_dep,
        ns: str | None = _q(),
        cursor: str | None = _q(),
        tag: str | None = _q(),
        tag_cursor: str | None = _q(),
        key: str | None = _q(),
    ) -> Response:
        namespace = _namespace(ns)
        client = console.redis()
        view = await views.cache_view(
            client,
            get_cache(namespace, redis=client),
            cursor=_cursor(cursor),
            tag=tag or None,
            tag_cursor=_cursor(tag_cursor),
            key=key or None,
        )
        return console.render(
            request,
            op,
            "cache.html",
            title="Cache",
            view=view,
            ns=namespace,
            namespaces=console.cache_namespaces,
        )

    async def _cache_action(request: Request, op: Operator, kind: str) -> Response:
        form = await console.action_form(request, op)
        namespace = _namespace(form.get("ns"))
        service = get_cache(namespace, redis=console.redis())
        if kind == "tag":
            tag = _required(form, "tag")
            outcome = await act.invalidate_cache_tag(service, tag)
            target = f"{namespace} tag {tag}"
        else:
            key = _required(form, "key")
            outcome = await act.delete_cache_key(service, key)
            target = f"{namespace} key {key}"
        back = f"/cache?ns={quote(namespace, safe='')}"
        return await console.done(request, op, f"cache.{kind}", target, outcome, back)

    @app.post("/cache/invalidate-tag")
    async def invalidate_tag(request: Request, op: Operator = operator_dep) -> Response:
        return await _cache_action(request, op, "tag")

    @app.post("/cache/delete-key")
    async def delete_key(request: Request, op: Operator = operator_dep) -> Response:
        return await _cache_action(request, op, "key")


def _session_routes(app: FastAPI, console: Console, operator_dep: Any) -> None:
    """A user's or an id's sessions, and revoking them."""

    @app.get("/sessions")
    async def sessions(
        request: Request,
        op: Operator = operator_dep,
        user: str | None = _q(),
        id: str | None = _q(),
    ) -> Response:
        store = console.sessions(console.redis())
        records = []
        if user and store.subject_key is not None:
            records = (await store.list_for(user))[: views.PAGE]
        elif id:
            found = await store.get(id)
            records = [found] if found is not None else []
        return console.render(
            request,
            op,
            "sessions.html",
            title="Sessions",
            user=user,
            sid=id,
            records=records,
            indexed=store.subject_key is not None,
        )

    @app.post("/sessions/revoke")
    async def revoke(request: Request, op: Operator = operator_dep) -> Response:
        form = await console.action_form(request, op)
        store = console.sessions(console.redis())
        user = form.get("user", "").strip()
        if form.get("all") == "yes":
            user = _required(form, "user")
            if store.subject_key is None:
                raise Refused(400, "this session store does not index sessions by user")
            outcome = await act.revoke_user_sessions(store, user)
            target = f"user {user}"
        else:
            sid = _required(form, "id", 200)
            outcome = await act.revoke_session(store, sid)
            target = f"session {sid[:8]}…"
        back = f"/sessions?user={quote(user, safe='')}" if user else "/sessions"
        return await console.done(request, op, "session.revoke", target, outcome, back)


def _pubsub_routes(app: FastAPI, console: Console, operator_dep: Any) -> None:
    """Channels and their subscribers."""

    @app.get("/pubsub")
    async def pubsub(request: Request, op: Operator = operator_dep) -> Response:
        rows = await views.pubsub_view(console.redis(), console.prefix)
        return console.render(request, op, "pubsub.html", title="Pub/sub", rows=rows)
