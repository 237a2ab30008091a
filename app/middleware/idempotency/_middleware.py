"""``IdempotencyMiddleware``: the ASGI layer and its configuration (see the package docstring)."""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable
from typing import Final, Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.config import FailureMode, Settings, check_secret_keys, get_settings
from app.core.errors import ConfigurationError, PayloadTooLarge, StateError
from app.core.guard import Duration, FailOpen, PerClient, as_seconds
from app.core.redis import AnyRedis
from app.http.caller import Caller
from app.middleware._order import enter_layer, enter_or_pass
from app.middleware.idempotency._guard import SCOPE_KEY, Guard
from app.middleware.idempotency._key import (
    DEFAULT_HEADER,
    BodyFingerprint,
    PrincipalFunc,
    record_name,
    request_fingerprint,
)
from app.middleware.idempotency._responses import Abort
from app.services.idempotency import IdempotencyService

__all__ = ["DEFAULT_STORED_HEADERS", "IdempotencyMiddleware"]

log = logging.getLogger("app.idempotency")

DEFAULT_STORED_HEADERS: Final = ("content-type", "location", "etag", "link", "retry-after")


class IdempotencyMiddleware:
    """Pure ASGI Idempotency-Key middleware (see the package docstring for the flow).

    Args:
        app: the ASGI app to guard.
        methods: methods guarded automatically (default POST and PATCH).
        paths: path prefixes guarded automatically (``"/payments"`` covers
            ``/payments`` and ``/payments/...``); None: every path; ``()``: none
            (only routes with the ``idempotency_key()`` dependency).
        header_name: the request header carrying the key.
        required: refuse guarded requests without a key (400).
        ttl: seconds (or a ``timedelta``) a completed response is replayable (default 24 h).
        lease: seconds (or a ``timedelta``) an in-flight claim survives without a heartbeat (default 30);
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
            handler unprotected, logged once per change of the outage, not per
            request); default ``IDEMPOTENCY_FAILURE_MODE``.
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
        ttl: Duration = 86400,
        lease: Duration = 30.0,
        fingerprint: BodyFingerprint = "raw",
        principal: PrincipalFunc | None = None,
        anonymous: Literal["address", "refuse"] | None = None,
        transient_statuses: Iterable[int] | None = None,
        on_conflict: Literal["reject", "wait"] = "reject",
        wait_timeout: Duration = 10.0,
        conflict_retry_after: Duration = 1.0,
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
        wait_seconds = as_seconds(wait_timeout, "wait_timeout", allow_zero=True)
        retry_after = as_seconds(conflict_retry_after, "conflict_retry_after", allow_zero=True)
        ttl_seconds, lease_seconds = as_seconds(ttl, "ttl"), as_seconds(lease, "lease")
        if anonymous not in (None, "address", "refuse"):
            raise ConfigurationError(f"anonymous must be 'address' or 'refuse', got {anonymous!r}")
        check_secret_keys(secret, source="IdempotencyMiddleware(secret=...)")
        self.app = app
        self.methods = frozenset(m.upper() for m in methods)
        self.paths = None if paths is None else tuple(p.rstrip("/") or "/" for p in paths)
        self.header_name = header_name
        self._header = header_name.lower().encode("latin-1")
        self.required = required
        self.ttl = ttl_seconds
        self.lease = lease_seconds
        self.fingerprint = fingerprint
        self.principal = principal
        self.on_conflict = on_conflict
        self.wait_timeout = wait_seconds if on_conflict == "wait" else 0.0
        self.conflict_retry_after = retry_after
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
        self._stores: PerClient[tuple[IdempotencyService, FailOpen]] = PerClient(self._store)

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
            # the services keep the settings' key prefix and failure mode: build them again
            self._stores = PerClient(self._store)
        return settings

    def _store(self, client: AnyRedis) -> tuple[IdempotencyService, FailOpen]:
        service = IdempotencyService(client, self.ttl, lease=self.lease, namespace=self.namespace)
        degraded = FailOpen(
            service.guard,
            log,
            enabled=self._failure == "open",
            fallback="running guarded requests without idempotency protection",
        )
        return service, degraded

    def _store_for(self, client: AnyRedis) -> tuple[IdempotencyService, FailOpen]:
        return self._stores(client)

    def _guards(self, path: str) -> bool:
        """Does *path* fall under ``paths`` (a prefix, at a ``/`` boundary)?"""
        if self.paths is None:
            return True
        for p in self.paths:
            if path == p or p == "/" or (path.startswith(p) and path[len(p)] == "/"):
                return True
        return False

    def scope_key(self, principal: str | bytes | None, method: str, route: str, key: str) -> str:
        """The record name under the current key: HMAC of the caller scope (a
        ``Caller.digest()``), method, route and key (hex, 128 bits).
        ``record_names`` gives it under every key."""
        return record_name(self._secret, principal, method, route, key)

    def record_names(self, caller: Caller, method: str, route: str, key: str) -> list[str]:
        """The record of this request under the current key, then under each fallback key."""
        # no rotation under way: one digest of the caller, not one per key
        if len(self._secrets) == 1:
            return [record_name(self._secret, caller.digest(), method, route, key)]
        return [
            record_name(secret, scope, method, route, key)
            for secret, scope in zip(self._secrets, caller.scopes(), strict=False)
        ]

    def request_fingerprint(self, method: str, path: str, query: bytes, body: bytes) -> str:
        """Digest of method, path, query string and body (as ``fingerprint`` says)."""
        return request_fingerprint(self.fingerprint, method, path, query, body)

    # -- ASGI -----------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await enter_or_pass(self.app, "idempotency", scope, receive, send)
            return
        enter_layer(scope, "idempotency")
        if self._settings is not get_settings():
            self._refresh()
        guard = Guard(self, scope, send)
        scope[SCOPE_KEY] = guard
        try:
            if scope["method"] in self.methods and self._guards(scope["path"]):
                key = guard.read_key(self.header_name, required=self.required, lower=self._header)
                if key is not None:
                    body = await _read_body(receive, self.max_request_body)
                    if body is None:  # the client left while sending its body
                        return
                    guard.auto = True
                    principal = self.principal(scope) if self.principal else None
                    await guard.begin(key, body, scope["path"], principal)
                    receive = _replaying(body, receive)
            await self.app(scope, receive, guard.send)
        except Abort as abort:
            await guard.finish()
            if guard.response_started:  # pragma: no cover - a dependency runs before any send
                raise StateError("idempotency check ran after the response started") from abort
            await abort.respond(send, scope)
            return
        except BaseException:
            await guard.finish()
            raise
        await guard.finish()


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
                raise Abort(
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
