"""Idempotency-Key middleware per draft-ietf-httpapi-idempotency-key-header (pure ASGI).

``app.add_middleware(IdempotencyMiddleware)`` guards every POST and PATCH
that carries an ``Idempotency-Key`` header (``paths=`` narrows it to path
prefixes; ``required=True`` refuses unsafe requests without a key). Per
guarded request:

1. The key is validated: the draft's quoted sf-string (``"8e03..."``) or a
   Stripe-style bare token, 1-255 printable ASCII characters; else 400.
2. The request body is read (it is needed for the fingerprint before the
   handler runs) and handed to the app again through a wrapped ``receive``.
3. One Lua call claims the record ``HMAC(secret, caller, method, route,
   key)``. The caller is ``app.http.caller.resolve_caller``: the principal an
   auth layer declared (``set_principal``, or this middleware's ``principal=``
   callable), else the loaded session, else a keyed digest of the credential
   headers (``Authorization``, ``Proxy-Authorization``, ``Cookie``,
   ``X-API-Key``), so two clients that pick the same key never see each
   other's responses, nor learn (422) that the other used it. A request with
   none of these is anonymous: ``IDEMPOTENCY_ANONYMOUS=address`` (default)
   scopes it by client address through the trusted proxies, ``refuse``
   answers 400. During a secret rotation the caller's record under each
   fallback key is looked up first, so a retry still finds its response.
4. New: the handler runs while a heartbeat renews the short in-flight lease.
   The response is passed through as it is sent and teed into a buffer; the
   status, an allowlist of headers (``Retry-After`` included) and the body
   (up to a cap) are stored before the last chunk goes out. A response over
   the cap is still sent (marked ``Idempotency-Stored: false`` when its
   ``Content-Length`` says so up front); its retry is answered 410
   problem+json stating the original status, never an empty success. A
   handler exception, a 5xx, a transient status (408, 409, 425, 429, 503:
   ``IDEMPOTENCY_TRANSIENT_STATUSES``) or a response the session layer
   replaced releases the key so a retry runs again once the condition has
   cleared (``store_server_errors=True`` stores the other 5xx, as Stripe does).
   Completed: the stored response is replayed byte for byte with
   ``Idempotent-Replayed: true``. Same key, other method/path/query/body: 422.
   Still in flight: 409 with ``Retry-After`` (or, with ``on_conflict="wait"``,
   a bounded wait woken when the first request ends, then the replay).
5. Redis down: 503 and the handler does not run (``IDEMPOTENCY_FAILURE_MODE=open``
   runs it unprotected, marked ``Idempotency-Stored: false``).

Routes can also opt in one by one with the dependency
``app.api.deps.idempotency_key()`` (which documents the header and the
400/409/422 answers in OpenAPI); it needs this middleware installed, which
it drives through ``scope["app.idempotency"]``.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

import orjson
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.config import FailureMode, Settings, check_secret_keys, get_settings
from app.core.errors import (
    ConfigurationError,
    IdempotencyCallerUnknown,
    IdempotencyConflict,
    IdempotencyKeyInvalid,
    IdempotencyKeyMissing,
    IdempotencyMismatch,
    IdempotencyResponseNotKept,
    PayloadTooLarge,
    RedisUnavailable,
    ToolkitError,
)
from app.core.redis import AnyRedis, get_redis
from app.http.caller import Caller, caller_resolver, resolve_caller
from app.http.problems import PROBLEM_CONTENT_TYPE, send_problem
from app.middleware._order import enter_layer, pass_lifespan, session_replaced
from app.services.idempotency import Heartbeat, IdempotencyService

__all__ = [
    "DEFAULT_HEADER",
    "DEFAULT_STORED_HEADERS",
    "IDEMPOTENCY_RESPONSES",
    "SCOPE_KEY",
    "BodyFingerprint",
    "IdempotencyMiddleware",
    "PrincipalFunc",
    "StoredResponse",
    "default_principal",
    "guard_request",
    "parse_idempotency_key",
]

log = logging.getLogger("app.idempotency")

SCOPE_KEY: Final = "app.idempotency"
"""Where the middleware puts its per-request guard in the ASGI scope."""
DEFAULT_HEADER: Final = "Idempotency-Key"
DEFAULT_STORED_HEADERS: Final = ("content-type", "location", "etag", "link", "retry-after")
REPLAYED_HEADER: Final = (b"idempotent-replayed", b"true")
NOT_STORED_HEADER: Final = (b"idempotency-stored", b"false")

BodyFingerprint: TypeAlias = "Literal['raw', 'json'] | Callable[[bytes], bytes | str]"
"""``"raw"``: the body bytes; ``"json"``: canonical JSON (sorted keys, compact; a body
that is not JSON counts raw); a callable: its digest of the body (e.g. selected fields)."""
PrincipalFunc: TypeAlias = "Callable[[Scope], str | bytes | None]"
"""The authenticated principal from the ASGI scope; None or "" defers to ``resolve_caller``."""

_MAX_KEY_LENGTH: Final = 255


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A response as stored for replay; ``body`` is None when it was over the cap."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes | None


def parse_idempotency_key(value: bytes | str) -> str:
    """The key in an ``Idempotency-Key`` field value; raises ``IdempotencyKeyInvalid``.

    Accepts the draft's sf-string (``"abc"``, with ``\\"`` and ``\\\\`` escapes
    and optional ``;parameters``, which are ignored) and a bare token of visible
    ASCII characters (``abc``). The key, unquoted, must be 1-255 printable ASCII
    characters. ``"abc"`` and ``abc`` are the same key.
    """
    raw = value.encode("latin-1") if isinstance(value, str) else value
    text = raw.strip(b" \t")
    if text.startswith(b'"'):
        key = _parse_sf_string(text)
    else:
        if not text or any(b < 0x21 or b > 0x7E or b == 0x22 for b in text):
            raise IdempotencyKeyInvalid(
                "Idempotency-Key must be a quoted string or a token of visible ASCII "
                'characters, e.g. Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"'
            )
        key = text.decode("ascii")
    if not 1 <= len(key) <= _MAX_KEY_LENGTH:
        raise IdempotencyKeyInvalid(
            f"Idempotency-Key must be 1-{_MAX_KEY_LENGTH} characters long, got {len(key)}; "
            "a UUID is a good key"
        )
    return key


def _parse_sf_string(text: bytes) -> str:
    out = bytearray()
    i, n = 1, len(text)
    while i < n:
        b = text[i]
        if b == 0x5C:  # backslash: only \" and \\ are escapes (RFC 8941 §3.3.3)
            if i + 1 >= n or text[i + 1] not in (0x22, 0x5C):
                break
            out.append(text[i + 1])
            i += 2
            continue
        if b == 0x22:
            rest = text[i + 1 :]
            if rest and not (
                rest.startswith(b";") and all(0x20 <= c <= 0x7E and c != 0x22 for c in rest)
            ):
                break
            return out.decode("ascii")
        if b < 0x20 or b > 0x7E:
            break
        out.append(b)
        i += 1
    raise IdempotencyKeyInvalid(
        "Idempotency-Key is a malformed quoted string: use printable ASCII between double "
        'quotes, escaping only \\" and \\\\, e.g. Idempotency-Key: "order-42"'
    )


def default_principal(scope: Scope) -> str:
    """``auth:<sha256 of the Authorization header>``, or ``""`` without one.

    The scope of earlier releases, kept for apps that pass it as ``principal=``;
    the default is now ``app.http.caller.resolve_caller``, which also tells
    cookie, ``X-API-Key`` and session callers apart.
    """
    for name, value in scope["headers"]:
        if name == b"authorization":
            return "auth:" + hashlib.sha256(value).hexdigest()
    return ""


def _header_values(scope: Scope, name: bytes) -> list[bytes]:
    return [value for key, value in scope["headers"] if key == name]


def _length_prefixed(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _encode(text: str | bytes | None) -> bytes:
    if text is None:
        return b""
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")


class _Abort(Exception):
    """Ends a guarded request early with a replay or a problem (never seen by users)."""

    def __init__(
        self, error: ToolkitError | None = None, replay: StoredResponse | None = None
    ) -> None:
        super().__init__("idempotency short-circuit")
        self.error = error
        self.replay = replay

    async def respond(self, send: Send, scope: Scope) -> None:
        if self.replay is not None and self.replay.body is None:
            await _send_not_kept(send, self.replay, scope)
        elif self.replay is not None:
            await _send_replay(send, self.replay)
        else:
            assert self.error is not None
            await send_problem(send, self.error, instance=scope.get("path"))


async def _send_replay(send: Send, stored: StoredResponse) -> None:
    body = stored.body if stored.body is not None else b""
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in stored.headers]
    headers.append((b"content-length", str(len(body)).encode()))
    headers.append(REPLAYED_HEADER)
    await send({"type": "http.response.start", "status": stored.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_NOT_KEPT_PASSED: Final = frozenset({"location", "content-location", "link", "retry-after"})


async def _send_not_kept(send: Send, stored: StoredResponse, scope: Scope) -> None:
    """The retry of a request whose response was over the cap: 410, never an empty success."""
    error = IdempotencyResponseNotKept(
        f"this request was already processed (status {stored.status}), but its response body "
        "was over the storage cap and was not kept; the request was not run again. Read the "
        "result from the resource it created (see Location), or send a new Idempotency-Key "
        "to run a new request",
        original_status=stored.status,
    )
    extra = [
        (k.encode("latin-1"), v.encode("latin-1"))
        for k, v in stored.headers
        if k in _NOT_KEPT_PASSED
    ]
    await send_problem(
        send,
        error,
        instance=scope.get("path"),
        extra_headers=[*extra, REPLAYED_HEADER, NOT_STORED_HEADER],
    )


class IdempotencyMiddleware:
    """Pure ASGI Idempotency-Key middleware (see the module docstring for the flow).

    Args:
        app: the ASGI app to guard.
        methods: methods guarded automatically (default POST and PATCH).
        paths: path prefixes guarded automatically (``"/payments"`` covers
            ``/payments`` and ``/payments/...``); None: every path; ``()``: none
            (only routes with the ``idempotency_key()`` dependency).
        header_name: the request header carrying the key.
        required: refuse guarded requests without a key (400).
        ttl: seconds a completed response is replayable (default 24 h).
        lease: seconds an in-flight claim survives without a heartbeat (default 30);
            a crashed worker's key is claimable again after it.
        fingerprint: how the body enters the request fingerprint (``"raw"``,
            ``"json"`` or a callable); method, path and query always do.
        principal: the authenticated principal (callable on the scope); when it answers
            None or "", and by default, the caller is ``app.http.caller.resolve_caller``.
        anonymous: requests with no identifiable caller: ``"address"`` (scope by client
            address) or ``"refuse"`` (400); default ``IDEMPOTENCY_ANONYMOUS``.
        transient_statuses: statuses that release the key instead of being stored
            (default ``IDEMPOTENCY_TRANSIENT_STATUSES``: 408, 409, 425, 429, 503).
        on_conflict: ``"reject"`` (409 + ``Retry-After``) or ``"wait"`` (wait up to
            ``wait_timeout`` seconds for the first request, then replay it or 409).
        conflict_retry_after: the ``Retry-After`` seconds of a 409.
        stored_headers: response headers stored and replayed (case-insensitive).
        max_stored_body: largest response body stored for replay, in bytes.
        max_request_body: largest request body accepted on a guarded request (413 above).
        store_server_errors: store and replay 5xx responses instead of releasing the key.
        failure_mode: ``"closed"`` (503 when Redis is down) or ``"open"`` (run the
            handler unprotected); default ``IDEMPOTENCY_FAILURE_MODE``.
        secret: HMAC key for scopes; default the settings' signing keys (the current
            one stores, the fallbacks are looked up during a rotation).
        namespace: key space of the records (``<prefix>:<namespace>:{scope}``).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        methods: Iterable[str] = ("POST", "PATCH"),
        paths: Iterable[str] | None = None,
        header_name: str = DEFAULT_HEADER,
        required: bool = False,
        ttl: float = 86400,
        lease: float = 30.0,
        fingerprint: BodyFingerprint = "raw",
        principal: PrincipalFunc | None = None,
        anonymous: Literal["address", "refuse"] | None = None,
        transient_statuses: Iterable[int] | None = None,
        on_conflict: Literal["reject", "wait"] = "reject",
        wait_timeout: float = 10.0,
        conflict_retry_after: float = 1.0,
        stored_headers: Iterable[str] = DEFAULT_STORED_HEADERS,
        max_stored_body: int = 1024 * 1024,
        max_request_body: int = 10 * 1024 * 1024,
        store_server_errors: bool = False,
        failure_mode: FailureMode | None = None,
        secret: bytes | None = None,
        namespace: str = "idempotency.http",
    ) -> None:
        if on_conflict not in ("reject", "wait"):
            raise ConfigurationError(f"on_conflict must be 'reject' or 'wait', got {on_conflict!r}")
        if not callable(fingerprint) and fingerprint not in ("raw", "json"):
            raise ConfigurationError(
                f"fingerprint must be 'raw', 'json' or a callable, got {fingerprint!r}"
            )
        if failure_mode not in (None, "open", "closed"):
            raise ConfigurationError(
                f"failure_mode must be 'open' or 'closed', got {failure_mode!r}"
            )
        if max_stored_body < 0 or max_request_body < 0:
            raise ConfigurationError("max_stored_body and max_request_body must be >= 0")
        if wait_timeout < 0 or conflict_retry_after < 0:
            raise ConfigurationError("wait_timeout and conflict_retry_after must be >= 0")
        if not ttl > 0 or not lease > 0:
            raise ConfigurationError("ttl and lease must be positive seconds")
        if anonymous not in (None, "address", "refuse"):
            raise ConfigurationError(f"anonymous must be 'address' or 'refuse', got {anonymous!r}")
        check_secret_keys(secret, source="IdempotencyMiddleware(secret=...)")
        self.app = app
        self.methods = frozenset(m.upper() for m in methods)
        self.paths = None if paths is None else tuple(p.rstrip("/") or "/" for p in paths)
        self.header_name = header_name
        self.required = required
        self.ttl = ttl
        self.lease = lease
        self.fingerprint = fingerprint
        self.principal = principal
        self.on_conflict = on_conflict
        self.wait_timeout = wait_timeout if on_conflict == "wait" else 0.0
        self.conflict_retry_after = conflict_retry_after
        self.stored_headers = frozenset(h.lower().encode("latin-1") for h in stored_headers)
        self.max_stored_body = max_stored_body
        self.max_request_body = max_request_body
        self.store_server_errors = store_server_errors
        self.failure_mode = failure_mode
        self.anonymous = anonymous
        self.transient_statuses = (
            None if transient_statuses is None else frozenset(transient_statuses)
        )
        self.secret = secret
        self.namespace = namespace
        self.stats: collections.Counter[str] = collections.Counter()
        """Counts: executed, replayed, conflicts, mismatches, released, lease_lost,
        not_stored, unprotected (read them for metrics)."""
        self._settings: Settings | None = None
        self._secret: bytes = b""
        self._secrets: list[bytes] = []
        self._anonymous: Literal["address", "refuse"] = "address"
        self._transient: frozenset[int] = frozenset()
        self._failure: FailureMode = "closed"
        self._client: AnyRedis | None = None
        self._service: IdempotencyService | None = None

    # -- per-process configuration, refreshed when settings are re-read --------

    def _refresh(self) -> Settings:
        settings = get_settings()
        if settings is not self._settings:
            self._settings = settings
            self._secrets = [self.secret] if self.secret else settings.signing_keys()
            self._secret = self._secrets[0]
            self._failure = self.failure_mode or settings.idempotency_failure_mode
            self._anonymous = self.anonymous or settings.idempotency_anonymous
            self._transient = (
                frozenset(settings.idempotency_transient_statuses)
                if self.transient_statuses is None
                else self.transient_statuses
            )
            self._client = self._service = None
        return settings

    def _service_for(self, client: AnyRedis) -> IdempotencyService:
        if client is not self._client or self._service is None:
            self._service = IdempotencyService(
                client, self.ttl, lease=self.lease, namespace=self.namespace
            )
            self._client = client
        return self._service

    def _guards(self, scope: Scope) -> bool:
        if scope["method"] not in self.methods:
            return False
        if self.paths is None:
            return True
        path: str = scope["path"]
        return any(
            p == "/" or path == p or (path.startswith(p) and path[len(p)] == "/")
            for p in self.paths
        )

    def scope_key(self, principal: str | bytes | None, method: str, route: str, key: str) -> str:
        """The record name under the current key: HMAC of the caller scope (a
        ``Caller.digest()``), method, route and key (hex, 128 bits).
        ``record_names`` gives it under every key."""
        message = _length_prefixed(
            _encode(principal), _encode(method), _encode(route), _encode(key)
        )
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()[:32]

    def record_names(self, caller: Caller, method: str, route: str, key: str) -> list[str]:
        """The record of this request under the current key, then under each fallback key."""
        return [
            hmac.new(
                secret,
                _length_prefixed(_encode(scope), _encode(method), _encode(route), _encode(key)),
                hashlib.sha256,
            ).hexdigest()[:32]
            for secret, scope in zip(self._secrets, caller.scopes(), strict=False)
        ]

    def request_fingerprint(self, method: str, path: str, query: bytes, body: bytes) -> str:
        """Digest of method, path, query string and body (as ``fingerprint`` says)."""
        mode = self.fingerprint
        if mode == "raw":
            digest_of_body = body
        elif mode == "json":
            try:
                digest_of_body = b"j" + orjson.dumps(
                    orjson.loads(body), option=orjson.OPT_SORT_KEYS
                )
            except orjson.JSONDecodeError:
                digest_of_body = b"r" + body
        else:
            digest_of_body = _encode(mode(body))
        message = _length_prefixed(_encode(method), _encode(path), query, digest_of_body)
        return hashlib.sha256(message).hexdigest()[:32]

    # -- ASGI -----------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await pass_lifespan(self.app, "idempotency", scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        enter_layer(scope, "idempotency")
        self._refresh()
        guard = _Guard(self, scope, send)
        scope[SCOPE_KEY] = guard
        try:
            if self._guards(scope):
                replay_receive = await self._begin(guard, scope, receive)
                if replay_receive is None:  # the client left while sending its body
                    return
                receive = replay_receive
            await self.app(scope, receive, guard.send)
        except _Abort as abort:
            await guard.finish()
            if guard.response_started:  # pragma: no cover - a dependency runs before any send
                raise RuntimeError("idempotency check ran after the response started") from abort
            await abort.respond(send, scope)
            return
        except BaseException:
            await guard.finish()
            raise
        await guard.finish()

    async def _begin(self, guard: _Guard, scope: Scope, receive: Receive) -> Receive | None:
        key = guard.read_key(self.header_name, required=self.required)
        if key is None:
            return receive
        body = await _read_body(receive, self.max_request_body)
        if body is None:
            return None
        guard.auto = True
        await guard.begin(
            key, body, scope["path"], self.principal(scope) if self.principal else None
        )
        return _replaying(body, receive)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk: bytes = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise _Abort(
                    PayloadTooLarge(
                        f"request body is over {limit} bytes, the limit for requests with an "
                        "Idempotency-Key; send a smaller body",
                        limit=limit,
                    )
                )
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replaying(body: bytes, receive: Receive) -> Receive:
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class _Guard:
    """The idempotency state of one request: its claim, heartbeat and response tee."""

    __slots__ = (
        "_chunks",
        "_heartbeat",
        "_mw",
        "_record",
        "_release",
        "_send",
        "_service",
        "_settled",
        "_size",
        "_status",
        "_stored_headers",
        "_token",
        "auto",
        "key",
        "response_started",
        "scope",
        "unprotected",
    )

    def __init__(self, mw: IdempotencyMiddleware, scope: Scope, send: Send) -> None:
        self._mw = mw
        self.scope = scope
        self._send = send
        self.auto = False
        self.key: str | None = None
        self.unprotected = False
        self.response_started = False
        self._service: IdempotencyService | None = None
        self._record = ""
        self._token: str | None = None
        self._heartbeat: Heartbeat | None = None
        self._status = 0
        self._stored_headers: list[tuple[str, str]] = []
        self._chunks: list[bytes] | None = None
        self._size = 0
        self._release = False
        self._settled = False

    @property
    def handled(self) -> bool:
        """True once this request was claimed, or let through unprotected."""
        return self._token is not None or self.unprotected

    def read_key(self, name: str, *, required: bool) -> str | None:
        """The validated key, None when absent and optional; raises ``_Abort`` (400)."""
        values = _header_values(self.scope, name.lower().encode("latin-1"))
        if not values:
            if required:
                raise _Abort(
                    IdempotencyKeyMissing(
                        f"this request needs an {name} header: send a unique key (a UUID) and "
                        "reuse it only to retry the same request"
                    )
                )
            return None
        if len(values) > 1:
            raise _Abort(IdempotencyKeyInvalid(f"send exactly one {name} header"))
        try:
            return parse_idempotency_key(values[0])
        except IdempotencyKeyInvalid as exc:
            raise _Abort(exc) from None

    def caller(self, principal: str | bytes | None) -> Caller:
        """Who is calling: the explicit *principal*, else ``resolve_caller``; ``_Abort`` (400)
        for an anonymous caller when anonymous keys are refused."""
        if principal is not None and principal not in ("", b""):
            return caller_resolver().for_principal(principal, self.scope)
        caller = resolve_caller(self.scope)
        if not caller.identified and self._mw._anonymous == "refuse":
            raise _Abort(
                IdempotencyCallerUnknown(
                    "this request carries an Idempotency-Key but nothing identifies its "
                    "caller (no credentials, session or authenticated user), and keys of "
                    "anonymous callers are refused here; authenticate, then retry"
                )
            )
        return caller

    async def begin(self, key: str, body: bytes, route: str, principal: str | bytes | None) -> None:
        """Claim the request; returns when the handler may run, else raises ``_Abort``."""
        mw, scope = self._mw, self.scope
        self.key = key
        method: str = scope["method"]
        records = mw.record_names(self.caller(principal), method, route, key)
        service = mw._service_for(get_redis())
        fingerprint = mw.request_fingerprint(
            method, scope["path"], scope.get("query_string", b""), body
        )
        try:
            claim = await service.claim(
                records[0],
                fingerprint,
                wait=mw.wait_timeout,
                result_type=StoredResponse,
                fallbacks=records[1:],
            )
        except RedisUnavailable as exc:
            if mw._failure == "open":
                log.warning(
                    "Redis is unavailable; running %s %s without idempotency protection",
                    method,
                    scope["path"],
                )
                mw.stats["unprotected"] += 1
                self.unprotected = True
                return
            raise _Abort(exc) from None
        if claim.status == "new":
            assert claim.token is not None
            self._service, self._record, self._token = service, claim.key, claim.token
            self._heartbeat = service.heartbeat(claim.key, claim.token).start()
            mw.stats["executed"] += 1
            return
        if claim.status == "completed":
            mw.stats["replayed"] += 1
            raise _Abort(replay=claim.result)
        if claim.status == "mismatch":
            mw.stats["mismatches"] += 1
            raise _Abort(
                IdempotencyMismatch(
                    "this Idempotency-Key was already used for a different request (method, "
                    "path, query or body); use a new key for a new request"
                )
            )
        mw.stats["conflicts"] += 1
        waited = f" after waiting {mw.wait_timeout:g}s" if mw.wait_timeout else ""
        raise _Abort(
            IdempotencyConflict(
                f"a request with this Idempotency-Key is still being processed{waited}; "
                f"retry after {mw.conflict_retry_after:g}s to get its response",
                retry_after=mw.conflict_retry_after,
            )
        )

    async def protect(
        self, request: Request, *, header_name: str, required: bool, principal: Any
    ) -> str | None:
        """The dependency form: claim this request unless the middleware already did."""
        if self.handled or self.auto:
            return self.key
        key = self.read_key(header_name, required=required)
        if key is None:
            return None
        body = await request.body()
        route = getattr(self.scope.get("route"), "path", None) or self.scope["path"]
        if principal is None and self._mw.principal is not None:
            principal = self._mw.principal(self.scope)
        if principal is not None and not isinstance(principal, bytes):
            principal = str(principal)
        await self.begin(key, body, route, principal)
        return key

    # -- the response tee ---------------------------------------------------------

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.response_started = True
            if self._token is not None:
                message = self._start(message)
            elif self.unprotected:
                message = {**message, "headers": [*message.get("headers", ()), NOT_STORED_HEADER]}
        elif self._token is not None and not self._settled:
            if kind == "http.response.body":
                if self._chunks is not None:
                    chunk: bytes = message.get("body", b"")
                    if chunk:
                        self._size += len(chunk)
                        if self._size > self._mw.max_stored_body:
                            self._chunks = None
                        else:
                            self._chunks.append(chunk)
                if not message.get("more_body", False):
                    await self._settle()
            elif kind == "http.response.pathsend":
                self._chunks = None
                await self._settle()
        await self._send(message)

    def _start(self, message: Message) -> Message:
        mw = self._mw
        self._status = status = int(message["status"])
        headers = message.get("headers", ())
        transient = status in mw._transient or session_replaced(self.scope)
        if transient or (status >= 500 and not mw.store_server_errors):
            self._release = True  # the retry must run again once the condition has cleared
            return message
        stored: list[tuple[str, str]] = []
        length = None
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
            elif lower in mw.stored_headers:
                stored.append((lower.decode("latin-1"), value.decode("latin-1")))
        self._stored_headers = stored
        if length is not None and length > mw.max_stored_body:
            return {**message, "headers": [*headers, NOT_STORED_HEADER]}
        self._chunks = []
        return message

    async def _settle(self) -> None:
        """The response is complete: store it (or release on 5xx) before its last byte goes out."""
        self._settled = True
        service, token, mw = self._service, self._token, self._mw
        assert service is not None and token is not None
        await self._stop_heartbeat()
        if self._release:
            await self._release_claim()
            return
        body = b"".join(self._chunks) if self._chunks is not None else None
        if body is None:
            mw.stats["not_stored"] += 1
        stored = StoredResponse(self._status, self._stored_headers, body)
        try:
            done = await service.complete(self._record, token, stored)
        except (ToolkitError, RedisError) as exc:  # Redis down or refusing (OOM), or the codec
            log.error(
                "the response of %s %s was sent but not recorded (%s); its key stays in flight "
                "until the lease ends (%gs), then a retry runs the handler again",
                self.scope["method"],
                self.scope["path"],
                exc,
                service.lease,
            )
            return
        if not done:
            mw.stats["lease_lost"] += 1
            log.warning(
                "%s %s finished after its idempotency lease expired; its response was not "
                "stored (raise the lease or look for event-loop stalls)",
                self.scope["method"],
                self.scope["path"],
            )

    async def finish(self) -> None:
        """After the app returned or raised: release a claim whose response did not complete."""
        if self._token is None or self._settled:
            return
        self._settled = True
        await asyncio.shield(self._abandon())

    async def _abandon(self) -> None:
        await self._stop_heartbeat()
        await self._release_claim()

    async def _stop_heartbeat(self) -> None:
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            await heartbeat.stop()
            if heartbeat.lost:
                self._mw.stats["lease_lost"] += 1

    async def _release_claim(self) -> None:
        service, token = self._service, self._token
        assert service is not None and token is not None
        self._mw.stats["released"] += 1
        try:
            await service.release(self._record, token)
        except (ToolkitError, RedisError) as exc:
            log.error(
                "could not release the idempotency key of %s %s (%s); a retry is refused "
                "with 409 until the lease ends (%gs)",
                self.scope["method"],
                self.scope["path"],
                exc,
                service.lease,
            )


