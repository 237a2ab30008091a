"""One guarded request: its claim, the heartbeat of its lease and the tee of its response."""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Final, Literal, Protocol

from starlette.requests import Request
from starlette.types import Message, Scope, Send

from app.core.errors import (
    ConfigurationError,
    IdempotencyCallerUnknown,
    IdempotencyConflict,
    IdempotencyKeyInvalid,
    IdempotencyKeyMissing,
    IdempotencyMismatch,
    RedisUnavailable,
    ToolkitError,
)
from app.core.guard import FailOpen
from app.core.redis import AnyRedis, get_redis
from app.http.asgi import header_values
from app.http.caller import Caller, caller_resolver, resolve_caller
from app.middleware._order import session_replaced
from app.middleware.idempotency._key import DEFAULT_HEADER, PrincipalFunc, parse_idempotency_key
from app.middleware.idempotency._responses import (
    NOT_STORED_HEADER,
    Abort,
    StoredResponse,
    pack_response,
)
from app.services.idempotency import Heartbeat, IdempotencyService

__all__ = ["SCOPE_KEY", "Guard", "GuardOwner", "guard_request"]

log = logging.getLogger("app.idempotency")

SCOPE_KEY: Final = "app.idempotency"
"""Where the middleware puts its per-request guard in the ASGI scope."""


class GuardOwner(Protocol):
    """What a request's guard needs from its ``IdempotencyMiddleware``."""

    principal: PrincipalFunc | None
    wait_timeout: float
    conflict_retry_after: float
    stored_headers: frozenset[bytes]
    max_stored_body: int
    store_server_errors: bool
    stats: collections.Counter[str]
    _anonymous: Literal["address", "refuse"]
    _transient: frozenset[int]

    def record_names(self, caller: Caller, method: str, route: str, key: str) -> list[str]:
        """The record of this request under the current key, then under each fallback key."""
        ...

    def request_fingerprint(self, method: str, path: str, query: bytes, body: bytes) -> str:
        """Digest of method, path, query string and body."""
        ...

    def _store_for(self, client: AnyRedis) -> tuple[IdempotencyService, FailOpen]:
        """The service over *client* and its degraded mode (built once per client)."""
        ...


class Guard:
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

    def __init__(self, mw: GuardOwner, scope: Scope, send: Send) -> None:
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

    def read_key(self, name: str, *, required: bool, lower: bytes | None = None) -> str | None:
        """The validated key, None when absent and optional; raises ``Abort`` (400).

        *lower* is *name* as lower-case bytes, when the caller has it already."""
        values = header_values(self.scope, lower or name.lower().encode("latin-1"))
        if not values:
            if required:
                raise Abort(
                    IdempotencyKeyMissing(
                        f"this request needs an {name} header: send a unique key (a UUID) and "
                        "reuse it only to retry the same request"
                    )
                )
            return None
        if len(values) > 1:
            raise Abort(IdempotencyKeyInvalid(f"send exactly one {name} header"))
        try:
            return parse_idempotency_key(values[0])
        except IdempotencyKeyInvalid as exc:
            raise Abort(exc) from None

    def caller(self, principal: str | bytes | None) -> Caller:
        """Who is calling: the explicit *principal*, else ``resolve_caller``; ``Abort`` (400)
        for an anonymous caller when anonymous keys are refused."""
        if principal is not None and principal not in ("", b""):
            return caller_resolver().for_principal(principal, self.scope)
        caller = resolve_caller(self.scope)
        if not caller.identified and self._mw._anonymous == "refuse":
            raise Abort(
                IdempotencyCallerUnknown(
                    "this request carries an Idempotency-Key but nothing identifies its "
                    "caller (no credentials, session or authenticated user), and keys of "
                    "anonymous callers are refused here; authenticate, then retry"
                )
            )
        return caller

    async def begin(self, key: str, body: bytes, route: str, principal: str | bytes | None) -> None:
        """Claim the request; returns when the handler may run, else raises ``Abort``."""
        mw, scope = self._mw, self.scope
        self.key = key
        method: str = scope["method"]
        records = mw.record_names(self.caller(principal), method, route, key)
        service, degraded = mw._store_for(get_redis())
        fingerprint = mw.request_fingerprint(
            method, scope["path"], scope.get("query_string", b""), body
        )
        try:
            claim = await service.claim(
                records[0],
                fingerprint,
                wait=mw.wait_timeout,
                fallbacks=records[1:],
            )
        except RedisUnavailable as exc:
            if not degraded.enabled:
                raise Abort(exc) from None  # fail-closed: 503, the handler does not run
            degraded.failed(exc)  # fail-open: logged once per change, not per request
            mw.stats["unprotected"] += 1
            self.unprotected = True
            return
        if claim.status == "new":
            assert claim.token is not None
            self._service, self._record, self._token = service, claim.key, claim.token
            self._heartbeat = service.heartbeat(claim.key, claim.token).start()
            mw.stats["executed"] += 1
            return
        if claim.status == "completed":
            mw.stats["replayed"] += 1
            raise Abort(replay=StoredResponse.unpack(claim.result))
        if claim.status == "mismatch":
            mw.stats["mismatches"] += 1
            raise Abort(
                IdempotencyMismatch(
                    "this Idempotency-Key was already used for a different request (method, "
                    "path, query or body); use a new key for a new request"
                )
            )
        mw.stats["conflicts"] += 1
        waited = f" after waiting {mw.wait_timeout:g}s" if mw.wait_timeout else ""
        raise Abort(
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
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None and not heartbeat.cancel():  # a renewal task runs: end it
            await self._end_heartbeat(heartbeat)
        if self._release:
            await self._release_claim()
            return
        body = b"".join(self._chunks) if self._chunks is not None else None
        if body is None:
            mw.stats["not_stored"] += 1
        stored = pack_response(self._status, self._stored_headers, body)
        try:
            done = await service.complete(self._record, token, stored)
        except ToolkitError as exc:  # Redis down or refusing (OOM), or the codec
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
            await self._end_heartbeat(heartbeat)

    async def _end_heartbeat(self, heartbeat: Heartbeat) -> None:
        await heartbeat.stop()
        if heartbeat.lost:
            self._mw.stats["lease_lost"] += 1

    async def _release_claim(self) -> None:
        service, token = self._service, self._token
        assert service is not None and token is not None
        self._mw.stats["released"] += 1
        try:
            await service.release(self._record, token)
        except ToolkitError as exc:  # the service's guard wraps every Redis error
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
    if not isinstance(guard, Guard):
        raise ConfigurationError(
            "idempotency_key() needs IdempotencyMiddleware on the app: "
            "app.add_middleware(IdempotencyMiddleware, paths=()) guards only such routes"
        )
    return await guard.protect(
        request, header_name=header_name, required=required, principal=principal
    )
