"""Settings: one class, read from the environment and ``.env``.

Every tunable of the toolkit lives here. ``get_settings()`` is cached; tests
override it with ``get_settings.cache_clear()`` plus environment variables, or
with ``app.dependency_overrides[get_settings]`` inside a FastAPI app.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.core.errors import ConfigurationError
from app.core.urls import parse_redis_url

__all__ = [
    "LENIENT_ENVS",
    "MIN_SECRET_KEY_LENGTH",
    "FailureMode",
    "Settings",
    "check_secret_keys",
    "get_settings",
    "weak_key_reason",
]

log = logging.getLogger("app.config")

FailureMode = Literal["open", "closed"]
"""``open``: behave as if Redis were not there (cache miss, request allowed).
``closed``: refuse with 503 problem+json."""

MEMORY_URL = "memory://"

LENIENT_ENVS = frozenset({"development", "test"})
"""The only ``APP_ENV`` values that relax the guards; any other name is production-strict."""

MIN_SECRET_KEY_LENGTH = 32
"""Fewest characters (bytes for a ``bytes`` key) a key may have, surrounding spaces not counted."""

_KEY_HINT = "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(48))'"


def weak_key_reason(key: str | bytes) -> str | None:
    """Why *key* is too weak to sign with, or ``None`` when it is acceptable.

    Weak: fewer than ``MIN_SECRET_KEY_LENGTH`` characters once surrounding
    whitespace is stripped, or one character repeated (``"k" * 40``).
    """
    stripped = key.strip()
    if len(stripped) < MIN_SECRET_KEY_LENGTH:
        return (
            f"it has {len(stripped)} characters (without surrounding spaces), "
            f"fewer than {MIN_SECRET_KEY_LENGTH}"
        )
    if len(set(stripped)) == 1:
        return "it repeats a single character"
    return None


def check_secret_keys(
    keys: str | bytes | SecretStr | Sequence[str | bytes | SecretStr] | None,
    *,
    source: str,
    strict: bool | None = None,
) -> None:
    """Refuse weak signing keys where production rules apply: the ONE key check.

    Every place a key enters the toolkit calls this: ``SECRET_KEY`` and
    ``SECRET_KEY_FALLBACKS`` in ``Settings``, and the ``secret_key=`` /
    ``secret=`` arguments of the middleware. *source* names that place in the
    error. With *strict* ``None`` the process settings decide: any ``APP_ENV``
    but ``development`` and ``test`` is strict. ``None`` keys (use the
    settings' keys) pass; in lenient environments every key passes.

    Raises ``ConfigurationError`` saying which key is weak and how to make one.
    """
    if keys is None:
        return
    if strict is None:
        strict = get_settings().production_strict
    if not strict:
        return
    items = [keys] if isinstance(keys, str | bytes | SecretStr) else list(keys)
    for index, item in enumerate(items):
        raw = item.get_secret_value() if isinstance(item, SecretStr) else item
        reason = weak_key_reason(raw)
        if reason is not None:
            where = source if len(items) == 1 else f"{source} (key #{index + 1})"
            raise ConfigurationError(
                f"{where} is too weak for a production-strict APP_ENV: {reason}; use a random "
                f"key of at least {MIN_SECRET_KEY_LENGTH} characters ({_KEY_HINT})"
            )


class Settings(BaseSettings):
    """Toolkit settings. Environment variable names are the field names in upper case."""

    model_config = SettingsConfigDict(
        env_file=".env", env_ignore_empty=True, extra="ignore", validate_default=True
    )

    app_env: str = Field(
        default="development",
        min_length=1,
        description="Any name; every value but development and test is production-strict.",
    )

    # Connection
    redis_url: str | None = Field(
        default=None,
        description="redis://, rediss://, unix://, redis+cluster://h:p,h:p, "
        "redis+sentinel://h:p,h:p/service/db or memory:// (unset: memory://).",
    )
    redis_key_prefix: str = Field(default="app", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    redis_pool_size: int = Field(default=200, ge=1, description="Connections per process.")
    redis_pool_timeout: float = Field(
        default=5.0, gt=0, description="Seconds a command waits for a free pooled connection."
    )
    redis_connect_timeout: float = Field(default=2.0, gt=0)
    redis_socket_timeout: float = Field(default=2.0, gt=0)
    redis_retry_attempts: int = Field(default=2, ge=0, description="Retries per command.")
    redis_retry_backoff_base: float = Field(default=0.05, gt=0)
    redis_retry_backoff_cap: float = Field(default=0.5, gt=0)
    redis_init_timeout: float = Field(
        default=10.0, ge=0, description="How long init_redis() keeps trying before giving up."
    )
    redis_health_check_interval: float = Field(default=15.0, ge=0)

    # Circuit breaker (consulted by fail-open paths)
    breaker_failure_threshold: int = Field(default=5, ge=1)
    breaker_reset_timeout: float = Field(
        default=2.0, gt=0, description="Seconds open before one trial call (half-open)."
    )

    # Per-service behaviour when Redis is down
    cache_failure_mode: FailureMode = "open"
    rate_limit_failure_mode: FailureMode = "open"
    idempotency_failure_mode: FailureMode = "closed"
    sessions_failure_mode: FailureMode = "closed"

    # Health
    health_details: bool = Field(
        default=False,
        description="/healthz also shows version, role, breaker state and the masked URL "
        "(internal host and port): enable only where the route is not public.",
    )

    # Demo service
    demo_destructive_routes: bool = Field(
        default=False,
        description="Serve the demo's destructive routes (DELETE /cache, POST /cache/invalidate, "
        "POST /publish/{channel}) outside APP_ENV=development; elsewhere they answer 403.",
    )
    streams_demo_worker: Literal["lazy", "eager", "off"] = Field(
        default="lazy",
        description="The demo's in-app stream consumer: lazy (first /streams request), "
        "eager (with the app) or off (run python -m app.worker instead).",
    )
    telemetry_enabled: bool = Field(
        default=False,
        description="The demo reports traces and metrics through OpenTelemetry (needs the "
        "otel extra and an SDK: the dev extra has both) and serves Prometheus GET /metrics.",
    )

    # Secrets and codec
    secret_key: SecretStr | None = Field(
        default=None,
        description="HMAC key for session cookies, idempotency scopes and signed pickle. "
        "Required in production; random per process otherwise.",
    )
    secret_key_fallbacks: list[SecretStr] = Field(
        default_factory=list, description="Older keys still accepted (rotation)."
    )
    codec_compress_threshold: int = Field(default=4096, ge=0)
    codec_max_payload_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    codec_allow_pickle: bool = False

    @field_validator("app_env", mode="before")
    @classmethod
    def _normalise_env(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @property
    def production_strict(self) -> bool:
        """True unless ``APP_ENV`` is ``development`` or ``test`` (staging is strict too)."""
        return self.app_env not in LENIENT_ENVS

    @property
    def destructive_demo_routes_enabled(self) -> bool:
        """True with ``APP_ENV=development`` or ``DEMO_DESTRUCTIVE_ROUTES=true``."""
        return self.app_env == "development" or self.demo_destructive_routes

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if not self.production_strict:
            return self
        env = f"APP_ENV={self.app_env}"
        if self.redis_url is None or _url_kind(self.redis_url) == "memory":
            raise ValueError(
                f"{env} needs a real Redis: set REDIS_URL to redis://, "
                "rediss://, unix://, redis+cluster:// or redis+sentinel:// "
                "(the in-process memory:// store is for APP_ENV=development or test only)"
            )
        if self.secret_key is None:
            raise ValueError(f"{env} needs SECRET_KEY ({_KEY_HINT})")
        check_secret_keys(self.secret_key, source=f"{env}: SECRET_KEY", strict=True)
        check_secret_keys(
            self.secret_key_fallbacks, source=f"{env}: SECRET_KEY_FALLBACKS", strict=True
        )
        return self

    @property
    def effective_redis_url(self) -> str:
        """The URL in use: ``REDIS_URL`` or ``memory://`` when unset."""
        return self.redis_url or MEMORY_URL

    @property
    def uses_memory(self) -> bool:
        """True when the URL names the embedded store (``memory://``, any case)."""
        try:
            return _url_kind(self.effective_redis_url) == "memory"
        except ConfigurationError:  # a malformed URL is reported when the client is built
            return False

    def signing_keys(self) -> list[bytes]:
        """The current secret first, then the fallbacks, as bytes."""
        current = self.secret_key or _process_secret()
        return [current.get_secret_value().encode()] + [
            k.get_secret_value().encode() for k in self.secret_key_fallbacks
        ]

    # -- Who is calling (app/http/caller.py) and the middleware that keep data per caller --
    caller_credential_headers: list[str] = Field(
        default_factory=lambda: ["authorization", "proxy-authorization", "cookie", "x-api-key"],
        description="Request headers that carry a credential: a request with any of them is "
        "an identified caller (a keyed digest of their values) and gets private HTTP-cache "
        "entries and its own idempotency scope.",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="CIDRs of your reverse proxies: X-Forwarded-For is read right to left "
        "through them to find an anonymous caller's address (none: the TCP peer).",
    )
    idempotency_anonymous: Literal["address", "refuse"] = Field(
        default="address",
        description="Idempotency-Key requests with no identifiable caller (no principal, "
        "session or credential header): 'address' scopes them by client address (through "
        "trusted_proxies), 'refuse' answers 400 problem+json.",
    )
    idempotency_transient_statuses: list[int] = Field(
        default_factory=lambda: [408, 409, 425, 429, 503],
        description="Response statuses that release an Idempotency-Key instead of being "
        "stored: the retry runs the handler again once the condition has cleared.",
    )
    session_cookie_name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Session cookie name without prefix (unset: 'session'). Sent as "
        "'__Host-<name>' when APP_ENV is not development/test.",
    )

    # -- Operator console (app/console): off unless CONSOLE_TOKEN or an auth dependency is given --
    console_token: SecretStr | None = Field(
        default=None,
        description="Token that opens the operator console (login form or "
        "'Authorization: Bearer'); at least 32 characters, not a repeated or sequential run. "
        "Unset: the console answers 404 unless the app gives it an auth dependency.",
    )
    console_read_only: bool = Field(
        default=False, description="Console pages only: every action (POST) answers 403."
    )
    console_session_ttl: float = Field(
        default=8 * 3600.0,
        gt=0,
        le=7 * 86400.0,
        description="Seconds a console login cookie (and its CSRF tokens) stays valid.",
    )
    console_audit_maxlen: int = Field(
        default=10_000,
        ge=100,
        description="Entries the console's audit stream keeps (XADD MAXLEN ~).",
    )

    @field_validator("console_token")
    @classmethod
    def _refuse_weak_console_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        text = value.get_secret_value()
        steps = {ord(text[i + 1]) - ord(text[i]) for i in range(len(text) - 1)}
        periodic = any(text == (text[:n] * (len(text) // n + 1))[: len(text)] for n in range(1, 17))
        if len(text) < 32 or len(set(text)) < 8 or len(steps) == 1 or periodic:
            raise ValueError(
                "CONSOLE_TOKEN must be at least 32 characters, with at least 8 distinct ones and "
                "no repeated or sequential run "
                "(generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        return value

    # -- Auto-pipelining (app/core/multiplex.py): the multiplexed command path --
    redis_autopipeline: bool = Field(
        default=True,
        description="Auto-pipelining (on by default): stateless commands that concurrent tasks "
        "issue in the same event-loop tick leave in one write over a few shared connections "
        "per server (standalone, Sentinel primary, each Cluster node; memory:// is unchanged), "
        "replies matched to callers in order. Blocking commands, pub/sub, WATCH/MULTI, "
        "CLIENT and other connection-state commands, pipelines and transactions keep using "
        "the waiting pool. Under faults a lost connection fails only the commands in flight on "
        "it (retried per REDIS_RETRY_ATTEMPTS), a timed-out caller keeps its reply slot so no "
        "reply reaches another caller. false: every command checks out a pooled connection, "
        "as redis.asyncio does.",
    )
    redis_autopipeline_links: int = Field(
        default=2,
        ge=1,
        le=16,
        description="Multiplexed connections per server (each Cluster node has its own); "
        "opened on demand, commands go to the least loaded one.",
    )
    redis_autopipeline_max_in_flight: int = Field(
        default=1024,
        ge=1,
        description="Commands awaiting replies per multiplexed connection (back-pressure); "
        "past it callers wait FIFO up to REDIS_POOL_TIMEOUT for a slot, then get "
        "ConnectionError, so a burst of any size uses bounded memory.",
    )


def _url_kind(url: str) -> str:
    """The target kind of *url* as the client builder reads it (scheme case ignored)."""
    return parse_redis_url(url).kind


@lru_cache(maxsize=1)
def _process_secret() -> SecretStr:
    log.warning(
        "SECRET_KEY is not set: using a random key for this process only; sessions "
        "and idempotency scopes will not survive a restart or span several workers"
    )
    return SecretStr(secrets.token_urlsafe(48))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process settings, read once. ``get_settings.cache_clear()`` re-reads them."""
    settings = Settings()
    if settings.redis_url is None:
        log.warning("REDIS_URL is not set: using the embedded in-process store (memory://)")
    return settings