async def guard_request(
    request: Request,
    *,
    header_name: str = DEFAULT_HEADER,
    required: bool = False,
    principal: str | bytes | None = None,
) -> str | None:
    """Protect *request* from inside a route (what ``idempotency_key()`` calls).

    Returns the key (None when absent and not required). When the request is
    a replay, a conflict, a mismatch or malformed, this raises an internal
    exception that ``IdempotencyMiddleware`` turns into the answer, so the
    handler never runs. Raises ``ConfigurationError`` when the middleware is
    not installed.
    """
    guard = request.scope.get(SCOPE_KEY)
    if not isinstance(guard, _Guard):
        raise ConfigurationError(
            "idempotency_key() needs IdempotencyMiddleware on the app: "
            "app.add_middleware(IdempotencyMiddleware, paths=()) guards only such routes"
        )
    return await guard.protect(
        request, header_name=header_name, required=required, principal=principal
    )


def _problem(description: str, headers: Mapping[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {
            PROBLEM_CONTENT_TYPE: {
                "schema": {
                    "type": "object",
                    "required": ["type", "title", "status"],
                    "properties": {
                        "type": {"type": "string", "format": "uri"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "instance": {"type": "string"},
                    },
                }
            }
        },
    }
    if headers:
        response["headers"] = dict(headers)
    return response


IDEMPOTENCY_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    400: _problem(
        "Idempotency-Key missing where required, or malformed (one header; a quoted string "
        "or a token of 1-255 printable ASCII characters)."
    ),
    409: _problem(
        "A request with this Idempotency-Key is still being processed; retry after "
        "Retry-After seconds to receive its response.",
        {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}},
    ),
    422: _problem(
        "The Idempotency-Key was already used for a different request (method, path, query "
        "or body), or the request failed validation."
    ),
    503: _problem("The idempotency store is unavailable; the request was not processed."),
}
"""OpenAPI ``responses=`` for routes guarded by an Idempotency-Key."""
