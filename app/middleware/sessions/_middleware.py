"""``SessionMiddleware``: server-side sessions behind ``request.session`` (pure ASGI).

The cookie holds only a signed session id (``<id>.<HMAC-SHA256>``, signed with
the first secret, verified against each; a cookie verified by an older secret is
re-signed with the current one). The data lives in Redis through
``SessionStore``.

**Lazy.** ``scope["session"]`` is a ``Session`` that does nothing until used. A
request without a session cookie gets an empty session at once; a request with
one reads Redis only when the session is *loaded*: by the ``SessionDep``
dependency (``app.api.deps``), by ``await load_session(request)``, or by every
request when the middleware is built with ``autoload=True``. Reading
``request.session`` on a request whose cookie names a stored session that was
not loaded raises ``SessionNotLoaded`` (a programming error). A request that
never loads or changes its session makes no Redis call.

**Saved when modified, before the response starts.** The changes (top-level
keys set or deleted, including in-place changes to a list or dict that was read)
go to Redis in one ``SessionStore.merge`` call when the app sends
``http.response.start``, so the client never holds a cookie for a session that
was not stored, and a failure becomes the response: ``409`` problem+json when a
concurrent request changed the same key (``SessionConflict``), ``503`` when
Redis is down and ``sessions_failure_mode`` is ``closed``. Changes to different
keys by concurrent requests are merged; a session deleted meanwhile (logout) is
not written back: the changes are dropped and the cookie is cleared.

**Never an error for a bad cookie.** A tampered, expired or unknown cookie gives
a fresh empty session (a new id once something is stored; a client-chosen id is
never adopted), and the stale cookie is cleared.

**Cookie.** ``SESSION_COOKIE_NAME`` (default ``session``), sent as
``__Host-session`` when ``APP_ENV`` is not development/test: the ``__Host-``
prefix makes browsers refuse it unless it is ``Secure``, ``Path=/`` and has
no ``Domain``, so a sibling subdomain cannot plant one (cookie tossing).

**Stacking.** This layer belongs inside idempotency and HTTP caching
(``app.middleware.stack.install_toolkit``): they must see its ``Set-Cookie``
and its 409/503 answers. When it replaces a response it marks the scope
(``app.sessions.replaced``), so they release the key and never store it; it
refuses to run (startup failure) when it finds itself outside them.

``session.regenerate()`` moves the session to a new id when the response is
saved (call it after a login); the old id reads and writes nothing from then
on (a fixated cookie is worthless), and a request that raced the login with
the old cookie within ``regenerate_grace`` seconds gets an empty session but
leaves the browser's cookie alone (it is not cleared as a forged one).
``session.clear()`` / ``session.invalidate()`` delete the
session (logout); keys set after ``clear()`` start a new session with a new id.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import logging
import weakref
from collections.abc import Iterator, MutableMapping, Sequence
from typing import Any, Literal

from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection, cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.config import FailureMode, check_secret_keys, get_settings
from app.core.errors import ConfigurationError, RedisUnavailable, SessionNotFound, ToolkitError
from app.core.redis import AnyRedis, get_redis
from app.http.problems import send_problem
from app.middleware._order import REPLACED_KEY, enter_layer, pass_lifespan
from app.services.sessions import (
    DEFAULT_ABSOLUTE_TTL,
    DEFAULT_IDLE_TTL,
    SessionRecord,
    SessionStore,
    is_session_id,
)

__all__ = [
    "Session",
    "SessionMiddleware",
    "SessionNotLoaded",
    "get_session",
    "load_session",
]

log = logging.getLogger("app.sessions")

_CONTEXT = b"app.sessions.cookie.v1\x00"  # domain separation from other uses of the secret
_SIG_LEN = 43  # base64url of a SHA-256 MAC, unpadded
_EXPIRED = "Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT"
_MUTABLE = (dict, list, set, bytearray)


class SessionNotLoaded(RuntimeError):
    """``request.session`` was used before the stored session was loaded."""


class Session(MutableMapping[str, Any]):
    """The session of one request; a mutable mapping like Starlette's ``request.session``.

    Changes are tracked per top-level key. ``load()`` reads it from Redis (at
    most once); ``regenerate()``, ``invalidate()`` and ``clear()`` take effect
    when the response is saved.
    """

    __slots__ = (
        "_changed",
        "_committed",
        "_cookie_id",
        "_cookie_seen",
        "_data",
        "_degraded",
        "_deleted",
        "_failure",
        "_invalidated",
        "_late",
        "_loaded",
        "_mw",
        "_parsed",
        "_record",
        "_regenerate",
        "_resign",
        "_scope",
        "_snapshots",
        "accessed",
    )

    def __init__(self, middleware: SessionMiddleware, scope: Scope) -> None:
        self._mw = middleware
        self._scope = scope
        self._parsed = False
        self._loaded = False
        self._cookie_seen = False
        self._cookie_id: str | None = None
        self._resign = False
        self._record: SessionRecord | None = None
        self._data: dict[str, Any] = {}
        self._snapshots: dict[str, Any] = {}
        self._changed: set[str] = set()
        self._deleted: set[str] = set()
        self._regenerate = False
        self._invalidated = False
        self._degraded = False
        self._committed = False
        self._late = False
        self._failure: BaseException | None = None
        self.accessed = False

    # -- state ----------------------------------------------------------------

    @property
    def id(self) -> str | None:
        """The stored session's id (None while the session is new or not loaded)."""
        return self._record.id if self._record is not None else None

    @property
    def record(self) -> SessionRecord | None:
        """The record as loaded (None for a new session)."""
        return self._record

    @property
    def is_new(self) -> bool:
        """True when no stored session backs this request (yet)."""
        self._ready()
        return self._record is None

    @property
    def loaded(self) -> bool:
        """True once the data can be read (loaded, or known to be new)."""
        self._parse()
        return self._loaded

    @property
    def modified(self) -> bool:
        """True when the response will write something (Starlette's flag, by another route)."""
        return bool(self._changed or self._deleted or self._regenerate or self._invalidated)

    def mark_accessed(self) -> None:
        """Called by Starlette's ``request.session``: the response will carry ``Vary: Cookie``."""
        self.accessed = True

    def _parse(self) -> None:
        if self._parsed:
            return
        self._parsed = True
        found = self._mw._read_cookie(self._scope)
        if found is None:
            self._loaded = True
            return
        self._cookie_seen = True
        verified = self._mw._verify(found)
        if verified is None:
            self._loaded = True  # tampered or foreign: a fresh session, no Redis call
            return
        self._cookie_id, key_index = verified
        self._resign = key_index > 0

    def _ready(self) -> None:
        self.accessed = True
        if not self._loaded:
            self._parse()
            if not self._loaded:
                raise SessionNotLoaded(
                    "the session is stored in Redis and was not loaded: declare "
                    "`session: SessionDep` (app.api.deps) in the route, call "
                    "`await load_session(request)` first, or build SessionMiddleware "
                    "with autoload=True"
                )

    async def load(self) -> Session:
        """Read the session from Redis if the cookie names one (once per request).

        Refreshes its idle timeout. No Redis call when there is no valid cookie.
        Redis down: raises ``RedisUnavailable`` (503) when the failure mode is
        ``closed``; with ``open`` the request continues with an empty session
        whose changes are not saved.
        """
        self.accessed = True
        self._parse()
        if self._loaded:
            return self
        assert self._cookie_id is not None
        try:
            record = await self._mw.store().load(self._cookie_id)
        except RedisUnavailable as exc:
            if self._mw.failure_mode == "open":
                log.warning("session not loaded, Redis is unavailable (fail-open): %s", exc)
                self._degraded = True
                self._loaded = True
                return self
            self._failure = exc
            raise
        if record is not None:
            self._record = record
            self._data = dict(record.data)
        self._loaded = True
        return self

    # -- intent ---------------------------------------------------------------

    def regenerate(self) -> None:
        """Move the session to a new id when the response is saved (after a login).

        The old id stops working at once for reads and writes (fixation defence).
        """
        self._ready()
        self._regenerate = True
        self._touched()

    def invalidate(self) -> None:
        """Delete the session when the response is saved (logout); its cookie is cleared."""
        self._ready()
        self._invalidated = True
        self._data.clear()
        self._changed.clear()
        self._deleted.clear()
        self._snapshots.clear()
        self._regenerate = False
        self._touched()

    def clear(self) -> None:
        """Same as ``invalidate()``: keys set afterwards start a new session (new id)."""
        self.invalidate()

    def _touched(self) -> None:
        if self._committed:
            self._late = True

    # -- mapping --------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        self._ready()
        value = self._data[key]
        if isinstance(value, _MUTABLE) and key not in self._snapshots:
            self._snapshots[key] = copy.deepcopy(value)  # to notice in-place changes
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self._ready()
        if not isinstance(key, str) or not key:
            raise TypeError(f"session keys must be non-empty strings, got {key!r}")
        self._data[key] = value
        self._changed.add(key)
        self._deleted.discard(key)
        self._touched()

    def __delitem__(self, key: str) -> None:
        self._ready()
        del self._data[key]
        self._changed.discard(key)
        self._deleted.add(key)
        self._touched()

    def __iter__(self) -> Iterator[str]:
        self._ready()
        return iter(self._data)

    def __len__(self) -> int:
        self._ready()
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        self._ready()
        return key in self._data

    def __repr__(self) -> str:
        state = "loaded" if self._loaded else "not loaded"
        return f"<Session {self.id or 'new'} {state} keys={sorted(self._data)}>"

    # -- save -----------------------------------------------------------------

    def _pending(self) -> dict[str, Any]:
        changes = {k: self._data[k] for k in self._changed}
        for key, before in self._snapshots.items():
            if key not in changes and key in self._data and self._data[key] != before:
                changes[key] = self._data[key]
        return changes

    async def _commit(self) -> list[str]:
        """Write what the request changed; return the Set-Cookie values to send."""
        self._committed = True
        if not self._parsed or not self._loaded or self._degraded:
            return []
        mw = self._mw
        cookies: list[str] = []
        try:
            if self._invalidated:
                if self._record is not None:
                    await mw.store().delete(self._record.id)
                if self._changed:  # keys set after clear(): a new session
                    cookies.append(await self._create())
                elif self._cookie_seen:
                    cookies.append(mw._expired_cookie())
            elif self._record is None:
                if self._changed:
                    cookies.append(await self._create())
                elif self._cookie_seen and not (
                    self._cookie_id and await mw.store().was_regenerated(self._cookie_id)
                ):  # tampered, expired or unknown; a just-regenerated id raced a login: keep it
                    cookies.append(mw._expired_cookie())
            else:
                cookies += await self._save(self._record)
        except RedisUnavailable as exc:
            if mw.failure_mode == "open":
                log.warning("session changes not saved, Redis is unavailable (fail-open): %s", exc)
                return []
            raise
        finally:
            self._changed.clear()
            self._deleted.clear()
            self._snapshots.clear()
        return cookies

    async def _create(self) -> str:
        client = self._scope.get("client")
        record = await self._mw.store().create(
            {k: self._data[k] for k in self._data}, client_ip=client[0] if client else None
        )
        self._record = record
        return self._mw._cookie(record.id)

    async def _save(self, record: SessionRecord) -> list[str]:
        changes = self._pending()
        deleted = self._deleted
        current = record.id
        if changes or deleted or self._regenerate:
            try:
                result = await self._mw.store().merge(
                    record.id,
                    base_version=record.version,
                    changes=changes,
                    deleted=deleted,
                    regenerate=self._regenerate,
                    subject=record.subject or "",
                )
            except SessionNotFound as exc:
                log.info("session changes dropped: %s", exc)
                self._record = None
                if await self._mw.store().was_regenerated(record.id):
                    return []  # a login moved it meanwhile: the browser holds the new cookie
                return [self._mw._expired_cookie()]
            if result.id != current:
                return [self._mw._cookie(result.id)]
        if self._resign and current == self._cookie_id:
            return [self._mw._cookie(current)]
        return []


