"""``Session``: one request's session, loaded lazily, saved when the response starts."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, MutableMapping
from typing import Any, Protocol

from starlette.requests import HTTPConnection
from starlette.types import Scope

from app.core.errors import RedisUnavailable, SessionNotFound, StateError, UsageError
from app.core.redis import AnyRedis
from app.middleware.sessions._cookie import SessionCookie
from app.services.sessions import SessionRecord, SessionStore

__all__ = ["Session", "SessionLayer", "SessionNotLoaded", "get_session", "load_session"]

log = logging.getLogger("app.sessions")

_MUTABLE = (dict, list, set, bytearray)


class SessionLayer(Protocol):
    """What a ``Session`` needs from the ``SessionMiddleware`` that made it."""

    cookie: SessionCookie

    def store(self, client: AnyRedis | None = None) -> SessionStore:
        """The store for *client* (default: the global client, looked up now)."""
        ...

    def failed(self, exc: RedisUnavailable) -> None:
        """Count and log a Redis failure; return when fail-open, re-raise *exc* when closed."""
        ...


class SessionNotLoaded(StateError):
    """``request.session`` was used before the stored session was loaded.

    A programming error: a ``StateError``, so also a ``RuntimeError``.
    """


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

    def __init__(self, middleware: SessionLayer, scope: Scope) -> None:
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
        found = self._mw.cookie.read(self._scope)
        if found is None:
            self._loaded = True
            return
        self._cookie_seen = True
        verified = self._mw.cookie.verify(found)
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
        if not self._parsed:
            self._parse()
        if self._loaded:
            return self
        assert self._cookie_id is not None
        try:
            record = await self._mw.store().load(self._cookie_id)
        except RedisUnavailable as exc:
            self._failure = exc  # re-raised when fail-closed: the middleware answers 503
            self._mw.failed(exc)
            self._failure = None  # fail-open: an empty session whose changes are not saved
            self._degraded = True
            self._loaded = True
            return self
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
            raise UsageError(f"session keys must be non-empty strings, got {key!r}")
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

    def _settled(self) -> bool:
        """True when saving has nothing to do (a stored session only read: no write, no
        cookie); the session then counts as saved, so later changes are reported as late."""
        if self._record is None or (
            self._changed
            or self._deleted
            or self._snapshots
            or self._regenerate
            or self._invalidated
            or self._resign
        ):
            return False
        self._committed = True
        return True

    async def _commit(self) -> list[str]:
        """Write what the request changed; return the Set-Cookie values to send."""
        self._committed = True
        if not self._parsed or not self._loaded or self._degraded or self._settled():
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
                    cookies.append(mw.cookie.expired())
            elif self._record is None:
                if self._changed:
                    cookies.append(await self._create())
                elif self._cookie_seen and not (
                    self._cookie_id and await mw.store().was_regenerated(self._cookie_id)
                ):  # tampered, expired or unknown; a just-regenerated id raced a login: keep it
                    cookies.append(mw.cookie.expired())
            else:
                cookies += await self._save(self._record)
        except RedisUnavailable as exc:
            mw.failed(exc)  # re-raises when fail-closed
            return []  # fail-open: the changes are not saved
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
        return self._mw.cookie.set(record.id)

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
                return [self._mw.cookie.expired()]
            if result.id != current:
                return [self._mw.cookie.set(result.id)]
        if self._resign and current == self._cookie_id:
            return [self._mw.cookie.set(current)]
        return []


def get_session(connection: HTTPConnection | Scope) -> Session:
    """The ``Session`` of a request (or scope); raises when the middleware is missing."""
    scope = connection.scope if isinstance(connection, HTTPConnection) else connection
    session = scope.get("session")
    if not isinstance(session, Session):
        raise StateError(
            "app.middleware.sessions.SessionMiddleware is not installed: "
            "app.add_middleware(SessionMiddleware, secret_key=...)"
        )
    return session


async def load_session(connection: HTTPConnection) -> Session:
    """Load and return the request's session (a FastAPI dependency: ``Depends(load_session)``)."""
    return await get_session(connection).load()
