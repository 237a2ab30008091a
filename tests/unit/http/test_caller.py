"""The caller identity: resolution order, scope caching, keyed digests and rotation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from starlette.requests import Request

from app.http.caller import (
    CALLER_KEY,
    Caller,
    CallerResolver,
    forget_caller,
    resolve_caller,
    set_principal,
)


def scope_with(
    headers: dict[str, str] | None = None,
    client: tuple[str, int] | None = ("203.0.113.7", 5000),
    **extra: Any,
) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": client,
        **extra,
    }


class _LoadedSession:
    def __init__(self, session_id: str | None) -> None:
        self.id = session_id


def test_principal_wins_over_session_and_credentials() -> None:
    scope = scope_with({"Authorization": "Bearer t1"}, session=_LoadedSession("sid-1"))
    set_principal(scope, "alice")
    caller = resolve_caller(scope)
    assert caller.kind == "principal" and caller.identified


def test_session_wins_over_credentials() -> None:
    scope = scope_with({"Cookie": "session=abc"}, session=_LoadedSession("sid-1"))
    assert resolve_caller(scope).kind == "session"


def test_a_session_not_loaded_does_not_identify() -> None:
    scope = scope_with({"Cookie": "theme=dark"}, session=_LoadedSession(None))
    assert resolve_caller(scope).kind == "credentials"


def test_the_session_cookie_identifies_before_the_session_layer_runs() -> None:
    first = resolve_caller(scope_with({"Cookie": "theme=dark; session=signed-1"}))
    other_cookies = resolve_caller(scope_with({"Cookie": "session=signed-1; lang=fr"}))
    host_prefixed = resolve_caller(scope_with({"Cookie": "__Host-session=signed-1"}))
    bob = resolve_caller(scope_with({"Cookie": "session=signed-2"}))
    assert first.kind == "session" and first.digest() == other_cookies.digest()
    assert host_prefixed.digest() == first.digest()
    assert bob.digest() != first.digest()


@pytest.mark.parametrize("header", ["Authorization", "Proxy-Authorization", "Cookie", "X-API-Key"])
def test_each_credential_header_identifies_a_caller(header: str) -> None:
    assert resolve_caller(scope_with({header: "secret-value"})).kind == "credentials"


def test_without_anything_the_caller_is_anonymous_with_its_address() -> None:
    caller = resolve_caller(scope_with({"Accept": "*/*"}))
    assert caller.kind == "anonymous" and not caller.identified
    assert caller.address == "203.0.113.7"


def test_different_credentials_are_different_callers_and_digests_hide_them() -> None:
    alice = resolve_caller(scope_with({"X-API-Key": "alice-key"}))
    bob = resolve_caller(scope_with({"X-API-Key": "bob-key"}))
    again = resolve_caller(scope_with({"X-API-Key": "alice-key"}, client=("198.51.100.1", 1)))
    assert alice.digest() != bob.digest()
    assert alice.digest() == again.digest()  # the address does not matter once identified
    assert "alice" not in alice.digest() and len(alice.digest()) == 34


def test_a_token_refresh_keeps_a_principal_caller() -> None:
    first = scope_with({"Authorization": "Bearer old-token"})
    second = scope_with({"Authorization": "Bearer refreshed-token"})
    set_principal(first, "user-42")
    set_principal(second, "user-42")
    assert resolve_caller(first).digest() == resolve_caller(second).digest()


def test_kinds_never_collide() -> None:
    principal = scope_with()
    set_principal(principal, "abc")
    session = scope_with(session=_LoadedSession("abc"))
    assert resolve_caller(principal).digest() != resolve_caller(session).digest()


def test_resolved_once_and_replaced_by_set_principal() -> None:
    scope = scope_with({"X-API-Key": "k"})
    first = resolve_caller(scope)
    assert scope[CALLER_KEY] is first and resolve_caller(scope) is first
    set_principal(Request(scope), "bob")
    assert resolve_caller(scope).kind == "principal"
    forget_caller(scope)
    assert CALLER_KEY not in scope


def test_an_empty_principal_is_refused() -> None:
    with pytest.raises(ValueError, match="non-empty principal"):
        set_principal(scope_with(), "")


def test_anonymous_address_goes_through_trusted_proxies_only() -> None:
    resolver = CallerResolver(keys=[b"k" * 32], trusted_proxies=["10.0.0.0/8"])
    spoofed = scope_with({"X-Forwarded-For": "1.2.3.4"}, client=("198.51.100.9", 1))
    assert resolver.resolve(spoofed).address == "198.51.100.9"
    proxied = scope_with({"X-Forwarded-For": "1.2.3.4, 10.0.0.2"}, client=("10.0.0.1", 1))
    assert resolver.resolve(proxied).address == "1.2.3.4"


def test_scopes_list_current_then_fallback_digests(
    settings_override: Callable[..., None],
) -> None:
    settings_override(secret_key="n" * 40, secret_key_fallbacks='["' + "o" * 40 + '"]')
    rotated = resolve_caller(scope_with({"X-API-Key": "alice"}))
    settings_override(secret_key="o" * 40, secret_key_fallbacks=None)
    before = resolve_caller(scope_with({"X-API-Key": "alice"}))
    assert rotated.scopes() == (rotated.digest(), before.digest())
    assert rotated.fallback_scopes() == (before.digest(),)
    assert before.fallback_scopes() == ()


def test_configured_credential_headers(settings_override: Callable[..., None]) -> None:
    settings_override(caller_credential_headers='["x-tenant-token"]')
    assert resolve_caller(scope_with({"X-Tenant-Token": "t"})).kind == "credentials"
    assert resolve_caller(scope_with({"Authorization": "Bearer x"})).kind == "anonymous"


def test_resolver_refuses_empty_keys() -> None:
    with pytest.raises(ValueError, match="non-empty key"):
        CallerResolver(keys=[])


def test_caller_repr_shows_no_material() -> None:
    caller = resolve_caller(scope_with({"Authorization": "Bearer top-secret"}))
    assert isinstance(caller, Caller) and "top-secret" not in repr(caller)


def test_a_planted_session_cookie_does_not_merge_two_authorized_callers() -> None:
    attacker = resolve_caller(scope_with({"Cookie": "session=planted", "Authorization": "A"}))
    victim = resolve_caller(scope_with({"Cookie": "session=planted", "Authorization": "V"}))
    assert attacker.kind == victim.kind == "session"
    assert attacker.digest() != victim.digest()
    loaded_a = resolve_caller(scope_with({"X-API-Key": "a"}, session=_LoadedSession("sid")))
    loaded_v = resolve_caller(scope_with({"X-API-Key": "v"}, session=_LoadedSession("sid")))
    assert loaded_a.digest() != loaded_v.digest()


def test_a_starlette_authenticated_user_with_an_identity_is_the_principal() -> None:
    from starlette.authentication import BaseUser, SimpleUser

    class Account(BaseUser):
        def __init__(self, account_id: str) -> None:
            self.account_id = account_id

        @property
        def is_authenticated(self) -> bool:
            return True

        @property
        def identity(self) -> str:
            return self.account_id

    alice = resolve_caller(scope_with({"Authorization": "t1"}, user=Account("a-1")))
    refreshed = resolve_caller(scope_with({"Authorization": "t2"}, user=Account("a-1")))
    assert alice.kind == "principal" and alice.digest() == refreshed.digest()
    assert resolve_caller(scope_with(user=SimpleUser("ann"))).kind == "principal"

    class Named(BaseUser):  # no identity (display names are not unique): not a principal
        @property
        def is_authenticated(self) -> bool:
            return True

        @property
        def display_name(self) -> str:
            return "ann"

    named = resolve_caller(scope_with({"Authorization": "t1"}, user=Named()))
    assert named.kind == "credentials"
