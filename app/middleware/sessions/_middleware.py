"""``SessionMiddleware``: the ASGI layer that gives each request its ``Session``."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, Final, Literal

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.config import FailureMode, check_secret_keys, get_settings
from app.core.errors import RedisUnavailable, ToolkitError
from app.core.guard import Duration, FailOpen, PerClient, as_seconds
from app.core.redis import AnyRedis, get_redis
from app.http.problems import send_problem
from app.middleware._order import REPLACED_KEY, enter_layer, enter_or_pass
from app.middleware.sessions._cookie import SessionCookie, signing_keys
from app.middleware.sessions._session import Session
from app.services.sessions import (
    DEFAULT_ABSOLUTE_TTL,
    DEFAULT_IDLE_TTL,
    SessionStore,
    touch_after_seconds,
)

__all__ = ["SessionMiddleware"]

log = logging.getLogger("app.sessions")


class _Backend:
    """A store and the degraded-mode bookkeeping of its client (one per client)."""

    __slots__ = ("fail_open", "store")

    def __init__(self, store: SessionStore, failure_mode: FailureMode) -> None:
        self.store = store
        self.fail_open = FailOpen(
            store.guard,
            log,
            enabled=failure_mode == "open",
            fallback="serving empty sessions and dropping their changes",
        )


class SessionMiddleware:
    """Server-side sessions for any ASGI app; see the package docstring for the behaviour.

    Args:
        app: the ASGI app.
        secret_key: HMAC key, or keys (sign with the first, verify with all, for
            rotation); default: ``settings.signing_keys()``.
        cookie_name: cookie name (default ``SESSION_COOKIE_NAME`` or ``session``); with
            ``host_prefix`` it is sent as ``__Host-<name>``.
        https_only: the ``Secure`` flag; default: on unless ``APP_ENV=development``.
        same_site: ``lax`` (default), ``strict`` or ``none``.
        path, domain: cookie scope. ``host_prefix`` requires Secure, ``path="/"``, no domain.
        host_prefix: send the cookie as ``__Host-<name>``; default: on when ``APP_ENV`` is
            not development/test (production-strict) and the cookie allows it (Secure,
            ``path="/"``, no domain; otherwise a warning says why it is off).
        persistent: send ``Max-Age`` (the absolute lifetime); False makes a
            browser-session cookie.
        idle_ttl, absolute_ttl, regenerate_grace, touch_after, namespace, subject_key:
            passed to the ``SessionStore`` built for each client (one per client, on its
            first request); bad durations raise ``ConfigurationError`` here.
        store: use this store instead (its client is used; ``get_redis()`` is not).
        failure_mode: ``closed`` (503 when Redis is down) or ``open`` (empty,
            unsaved session); default: ``settings.sessions_failure_mode``. Either
            way a failure is logged once per change of the situation, not per request.
        autoload: load the session of every request that carries a cookie
            (Starlette-style ``request.session`` without the dependency).
    """

    def __init__(
        self,
        app: ASGIApp,
        secret_key: str | bytes | Sequence[str | bytes] | None = None,
        *,
        cookie_name: str | None = None,
        https_only: bool | None = None,
        same_site: Literal["lax", "strict", "none"] = "lax",
        path: str = "/",
        domain: str | None = None,
        host_prefix: bool | None = None,
        persistent: bool = True,
        idle_ttl: Duration = DEFAULT_IDLE_TTL,
        absolute_ttl: Duration = DEFAULT_ABSOLUTE_TTL,
        regenerate_grace: Duration = 10.0,
        touch_after: Duration | None = None,
        namespace: str = "session",
        subject_key: str | None = "user",
        store: SessionStore | None = None,
        failure_mode: FailureMode | None = None,
        autoload: bool = False,
    ) -> None:
        self.app = app
        settings = get_settings()
        check_secret_keys(secret_key, source="SessionMiddleware(secret_key=...)")
        if store is None:  # the stores are built per client later: refuse bad values now
            touch_after_seconds(touch_after, as_seconds(idle_ttl, "idle_ttl"))
            as_seconds(regenerate_grace, "regenerate_grace", allow_zero=True)
            store_ttl = as_seconds(absolute_ttl, "absolute_ttl")
        else:
            store_ttl = store.absolute_ms / 1000
        self.cookie = SessionCookie(  # its name and attributes, signing and verifying ids
            signing_keys(secret_key, settings),
            settings,
            cookie_name=cookie_name,
            https_only=https_only,
            same_site=same_site,
            path=path,
            domain=domain,
            host_prefix=host_prefix,
            max_age=max(1, int(store_ttl)) if persistent else None,
        )
        self.cookie_name = self.cookie.name
        self.failure_mode: FailureMode = failure_mode or settings.sessions_failure_mode
        self.autoload = autoload
        self._store_options: dict[str, Any] = {
            "idle_ttl": idle_ttl,
            "absolute_ttl": absolute_ttl,
            "regenerate_grace": regenerate_grace,
            "touch_after": touch_after,
            "namespace": namespace,
            "subject_key": subject_key,
        }
        self._fixed = _Backend(store, self.failure_mode) if store is not None else None
        self._backends: PerClient[_Backend] = PerClient(self._new_backend)

    def _new_backend(self, client: AnyRedis) -> _Backend:
        return _Backend(SessionStore(client, **self._store_options), self.failure_mode)

    def _backend(self, client: AnyRedis | None) -> _Backend:
        if self._fixed is not None:
            return self._fixed
        return self._backends(client if client is not None else get_redis())

    def store(self, client: AnyRedis | None = None) -> SessionStore:
        """The store for *client* (default: the global client, looked up now)."""
        if self._fixed is not None:  # _backend() inlined: this runs on every session load
            return self._fixed.store
        return self._backends(client if client is not None else get_redis()).store

    def failed(self, exc: RedisUnavailable) -> None:
        """Count and log (once per change) a Redis failure met by a session.

        Returns in ``open`` failure mode (the session degrades); re-raises
        *exc* in ``closed`` mode (the request answers 503).
        """
        self._backend(None).fail_open.failed(exc)

    def sign(self, session_id: str) -> str:
        """The cookie value for *session_id*, signed with the current key."""
        return self.cookie.sign(session_id)

    # -- ASGI -----------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await enter_or_pass(self.app, "sessions", scope, receive, send)
            return
        enter_layer(scope, "sessions")  # what enter_or_pass does for HTTP, one await less
        session = Session(self, scope)
        scope["session"] = session
        instance = scope.get("path")
        if self.autoload:
            try:
                await session.load()
            except RedisUnavailable as exc:
                scope[REPLACED_KEY] = True
                await send_problem(send, exc, instance)
                return
        saving = _SaveOnStart(session, scope, send)
        try:
            await self.app(scope, receive, saving.send)
        except RedisUnavailable as exc:
            if saving.started or exc is not session._failure:
                raise
            scope[REPLACED_KEY] = True
            await send_problem(send, exc, instance, [(b"vary", b"Cookie")])
            return
        if session._late:
            log.warning(
                "session changed after the response started (%s %s); those changes are "
                "not saved: change the session before returning the response",
                scope.get("method"),
                instance,
            )


class _SaveOnStart:
    """The app's ``send``: saves the session when the response starts, and sets its cookie.

    A failure to save becomes the response (409 or 503 problem+json), and the
    scope is marked so outer layers release and never store it.
    """

    __slots__ = ("_send", "replaced", "scope", "session", "started")

    def __init__(self, session: Session, scope: Scope, send: Send) -> None:
        self.session = session
        self.scope = scope
        self._send = send
        self.started = False
        self.replaced = False

    async def send(self, message: Message) -> None:
        session = self.session
        if message["type"] == "http.response.start":
            self.started = True
            if session.accessed:
                try:  # a read settles without a coroutine: the common case awaits nothing
                    cookies = [] if session._settled() else await session._commit()
                except ToolkitError as exc:
                    # The response must not claim a success the session cannot back.
                    self.replaced = True
                    self.scope[REPLACED_KEY] = True  # outer layers: release, never store
                    instance = self.scope.get("path")
                    await send_problem(self._send, exc, instance, [(b"vary", b"Cookie")])
                    return
                message["headers"] = _with_session_headers(message.get("headers", ()), cookies)
        elif self.replaced:
            return
        await self._send(message)


def _with_session_headers(headers: Iterable[tuple[bytes, bytes]], cookies: list[str]) -> list[Any]:
    """A copy of the response's *headers* with ``Vary: Cookie`` added and *cookies* set."""
    out = list(headers)
    for name, _ in out:
        if name == b"vary":  # join the app's Vary values, as Starlette does
            MutableHeaders(raw=out).add_vary_header("Cookie")
            break
    else:
        out.append(_VARY_COOKIE)
    out += [(b"set-cookie", cookie.encode("latin-1")) for cookie in cookies]
    return out


_VARY_COOKIE: Final = (b"vary", b"Cookie")
