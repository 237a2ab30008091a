"""Keys built from untrusted parts can neither collide nor act as globs."""

from __future__ import annotations

import fnmatch
import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.core.errors import InvalidKey, PatternTooComplex
from app.core.keys import (
    MAX_PATTERN_WILDCARDS,
    HmacKey,
    KeySpace,
    bound_pattern,
    digest,
    escape,
    escape_glob,
    key_slot_tag,
    star_glob_matcher,
)

SPECIAL = "*?[]{}:\\%"
parts = st.one_of(st.text(min_size=1, max_size=40), st.binary(min_size=1, max_size=40))


def test_plain_parts_stay_readable() -> None:
    ks = KeySpace("app", "cache")
    assert ks.key("user", 1) == "app:cache:user:1"
    assert ks.key("a-b_c.d") == "app:cache:a-b_c.d"


def test_special_characters_are_escaped() -> None:
    ks = KeySpace("app", "cache")
    key = ks.key("a*b?c[d]e{f}g:h\\i%j")
    assert key == "app:cache:a%2Ab%3Fc%5Bd%5De%7Bf%7Dg%3Ah%5Ci%25j"
    tail = key.removeprefix(ks.root)
    assert not set(tail) & set("*?[]{}:\\")


@given(parts)
def test_escaped_parts_have_no_special_characters(part: str | bytes) -> None:
    assert not set(escape(part)) & set("*?[]{}:\\")


_KEPT = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.~@+=,;!$&'()/-"


@given(parts)
def test_each_byte_is_kept_or_becomes_percent_hex(part: str | bytes) -> None:
    """The documented rule, byte by byte, written out plainly: what the fast path must equal."""
    raw = part.encode() if isinstance(part, str) else part
    rule = "".join(chr(b) if b in _KEPT else f"%{b:02X}" for b in raw)
    assert escape(part) == rule


@given(parts, parts)
def test_escape_is_injective(a: str | bytes, b: str | bytes) -> None:
    raw_a = a.encode() if isinstance(a, str) else a
    raw_b = b.encode() if isinstance(b, str) else b
    if raw_a != raw_b:
        assert escape(a) != escape(b)


@given(st.lists(parts, min_size=1, max_size=4), st.lists(parts, min_size=1, max_size=4))
def test_different_part_lists_never_make_the_same_key(
    a: list[str | bytes], b: list[str | bytes]
) -> None:
    ks = KeySpace("app", "svc")
    norm_a = [p.encode() if isinstance(p, str) else p for p in a]
    norm_b = [p.encode() if isinstance(p, str) else p for p in b]
    if norm_a != norm_b:
        assert ks.key(*a) != ks.key(*b)


def test_a_user_part_cannot_reach_another_namespace() -> None:
    cache = KeySpace("app", "cache")
    # "x:../session:abc" must not become a key under app:session
    assert not cache.key("x:../session:abc").startswith("app:session")
    assert cache.key("user:1") != cache.key("user", "1")


@given(parts, parts)
def test_escaped_glob_pattern_matches_only_its_own_key(a: str | bytes, b: str | bytes) -> None:
    ks = KeySpace("app", "cache")
    pattern = ks.pattern(escape_glob(escape(a)))
    key_a, key_b = ks.key(a), ks.key(b)
    # Redis globs and fnmatchcase agree on these escaped, special-free patterns
    assert fnmatch.fnmatchcase(key_a, pattern)
    if key_a != key_b:
        assert not fnmatch.fnmatchcase(key_b, pattern)


def test_escape_glob_escapes_every_glob_character() -> None:
    assert escape_glob("a*b?c[d]e\\") == "a\\*b\\?c\\[d\\]e\\\\"


def test_tagged_keys_share_one_hash_tag() -> None:
    ks = KeySpace("app", "lock")
    lock, fence = ks.tagged("jobs:{42}"), ks.tagged("jobs:{42}", "fence")
    assert lock == "app:lock:{jobs%3A%7B42%7D}"
    assert key_slot_tag(lock) == key_slot_tag(fence) == "jobs%3A%7B42%7D"


