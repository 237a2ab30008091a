"""The console's access machinery per request and its page rendering.

Who is calling, CSRF, read-only, the answers for refused requests, and the
security headers. The routes are in ``_routes``; ``_create`` puts the app together.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

import orjson
from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.console._access import Audit, Operator, Signer, token_matches
from app.core.config import Settings
from app.core.redis import AnyRedis
from app.http.caller import caller_resolver
from app.services.rate_limit import ConcurrencyLimiter, RateLimiter
from app.services.sessions import SessionStore

__all__ = ["AuthDependency", "Console", "ConsoleLimiter", "Refused", "SecurityHeaders"]

log = logging.getLogger("app.console")

COOKIE = "console_auth"
_LOGIN_POLICY = "console-login=10/minute"  # wrong tokens per client address
NOTICE_COOKIE = "console_notice"
_MAX_FORM = 8192
_SECURITY_HEADERS = [
    (b"cache-control", b"no-store"),
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        b"connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class Refused(Exception):
    """A console request refused: 401 (no access), 403, 404 (console off), 413, 429."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


@dataclass(frozen=True, slots=True)
class ConsoleLimiter:
    """A rate limiter the console can inspect and reset.

    Args:
        name: how the page names it (e.g. ``"demo user 5/minute"``).
        build: makes the limiter for a client (same policies as the app's).
        identity: maps what the operator types to the limiter's identifier
            (e.g. ``lambda user: f"demo-user|{user}"``).
        hint: what to type (shown beside the form).
    """

    name: str
    build: Callable[[AnyRedis], RateLimiter | ConcurrencyLimiter]
    identity: Callable[[str], str] = field(default=lambda typed: typed)
    hint: str = "the identifier the limiter counts"


AuthDependency = Callable[..., Any]
"""A FastAPI dependency returning the operator's name, or None/False to refuse (401)."""