def get_session(connection: HTTPConnection | Scope) -> Session:
    """The ``Session`` of a request (or scope); raises when the middleware is missing."""
    scope = connection.scope if isinstance(connection, HTTPConnection) else connection
    session = scope.get("session")
    if not isinstance(session, Session):
        raise RuntimeError(
            "app.middleware.sessions.SessionMiddleware is not installed: "
            "app.add_middleware(SessionMiddleware, secret_key=...)"
        )
    return session


async def load_session(connection: HTTPConnection) -> Session:
    """Load and return the request's session (a FastAPI dependency: ``Depends(load_session)``)."""
    return await get_session(connection).load()


def _as_keys(secret_key: str | bytes | Sequence[str | bytes] | None) -> list[bytes]:
    if secret_key is None:
        return get_settings().signing_keys()
    items = [secret_key] if isinstance(secret_key, str | bytes) else list(secret_key)
    keys = [k.encode("utf-8") if isinstance(k, str) else bytes(k) for k in items]
    if not keys or not all(keys):
        raise ConfigurationError("SessionMiddleware needs at least one non-empty secret key")
    return keys


class SessionMiddleware:
    """Server-side sessions for any ASGI app; see the module docstring for the behaviour.

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
        idle_ttl, absolute_ttl, regenerate_grace, namespace, subject_key: passed
            to the ``SessionStore`` built for the global client.
        store: use this store instead (its client is used; ``get_redis()`` is not).
        failure_mode: ``closed`` (503 when Redis is down) or ``open`` (empty,
            unsaved session); default: ``settings.sessions_failure_mode``.
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
        idle_ttl: float = DEFAULT_IDLE_TTL,
        absolute_ttl: float = DEFAULT_ABSOLUTE_TTL,
        regenerate_grace: float = 10.0,
        namespace: str = "session",
        subject_key: str | None = "user",
        store: SessionStore | None = None,
        failure_mode: FailureMode | None = None,
        autoload: bool = False,
    ) -> None:
        self.app = app
        settings = get_settings()
        check_secret_keys(secret_key, source="SessionMiddleware(secret_key=...)")
        keys = _as_keys(secret_key)
        self._signers = [hmac.new(key, _CONTEXT, hashlib.sha256) for key in keys]
        secure = settings.app_env != "development" if https_only is None else https_only
        if same_site not in ("lax", "strict", "none"):
            raise ConfigurationError(f"same_site must be lax, strict or none, got {same_site!r}")
        if same_site == "none" and not secure:
            raise ConfigurationError("SameSite=None cookies must be Secure: set https_only=True")
        name = cookie_name or settings.session_cookie_name or "session"
        if name.startswith("__Host-"):
            name, host_prefix = name.removeprefix("__Host-"), True
        if host_prefix is None:
            strict = settings.app_env not in ("development", "test")
            host_prefix = strict and secure and path == "/" and domain is None
            if strict and not host_prefix:
                log.warning(
                    "session cookie %r is sent without the __Host- prefix because it is not "
                    "Secure with Path=/ and no Domain; a sibling subdomain can plant one",
                    name,
                )
        if host_prefix and (not secure or path != "/" or domain is not None):
            raise ConfigurationError(
                "a __Host- cookie must be Secure with Path=/ and no Domain: "
                "set https_only=True, path='/' and domain=None"
            )
        self.cookie_name = f"__Host-{name}" if host_prefix else name
        self.failure_mode: FailureMode = failure_mode or settings.sessions_failure_mode
        self.autoload = autoload
        store_ttl = store.absolute_ms / 1000 if store is not None else absolute_ttl
        max_age = f"; Max-Age={max(1, int(store_ttl))}" if persistent else ""
        flags = f"; Path={path}" + (f"; Domain={domain}" if domain else "") + "; HttpOnly"
        flags += ("; Secure" if secure else "") + f"; SameSite={same_site.capitalize()}"
        self._set_suffix = max_age + flags
        self._expire_suffix = f"; {_EXPIRED}" + flags
        self._store = store
        self._store_options: dict[str, Any] = {
            "idle_ttl": idle_ttl,
            "absolute_ttl": absolute_ttl,
            "regenerate_grace": regenerate_grace,
            "namespace": namespace,
            "subject_key": subject_key,
        }
        self._stores: weakref.WeakKeyDictionary[Any, SessionStore] = weakref.WeakKeyDictionary()

    def store(self, client: AnyRedis | None = None) -> SessionStore:
        """The store for *client* (default: the global client, looked up now)."""
        if self._store is not None:
            return self._store
        redis = client if client is not None else get_redis()
        found = self._stores.get(redis)
        if found is None:
            found = self._stores[redis] = SessionStore(redis, **self._store_options)
        return found

    # -- cookies --------------------------------------------------------------

    def _mac(self, signer: hmac.HMAC, session_id: str) -> str:
        mac = signer.copy()
        mac.update(session_id.encode("ascii"))
        return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode("ascii")

    def sign(self, session_id: str) -> str:
        """The cookie value for *session_id*, signed with the current key."""
        return f"{session_id}.{self._mac(self._signers[0], session_id)}"

    def _verify(self, value: str) -> tuple[str, int] | None:
        session_id, dot, sig = value.rpartition(".")
        if not dot or len(sig) != _SIG_LEN or not sig.isascii() or not is_session_id(session_id):
            return None
        for index, signer in enumerate(self._signers):
            if hmac.compare_digest(self._mac(signer, session_id), sig):
                return session_id, index
        return None

    def _read_cookie(self, scope: Scope) -> str | None:
        for name, value in scope.get("headers", ()):
            if name == b"cookie":
                found = cookie_parser(value.decode("latin-1")).get(self.cookie_name)
                if found:
                    return found
        return None

    def _cookie(self, session_id: str) -> str:
        return f"{self.cookie_name}={self.sign(session_id)}{self._set_suffix}"

    def _expired_cookie(self) -> str:
        return f"{self.cookie_name}={self._expire_suffix}"

    # -- ASGI -----------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await pass_lifespan(self.app, "sessions", scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        enter_layer(scope, "sessions")
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
        started = False
        replaced = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started, replaced
            if message["type"] == "http.response.start":
                started = True
                try:
                    cookies = await session._commit() if session.accessed else []
                except ToolkitError as exc:
                    # The response must not claim a success the session cannot back.
                    replaced = True
                    scope[REPLACED_KEY] = True  # outer layers: release, never store
                    await send_problem(send, exc, instance, [(b"vary", b"Cookie")])
                    return
                if session.accessed:
                    message["headers"] = list(message.get("headers", ()))
                    headers = MutableHeaders(scope=message)
                    headers.add_vary_header("Cookie")
                    for cookie in cookies:
                        headers.append("set-cookie", cookie)
            elif replaced:
                return
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except RedisUnavailable as exc:
            if started or exc is not session._failure:
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
