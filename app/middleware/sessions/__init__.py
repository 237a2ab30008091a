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

from app.middleware.sessions._middleware import SessionMiddleware
from app.middleware.sessions._session import Session, SessionNotLoaded, get_session, load_session

__all__ = [
    "Session",
    "SessionMiddleware",
    "SessionNotLoaded",
    "get_session",
    "load_session",
]
