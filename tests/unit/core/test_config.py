"""Settings: defaults, the embedded default, and production refusals."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from pydantic import ValidationError

from app.core.codec import Codec
from app.core.config import Settings, check_secret_keys, get_settings
from app.core.errors import ConfigurationError
from app.middleware.http_cache import HttpCacheMiddleware
from app.middleware.idempotency import IdempotencyMiddleware
from app.middleware.sessions import SessionMiddleware

STRONG = "Vq3pZ8rN2xLw6yT0bJ5mK1cH9dF4gS7a-e_U"


def test_unset_url_means_embedded_store_with_a_warning(
    settings_override: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    settings_override(redis_url=None, app_env="development")
    with caplog.at_level(logging.WARNING, logger="app.config"):
        settings = get_settings()
    assert settings.effective_redis_url == "memory://"
    assert settings.uses_memory
    assert "REDIS_URL is not set" in caplog.text


@pytest.mark.parametrize("url", [None, "memory://", "MEMORY://", "Memory://x"])
def test_production_refuses_the_embedded_store(url: str | None) -> None:
    # The URL is read by the client builder's own parser: MEMORY:// is the embedded store too.
    with pytest.raises(ValidationError, match="APP_ENV=production needs a real Redis"):
        Settings(app_env="production", redis_url=url, secret_key=STRONG)


@pytest.mark.parametrize("env", ["staging", "prod", "qa", "Production"])
def test_any_env_name_but_development_and_test_is_production_strict(env: str) -> None:
    s = Settings(app_env=env, redis_url="redis://db:6379/0", secret_key=STRONG)
    assert s.production_strict
    with pytest.raises(ValidationError, match=f"APP_ENV={env.lower()} needs a real Redis"):
        Settings(app_env=env, redis_url="memory://", secret_key=STRONG)


@pytest.mark.parametrize("env", ["development", "test"])
def test_development_and_test_accept_the_embedded_store_and_any_key(env: str) -> None:
    s = Settings(app_env=env, redis_url="MEMORY://", secret_key="k", secret_key_fallbacks=["x"])
    assert not s.production_strict and s.uses_memory


def test_production_refuses_a_missing_or_short_secret() -> None:
    with pytest.raises(ValidationError, match="SECRET_KEY"):
        Settings(app_env="production", redis_url="redis://db:6379/0")
    with pytest.raises(ValidationError, match="SECRET_KEY"):
        Settings(app_env="production", redis_url="redis://db:6379/0", secret_key="short")


@pytest.mark.parametrize(
    ("secret", "fallbacks", "message"),
    [
        (" " * 32, [], r"SECRET_KEY is too weak .* 0 characters .* at least 32"),
        ("  " + "a" * 31 + "  ", [], r"SECRET_KEY is too weak .* 31 characters"),
        ("k" * 64, [], r"SECRET_KEY is too weak .* repeats a single character"),
        (STRONG, ["x"], r"SECRET_KEY_FALLBACKS is too weak .* 1 characters"),
        (STRONG, [STRONG[::-1], "z" * 40], r"SECRET_KEY_FALLBACKS \(key #2\) is too weak"),
    ],
)
def test_production_refuses_weak_keys_saying_what_to_fix(
    secret: str, fallbacks: list[str], message: str
) -> None:
    with pytest.raises(ValidationError, match=message) as caught:
        Settings(
            app_env="production",
            redis_url="redis://db:6379/0",
            secret_key=secret,
            secret_key_fallbacks=fallbacks,
        )
    assert "secrets.token_urlsafe" in str(caught.value)  # the way out is in the message


def test_production_accepts_a_real_url_and_secret() -> None:
    s = Settings(
        app_env="production",
        redis_url="rediss://db:6380/1",
        secret_key=STRONG,
        secret_key_fallbacks=[STRONG[::-1]],
    )
    assert not s.uses_memory


def test_production_refuses_a_malformed_url_with_the_parsers_message() -> None:
    with pytest.raises(ValidationError, match="unsupported Redis URL scheme 'http'"):
        Settings(app_env="production", redis_url="http://db:6379", secret_key=STRONG)


def test_the_key_check_is_lenient_outside_production_strict_envs() -> None:
    check_secret_keys("k", source="x", strict=False)
    check_secret_keys(None, source="x", strict=True)  # None: the settings' keys, checked there
    with pytest.raises(ConfigurationError, match=r"^my key is too weak"):
        check_secret_keys(b"short", source="my key", strict=True)
    check_secret_keys(STRONG.encode(), source="my key", strict=True)


@pytest.mark.parametrize(
    "build",
    [
        lambda: SessionMiddleware(_asgi_app, secret_key="short-key"),
        lambda: SessionMiddleware(_asgi_app, secret_key=[STRONG, "x" * 40]),
        lambda: IdempotencyMiddleware(_asgi_app, secret=b"0123456789"),
        lambda: HttpCacheMiddleware(_asgi_app, secret=b" " * 48),
        lambda: Codec(fmt="pickle", allow_pickle=True, secret=[STRONG.encode(), b"k" * 40]),
    ],
    ids=["sessions", "sessions-rotation-key", "idempotency", "http-cache", "codec"],
)
def test_middleware_refuses_a_weak_key_passed_directly_in_production(
    settings_override: Callable[..., None], build: Callable[[], object]
) -> None:
    settings_override(app_env="staging", redis_url="redis://db:6379/0", secret_key=STRONG)
    with pytest.raises(
        ConfigurationError, match=r"(Middleware|Codec)\(secret(_key)?=\.\.\.\).* too weak"
    ):
        build()


def test_middleware_accepts_a_strong_key_in_production(
    settings_override: Callable[..., None],
) -> None:
    settings_override(app_env="production", redis_url="redis://db:6379/0", secret_key=STRONG)
    SessionMiddleware(_asgi_app, secret_key=[STRONG, STRONG[::-1]], https_only=True)
    IdempotencyMiddleware(_asgi_app, secret=STRONG.encode())
    HttpCacheMiddleware(_asgi_app, secret=STRONG.encode())


async def _asgi_app(scope: object, receive: object, send: object) -> None:
    raise AssertionError("never called: construction is what is tested")


def test_get_settings_is_cached_and_overridable(settings_override: Callable[..., None]) -> None:
    settings_override(redis_key_prefix="first")
    assert get_settings() is get_settings()
    assert get_settings().redis_key_prefix == "first"
    settings_override(redis_key_prefix="second")
    assert get_settings().redis_key_prefix == "second"


def test_bad_key_prefix_is_refused() -> None:
    with pytest.raises(ValidationError):
        Settings(redis_key_prefix="has space")


def test_signing_keys_put_the_current_key_first() -> None:
    s = Settings(secret_key="current", secret_key_fallbacks=["old1", "old2"])
    assert s.signing_keys() == [b"current", b"old1", b"old2"]


def test_without_a_secret_a_process_key_is_generated() -> None:
    s = Settings()
    keys = s.signing_keys()
    assert len(keys) == 1 and len(keys[0]) >= 32
    assert Settings().signing_keys() == keys  # stable within the process