def test_user_braces_cannot_forge_a_hash_tag() -> None:
    ks = KeySpace("app", "cache")
    assert key_slot_tag(ks.key("{victim}")) is None


def test_empty_parts_and_bad_names_are_refused() -> None:
    with pytest.raises(InvalidKey):
        KeySpace("app", "cache").key("")
    with pytest.raises(InvalidKey):
        KeySpace("app", "cache").key()
    with pytest.raises(InvalidKey):
        KeySpace("app:x", "cache")
    with pytest.raises(InvalidKey):
        KeySpace("app", "ca*he")


def test_digest_is_stable_and_fixed_length() -> None:
    assert digest("abc") == digest(b"abc")
    assert len(digest("x" * 10_000)) == 32
    assert digest("a") != digest("b")


# -- bounded patterns -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "bounded"),
    [
        ("a**b", "a*b"),
        ("***", "*"),
        ("a*b*c", "a*b*c"),
        ("a\\**b", "a\\**b"),  # an escaped star is literal: it neither collapses nor counts
        ("a\\\\**", "a\\\\*"),
        ("", ""),
    ],
)
def test_runs_of_stars_collapse(pattern: str, bounded: str) -> None:
    assert bound_pattern(pattern) == bounded


def test_wildcards_past_the_cap_are_refused_with_the_count_and_the_cap() -> None:
    assert bound_pattern("*a" * MAX_PATTERN_WILDCARDS) == "*a" * MAX_PATTERN_WILDCARDS
    with pytest.raises(PatternTooComplex, match=r"has 30 wildcards; at most 4") as caught:
        bound_pattern("*x" * 30)
    assert isinstance(caught.value, InvalidKey) and caught.value.status_code == 400
    assert bound_pattern("*" * 500 + "a") == "*a"  # one run counts once
    with pytest.raises(PatternTooComplex, match="has 5 wildcards"):
        bound_pattern("a?b?c?d?e?", wildcards="*?", escapes=False)
    with pytest.raises(PatternTooComplex, match="has 5 wildcards"):
        bound_pattern("[a][b][c][d]*", wildcards="*?[")
    assert bound_pattern("\\*\\*\\*\\*\\*\\*") == "\\*\\*\\*\\*\\*\\*"  # all literal


@given(
    glob=st.lists(st.sampled_from(["*", "a", "b", "ab", "%2A"]), max_size=8).map("".join),
    text=st.text(alphabet="ab%2A", max_size=12),
)
def test_star_glob_matcher_agrees_with_fnmatch(glob: str, text: str) -> None:
    # Over an alphabet without "?[]", fnmatch's "*" is the same wildcard.
    assert star_glob_matcher(glob)(text) == fnmatch.fnmatchcase(text, glob)


def test_star_glob_matcher_ends_on_the_backtracking_worst_case() -> None:
    # A backtracking regex takes exponential time here; a run over 100 kB must simply end.
    matches = star_glob_matcher("*a" * 40 + "*b")
    assert not matches("a" * 100_000)
    assert matches("a" * 100_000 + "b")


@pytest.mark.parametrize("context", [b"", b"toolkit:caller:v1", bytes(range(256)) * 2])
def test_hmac_key_gives_the_standard_hmac_for_any_secret_length(context: bytes) -> None:
    # Signatures and record names stored by earlier releases must still match: HmacKey is
    # hmac.new(secret, context + data, sha256) whatever the secret's length (shorter than,
    # equal to and longer than SHA-256's 64-byte block, which is hashed first).
    for length in (0, 1, 31, 32, 63, 64, 65, 127, 200):
        secret = bytes((7 * i + length) % 256 for i in range(length))
        key = HmacKey(secret, context)
        for data in (b"", b"s:1", b"x" * 1000):
            expected = hmac.new(secret, context + data, hashlib.sha256)
            assert key.digest(data) == expected.digest()
            assert key.hexdigest(data) == expected.hexdigest()
    assert HmacKey.of(b"k", context) is HmacKey.of(b"k", context)  # built once per key
