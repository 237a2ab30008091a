"""Settings: defaults, the embedded default, and production refusals."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from pydantic import ValidationError

from app.core.config import Settings, get_settings


def test_unset_url_means_embedded_store_with_a_warning(
    settings_override: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    settings_override(redis_url=None, app_env="development")
    with caplog.at_level(logging.WARNING, logger="app.config"):
        settings = get_settings()
    assert settings.effective_redis_url == "memory://"
    assert settings.uses_memory
    assert "REDIS_URL is not set" in caplog.text


@pytest.mark.parametrize("url", [None, "memory://"])
def test_production_refuses_the_embedded_store(url: str | None) -> None:
    with pytest.raises(ValidationError, match="APP_ENV=production needs a real Redis"):
        Settings(app_env="production", redis_url=url, secret_key="x" * 40)


def test_production_refuses_a_missing_or_short_secret() -> None:
    with pytest.raises(ValidationError, match="SECRET_KEY"):
        Settings(app_env="production", redis_url="redis://db:6379/0")
    with pytest.raises(ValidationError, match="SECRET_KEY"):
        Settings(app_env="production", redis_url="redis://db:6379/0", secret_key="short")


def test_production_accepts_a_real_url_and_secret() -> None:
    s = Settings(app_env="production", redis_url="rediss://db:6380/1", secret_key="k" * 32)
    assert not s.uses_memory


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
