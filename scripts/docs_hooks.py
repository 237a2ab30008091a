"""mkdocs hooks: the configuration table is generated from ``app.config.Settings`` at build time.

A page writes ``<!-- settings-table -->`` where the table goes. Names, types and
defaults come from the ``Settings`` model itself, so they cannot drift; the
meaning of each variable comes from ``MEANINGS`` below (the longer text a
``Field`` description has no room for), and the build fails when a setting has
no meaning here or a meaning names a setting that no longer exists.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import SecretStr
from pydantic_core import PydanticUndefined

from app.core.config import Settings

MARKER = "<!-- settings-table -->"

MEANINGS: dict[str, str] = {
    "APP_ENV": "Any name (case-insensitive). `development` and `test` are lenient; **every other value** (`production`, `staging`, ...) is production-strict: it refuses `memory://` (any case), an unset or malformed `REDIS_URL`, and weak keys (see `SECRET_KEY`).",
    "REDIS_URL": "Unset: `memory://`. `redis://[user:pass@]host:port/db`, `rediss://` (TLS), `unix:///path.sock?db=N`, `redis+cluster://h1:p1,h2:p2`, `redis+sentinel://h1:p1,h2:p2/service/db` (`?sentinel_password=`), `memory://` (embedded fakeredis, development only).",
    "REDIS_KEY_PREFIX": "First segment of every key (`[A-Za-z0-9_.-]`).",
    "REDIS_POOL_SIZE": "Connections per process.",
    "REDIS_POOL_TIMEOUT": "Seconds a command waits for a free connection when all are busy (then a clear error).",
    "REDIS_CONNECT_TIMEOUT": "Seconds to open a connection.",
    "REDIS_SOCKET_TIMEOUT": "Seconds to wait for a reply.",
    "REDIS_RETRY_ATTEMPTS": "Retries of a command after a connection error (jittered exponential backoff).",
    "REDIS_RETRY_BACKOFF_BASE": "First backoff, seconds.",
    "REDIS_RETRY_BACKOFF_CAP": "Largest backoff, seconds.",
    "REDIS_INIT_TIMEOUT": "How long `init_redis()` (app startup) keeps trying before `RedisUnavailable`.",
    "REDIS_HEALTH_CHECK_INTERVAL": "Idle seconds after which a pooled connection is checked before use.",
    "BREAKER_FAILURE_THRESHOLD": "Consecutive connection failures that open the circuit breaker.",
    "BREAKER_RESET_TIMEOUT": "Seconds the breaker stays open before one trial call.",
    "CACHE_FAILURE_MODE": "Redis down: `open` = miss and compute; `closed` = 503.",
    "RATE_LIMIT_FAILURE_MODE": "Redis down: `open` = allow; `closed` = 503.",
    "IDEMPOTENCY_FAILURE_MODE": "Redis down: `closed` = 503 and the handler does not run; `open` = run unprotected.",
    "SESSIONS_FAILURE_MODE": "Redis down: `closed` = 503 for requests that use the session.",
    "HEALTH_DETAILS": '`/healthz` is public and answers only `{"status", "latency_ms"}`. `true` adds version, role, breaker state and the URL (password masked, in the userinfo and in any `?password=`-like query parameter; host and port shown): enable it only where the route is not reachable from outside.',
    "DEMO_DESTRUCTIVE_ROUTES": "The demo's destructive routes (`DELETE /cache`, `POST /cache/invalidate`, `POST /publish/{channel}`) answer 403 `route-disabled` unless `APP_ENV=development` or this is `true`.",
    "STREAMS_DEMO_WORKER": "The demo's in-app stream consumer: `lazy` (starts on the first `/streams` request), `eager` (with the app) or `off` (run `python -m app.worker`).",
    "TELEMETRY_ENABLED": "The demo reports OpenTelemetry traces and metrics while it runs and serves Prometheus `GET /metrics` (see [Observability](operations.md#metrics-and-traces)).",
    "SECRET_KEY": "Unset: a random key per process (development only). HMAC key for session cookies, idempotency scopes and signed pickle. Production-strict: required, at least 32 characters once surrounding spaces are stripped, not one repeated character.",
    "SECRET_KEY_FALLBACKS": "JSON list of older keys still accepted for verification (rotation). Production-strict: each one held to the `SECRET_KEY` rules.",
    "CODEC_COMPRESS_THRESHOLD": "Values larger than this many bytes are zlib-compressed when it helps.",
    "CODEC_MAX_PAYLOAD_BYTES": "Largest value encoded or decoded (decompression bombs stop here).",
    "CODEC_ALLOW_PICKLE": "Allow the signed-pickle codec (still needs a secret).",
    "CALLER_CREDENTIAL_HEADERS": "JSON list of request headers that carry a credential: a request with any of them is an identified caller (a keyed digest of their values), with its own idempotency scope and private HTTP-cache entries. See [Who is calling](middleware-stack.md).",
    "TRUSTED_PROXIES": "JSON list of CIDRs of your reverse proxies; `X-Forwarded-For` is read right to left through them to find an anonymous caller's address (none: the TCP peer).",
    "IDEMPOTENCY_ANONYMOUS": "Idempotency-Key requests with no identifiable caller: `address` scopes them by client address, `refuse` answers 400 problem+json `idempotency-caller-unknown`.",
    "IDEMPOTENCY_TRANSIENT_STATUSES": "Statuses that release an Idempotency-Key instead of being stored (the retry runs again).",
    "SESSION_COOKIE_NAME": "Unset: `session`. Session cookie name; sent as `__Host-<name>` when `APP_ENV` is not `development`/`test`.",
    "CONSOLE_TOKEN": "Unset: the console is off. Opens the [operator console](operations.md#the-operator-console) (login form or `Authorization: Bearer`); 32+ characters, at least 8 distinct, no repeated or sequential run.",
    "CONSOLE_READ_ONLY": "Console pages only: every console action answers 403.",
    "CONSOLE_SESSION_TTL": "Seconds a console login cookie and its CSRF tokens stay valid.",
    "CONSOLE_AUDIT_MAXLEN": "Entries the console's audit stream keeps.",
    "REDIS_AUTOPIPELINE": "Turn the multiplexed path on.",
    "REDIS_AUTOPIPELINE_LINKS": "Shared connections per server (1-16); a second one bounds head-of-line blocking behind a large reply.",
    "REDIS_AUTOPIPELINE_MAX_IN_FLIGHT": "Commands awaiting replies per link; past it a caller waits up to `REDIS_POOL_TIMEOUT` for a slot, then `ConnectionError`.",
}


def _default(name: str) -> str:
    field = Settings.model_fields[name]
    value: Any = field.default
    if value is PydanticUndefined and field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, list):
        return f"`{json.dumps(value)}`"
    return f"`{value}`"


def settings_table() -> str:
    """The markdown table of every setting: variable, default, meaning."""
    names = [name.upper() for name in Settings.model_fields]
    unknown = sorted(set(MEANINGS) - set(names))
    undocumented = [name for name in names if name not in MEANINGS]
    if unknown or undocumented:
        raise ValueError(
            f"scripts/docs_hooks.py MEANINGS is out of date: settings without a meaning "
            f"{undocumented}, meanings of settings that no longer exist {unknown}"
        )
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    rows += [f"| `{n}` | {_default(n.lower())} | {MEANINGS[n]} |" for n in names]
    return "\n".join(rows)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """Put the generated table where a page asks for it."""
    if MARKER in markdown:
        return markdown.replace(MARKER, settings_table())
    return markdown


def on_page_content(html: str, **kwargs: Any) -> str:
    """Docstrings end a paragraph with reST's ``::`` before a literal block; show it as ``:``."""
    return html.replace("::</p>", ":</p>")