class SecurityHeaders:
    """Pure ASGI: no caching, no framing, a strict CSP on every console response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in _SECURITY_HEADERS if k not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Console:
    """The state of one mounted console: access, audit, registries, templates."""

    def __init__(
        self,
        *,
        settings: Settings,
        auth: AuthDependency | None,
        token: str | None,
        read_only: bool,
        limiters: Sequence[ConsoleLimiter],
        cache_namespaces: Sequence[str],
        sessions: Callable[[AnyRedis], SessionStore] | None,
        redis: Callable[[], AnyRedis],
    ) -> None:
        self.settings = settings
        self.prefix = settings.redis_key_prefix
        self.auth = auth
        self.token = token
        self.enabled = auth is not None or token is not None
        self.read_only = read_only
        self.signer = Signer(settings.signing_keys(), settings.console_session_ttl, token)
        self.audit = Audit(self.prefix, settings.console_audit_maxlen)
        self.limiters: Mapping[str, ConsoleLimiter] = {lim.name: lim for lim in limiters}
        self.cache_namespaces = tuple(cache_namespaces)
        self.sessions = sessions or (lambda client: SessionStore(client))
        self.redis = redis
        self.live_views = 0
        self.max_live_views = 4
        self.templates = Environment(
            loader=PackageLoader("app.console", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            enable_async=False,
        )
        self.templates.filters["ts"] = _timestamp
        self.resolve = self._build_resolver()

    # -- who is calling ----------------------------------------------------------

    def _build_resolver(self) -> Callable[..., Awaitable[Operator]]:
        auth = self.auth
        if auth is not None:

            async def from_auth(request: Request, who: Any = Depends(auth)) -> Operator:
                if not who:
                    raise Refused(401, "the app's console auth dependency refused this request")
                return Operator(str(who), "auth")

            return from_auth

        async def from_token(request: Request) -> Operator:
            return await self._operator_from_token(request)

        return from_token

    async def _operator_from_token(self, request: Request) -> Operator:
        if not self.enabled or self.token is None:
            raise Refused(404, "Not Found")
        header = request.headers.get("authorization")
        if header:
            await self.check_throttle(request)
            scheme, _, credential = header.partition(" ")
            if scheme.lower() == "bearer" and token_matches(credential.strip(), self.token):
                return Operator("console-token", "bearer")
            await self.login_failed(request)
            raise Refused(401, "wrong or malformed console token")
        if self.signer.cookie_valid(request.cookies.get(COOKIE)):
            return Operator("console-token", "cookie")
        raise Refused(401, "log in to the console (or send Authorization: Bearer <token>)")

    def check_login_token(self, presented: str | None) -> bool:
        return self.token is not None and token_matches(presented, self.token)

    # -- actions -----------------------------------------------------------------

    async def form(self, request: Request) -> dict[str, str]:
        """The POST body as text fields (urlencoded or a JSON object), at most 8 KiB."""
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > _MAX_FORM):
            raise Refused(413, "request body too large")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > _MAX_FORM:
                raise Refused(413, "request body too large")
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                data = orjson.loads(body or b"{}")
            except orjson.JSONDecodeError as exc:
                raise Refused(400, "the body is not valid JSON") from exc
            if not isinstance(data, dict):
                raise Refused(400, "the body must be a JSON object")
            return {str(k): str(v) for k, v in data.items() if v is not None}
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=32)
        except (UnicodeDecodeError, ValueError) as exc:
            raise Refused(400, "the form is not valid") from exc
        return dict(pairs)

    async def action_form(self, request: Request, operator: Operator) -> dict[str, str]:
        """Refuse in read-only mode (403) or without a valid CSRF token (403); the form."""
        if self.read_only:
            raise Refused(403, "the console is read-only (CONSOLE_READ_ONLY): actions are off")
        form = await self.form(request)
        if operator.needs_csrf and not self.signer.csrf_valid(operator, form.get("csrf")):
            raise Refused(403, "missing or invalid CSRF token: reload the page and try again")
        return form

    async def done(
        self,
        request: Request,
        operator: Operator,
        action: str,
        target: str,
        outcome: str,
        back: str,
    ) -> Response:
        """Audit the action, then redirect a browser back to *back* or answer JSON."""
        client = self.client_address(request)
        entry = await self.audit.record(self.redis(), operator, action, target, outcome, client)
        if wants_html(request):
            response: Response = RedirectResponse(base(request) + back, status_code=303)
            response.set_cookie(
                NOTICE_COOKIE,
                quote(outcome[:300]),
                max_age=60,
                path=cookie_path(request),
                httponly=True,
                samesite="strict",
                secure=self.secure(request),
            )
            return response
        return JSONResponse(
            {"action": action, "target": target, "outcome": outcome, "audit": entry}
        )

    def client_address(self, request: Request) -> str:
        """The caller's address through the trusted proxies (``app.http.caller``)."""
        return caller_resolver(self.settings).address(request.scope) or "unknown"

    async def check_throttle(self, request: Request) -> None:
        """429 when this address sent 10 wrong tokens in the last minute (form or Bearer)."""
        decision = await self._login_limiter().peek(self.client_address(request))
        if not decision.allowed:
            wait = math.ceil(max(1.0, decision.retry_after))
            raise Refused(
                429,
                f"too many wrong tokens from this address; retry in {wait} s",
                {"Retry-After": str(wait)},
            )

    async def login_failed(self, request: Request) -> None:
        """Count a wrong token against the caller's address (10 per minute)."""
        await self._login_limiter().hit(self.client_address(request))

    def _login_limiter(self) -> RateLimiter:
        return RateLimiter(self.redis(), policies=_LOGIN_POLICY)

    # -- rendering ---------------------------------------------------------------

    def secure(self, request: Request) -> bool:
        return request.url.scheme == "https" or self.settings.app_env == "production"

    def render(
        self, request: Request, operator: Operator | None, template: str, **context: Any
    ) -> HTMLResponse:
        notice = request.cookies.get(NOTICE_COOKIE)
        page = self.templates.get_template(template).render(
            base=base(request),
            csrf=self.signer.csrf_token(operator) if operator else "",
            operator=operator,
            read_only=self.read_only,
            notice=unquote(notice) if notice else None,
            **context,
        )
        response = HTMLResponse(page, status_code=context.get("status", 200))
        if notice:
            response.delete_cookie(NOTICE_COOKIE, path=cookie_path(request))
        return response

    def refusal(self, request: Request, exc: Refused) -> Response:
        if exc.status == 401 and wants_html(request) and request.method == "GET":
            target = quote(request.url.path.removeprefix(base(request)) or "/", safe="/")
            return RedirectResponse(f"{base(request)}/login?next={target}", status_code=303)
        if wants_html(request) and exc.status != 404:
            page = self.render(
                request, None, "error.html", status=exc.status, message=exc.detail, title="Refused"
            )
            page.headers.update(exc.headers)
            return page
        headers = dict(exc.headers)
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="console"'
        return JSONResponse(
            {
                "type": "about:blank",
                "title": _TITLES.get(exc.status, "Error"),
                "status": exc.status,
                "detail": exc.detail,
            },
            status_code=exc.status,
            media_type="application/problem+json",
            headers=headers,
        )


_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    413: "Content Too Large",
    429: "Too Many Requests",
    503: "Service Unavailable",
}


def _timestamp(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def base(request: Request) -> str:
    """The console's mount path (``""`` when it is the root app)."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def cookie_path(request: Request) -> str:
    return base(request) or "/"
