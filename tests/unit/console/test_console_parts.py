"""The console's parts on fakeredis: signing, cursors, bounded scans, the replay script."""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from app.console import _actions as act
from app.console._access import Operator, Signer, token_matches
from app.console._scan import MAX_CALLS, parse_cursor, scan_page
from app.core.config import Settings
from app.core.keys import KeySpace
from app.services.streams import stream_keys

KEY, OLD = b"k" * 32, b"o" * 32
ALICE, BOB = Operator("alice", "auth"), Operator("bob", "auth")


def test_a_login_cookie_verifies_until_it_expires() -> None:
    signer = Signer([KEY], ttl=60, token="t")
    cookie = signer.login_cookie(now=1_000)
    assert signer.cookie_valid(cookie, now=1_059)
    assert not signer.cookie_valid(cookie, now=1_061)


def test_a_cookie_signed_with_a_fallback_key_still_verifies_and_others_do_not() -> None:
    old_cookie = Signer([OLD], ttl=60, token="t").login_cookie(now=0)
    assert Signer([KEY, OLD], ttl=60, token="t").cookie_valid(old_cookie, now=1)
    assert not Signer([KEY], ttl=60, token="t").cookie_valid(old_cookie, now=1)
    assert not Signer([KEY, OLD], ttl=60, token="other").cookie_valid(old_cookie, now=1)


@pytest.mark.parametrize("value", [None, "", ".", "abc", "1.", "x.y", "9" * 13 + ".a", "1.a" * 50])
def test_malformed_cookies_are_refused(value: str | None) -> None:
    assert not Signer([KEY], ttl=60, token="t").cookie_valid(value, now=0)


def test_a_tampered_expiry_breaks_the_signature() -> None:
    signer = Signer([KEY], ttl=60, token="t")
    expiry, mac = signer.login_cookie(now=0).split(".")
    assert not signer.cookie_valid(f"{int(expiry) + 86_400}.{mac}", now=0)


def test_a_csrf_token_is_valid_for_its_operator_only() -> None:
    signer = Signer([KEY], ttl=60, token="t")
    token = signer.csrf_token(ALICE, now=0)
    assert signer.csrf_valid(ALICE, token, now=1)
    assert not signer.csrf_valid(BOB, token, now=1)
    assert not signer.csrf_valid(ALICE, token, now=61)
    assert not signer.csrf_valid(ALICE, signer.login_cookie(now=0), now=1)  # no cross-use


def test_tokens_are_compared_whole() -> None:
    token = secrets.token_urlsafe(32)
    assert token_matches(token, token)
    assert not token_matches(token[:-1], token)
    assert not token_matches(token + "x", token)
    assert not token_matches(None, token) and not token_matches("", token)


def test_a_strong_console_token_is_accepted() -> None:
    token = secrets.token_urlsafe(32)
    settings = Settings(console_token=token)
    assert settings.console_token is not None
    assert settings.console_token.get_secret_value() == token
    assert token not in repr(settings)


@pytest.mark.parametrize("value", ["x", "0.", ".1", "1.2.3", "a.b", "-1.0", "1." + "9" * 21])
def test_foreign_cursors_are_refused(value: str) -> None:
    with pytest.raises(ValueError):
        parse_cursor(value)


async def test_scan_pages_together_list_every_key_once_each_within_the_call_bound(
    fake_redis: Any,
) -> None:
    space = KeySpace("app", "lock")
    names = {space.tagged(f"job-{i}") for i in range(700)}
    async with fake_redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.set(name, b"owner")
        for i in range(700):
            pipe.set(f"app:other:{i}", b"x")
        await pipe.execute()
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = await scan_page(fake_redis, space.pattern("*"), cursor, want=50)
        seen.extend(page.keys)
        pages += 1
        cursor = page.cursor
        if cursor is None:
            break
    assert set(seen) == names
    assert pages <= 1400 // (MAX_CALLS * 10) + 2  # each page advances up to MAX_CALLS SCANs


async def test_a_dead_letter_replay_is_atomic_and_happens_once(fake_redis: Any) -> None:
    keys = stream_keys("orders")
    dead_id = await fake_redis.xadd(
        keys.dead_letter,
        {"dlq-id": "1-0", "dlq-error": "boom", "payload": b"J{}", "trace": b"t"},
    )
    dead = dead_id.decode()
    outcome = await act.replay_dead_letter(fake_redis, "orders", dead)
    assert outcome.startswith(f"dead letter {dead} replayed as ")
    [(_, fields)] = await fake_redis.xrange(keys.stream)
    assert fields == {b"payload": b"J{}", b"trace": b"t"}  # original fields, no dlq-*
    assert await fake_redis.xlen(keys.dead_letter) == 0
    again = await act.replay_dead_letter(fake_redis, "orders", dead)
    assert "not found" in again
    assert await fake_redis.xlen(keys.stream) == 1


async def test_deleting_a_dead_letter_leaves_the_stream_alone(fake_redis: Any) -> None:
    keys = stream_keys("orders")
    await fake_redis.xadd(keys.stream, {"payload": b"J{}"})
    dead = (await fake_redis.xadd(keys.dead_letter, {"dlq-id": "1-0", "payload": b"x"})).decode()
    assert await act.delete_dead_letter(fake_redis, "orders", dead) == f"dead letter {dead} deleted"
    assert "not found" in await act.delete_dead_letter(fake_redis, "orders", dead)
    assert await fake_redis.xlen(keys.stream) == 1
