"""Settings: one class, read from the environment and ``.env``.

Every tunable of the toolkit lives here. ``get_settings()`` is cached; tests
override it with ``get_settings.cache_clear()`` plus environment variables, or
with ``app.dependency_overrides[get_settings]`` inside a FastAPI app.
"""

from __future__ import annotations

import logging
import secrets
from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["FailureMode", "Settings", "get_settings"]

log = logging.getLogger("app.config")

FailureMode = Literal["open", "closed"]
"""``open``: behave as if Redis were not there (cache miss, request allowed).
``closed``: refuse with 503 problem+json."""

MEMORY_URL = "memory://"


class Settings(BaseSettings):
    """Toolkit settings. Environment variable names are the field names in upper case."""

    model_config = SettingsConfigDict(
        env_file=".env", env_ignore_empty=True, extra="ignore", validate_default=True
    )

    app_env: Literal["development", "test", "production"] = "development"

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

    # Demo service
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

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.app_env == "production":
            if self.redis_url is None or self.redis_url.startswith(MEMORY_URL):
                raise ValueError(
                    "APP_ENV=production needs a real Redis: set REDIS_URL to redis://, "
                    "rediss://, unix://, redis+cluster:// or redis+sentinel:// "
                    "(the in-process memory:// store is for development only)"
                )
            if self.secret_key is None or len(self.secret_key.get_secret_value()) < 32:
                raise ValueError(
                    "APP_ENV=production needs SECRET_KEY of at least 32 characters "
                    "(generate one with: python -c 'import secrets; print(secrets.token_urlsafe(48))')"
                )
        return self

    @property
    def effective_redis_url(self) -> str:
        """The URL in use: ``REDIS_URL`` or ``memory://`` when unset."""
        return self.redis_url or MEMORY_URL

    @property
    def uses_memory(self) -> bool:
        return self.effective_redis_url.startswith(MEMORY_URL)

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
