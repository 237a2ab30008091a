"""Property tests for the codec and key building: any input, one of the documented outcomes.

Complements ``tests/unit/core/test_codec.py`` and ``test_keys.py`` (which hold
the example-based tests and the escaping properties) with generated values.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from app.core.codec import Codec
from app.core.errors import CodecError, InvalidKey
from app.core.keys import KeySpace, digest, escape, key_slot_tag

# -- codec ------------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)  # orjson's range; beyond it: CodecError (below)
    | st.floats(allow_nan=False, allow_infinity=False)  # non-finite: refused, tested below
    | st.text()
    | st.binary()
    | st.datetimes(timezones=st.just(dt.UTC))
    | st.dates()
    | st.decimals(allow_nan=False, allow_infinity=False, places=4)
)
values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        | st.tuples(inner, inner).map(list)  # tuples are JSON arrays: they decode as lists
        | st.frozensets(st.integers(-(2**63), 2**63) | st.text(max_size=4), max_size=3).map(set)
    ),
    max_leaves=12,
)

CODECS = [
    Codec(compress_threshold=0),
    Codec(compress_threshold=1),
    Codec(compress_threshold=1, text_safe=True),
    Codec(fmt="msgpack", compress_threshold=64),
]


def _same(a: Any, b: Any) -> bool:
    """Equality that also tells -0.0 from 0.0 and a Decimal's exponent apart."""
    if isinstance(a, Decimal) and isinstance(b, Decimal):
        return a.as_tuple() == b.as_tuple()
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and type(a) is type(b):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@settings(max_examples=150)
@given(st.sampled_from(CODECS), values)
def test_every_supported_value_round_trips_exactly(codec: Codec, value: Any) -> None:
    encoded = codec.encode(value)
    if codec.text_safe:
        encoded.decode("utf-8")  # storable through a decode_responses=True client
    assert _same(codec.decode(encoded), value)


@settings(max_examples=150)
@given(st.sampled_from(CODECS), values, st.data())
def test_a_damaged_envelope_decodes_or_raises_codec_error(
    codec: Codec, value: Any, data: st.DataObject
) -> None:
    """Flipped, cut or appended bytes in a real envelope: never another exception."""
    encoded = bytearray(codec.encode(value))
    action = data.draw(st.sampled_from(["flip", "cut", "append"]))
    if action == "flip" and encoded:
        i = data.draw(st.integers(0, len(encoded) - 1))
        encoded[i] ^= data.draw(st.integers(1, 255))
    elif action == "cut":
        del encoded[data.draw(st.integers(0, len(encoded))) :]
    else:
        encoded += data.draw(st.binary(min_size=1, max_size=8))
    with contextlib.suppress(CodecError):
        codec.decode(bytes(encoded))


@given(
    st.sampled_from(CODECS),
    st.sampled_from([math.inf, -math.inf, math.nan]),
    st.sampled_from(["list", "dict", "top"]),
)
def test_non_finite_floats_are_refused_not_turned_into_none(
    codec: Codec, value: float, where: str
) -> None:
    wrapped: Any = {"list": [value], "dict": {"x": {"y": value}}, "top": value}[where]
    with pytest.raises(CodecError, match="inf or nan"):
        codec.encode(wrapped)


@given(st.integers(2**64) | st.integers(max_value=-(2**63) - 1))
def test_integers_beyond_64_bits_are_refused_with_codec_error(value: int) -> None:
    for codec in CODECS:
        with pytest.raises(CodecError, match="64-bit"):
            codec.encode({"n": [value]})


@given(st.text(max_size=300))
def test_any_text_given_to_a_text_safe_codec_decodes_or_raises_codec_error(text: str) -> None:
    with contextlib.suppress(CodecError):
        Codec(text_safe=True).decode(text)


any_text = st.text(st.characters(exclude_categories=()))  # lone surrogates included
"""Every ``str`` Python can hold, not only valid Unicode (hypothesis leaves out Cs by default)."""

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)
_TAGS = ["bytes", "datetime", "date", "time", "decimal", "set", "tuple", "dict", "nope"]


@settings(max_examples=300)
@given(st.sampled_from(_TAGS), _json_values | st.text(max_size=12), st.integers(0, 3))
def test_any_tagged_value_decodes_or_raises_codec_error(kind: str, raw: Any, depth: int) -> None:
    """A stored tag with any value (``{"__t__": "decimal", "v": "abc"}``): only CodecError."""
    tagged: Any = {"__t__": kind, "v": raw}
    for _ in range(depth):
        tagged = [tagged]
    payload = b"\x01t-" + orjson.dumps(tagged)
    with contextlib.suppress(CodecError):  # the only exception allowed out
        Codec().decode(payload)


@settings(max_examples=300)
@given(st.binary(max_size=300) | st.binary(max_size=300).map(lambda b: b"\x01t-" + b))
def test_arbitrary_bytes_decode_or_raise_codec_error(payload: bytes) -> None:
    for codec in CODECS:
        with contextlib.suppress(CodecError):
            codec.decode(payload)


@example("\ud800")  # a lone surrogate has no UTF-8 form
@given(any_text)
def test_arbitrary_text_decodes_or_raises_codec_error(text: str) -> None:
    for codec in CODECS:
        with contextlib.suppress(CodecError):
            codec.decode(text)


@pytest.mark.parametrize("depth", [900, 1000, 5000])
@pytest.mark.parametrize("shape", ["list", "dict"])
def test_deeply_nested_payloads_decode_or_raise_codec_error(depth: int, shape: str) -> None:
    # Deeper than Python's recursion limit, within orjson's (1024), then past it.
    head, leaf, tail = (b"[", b"1", b"]") if shape == "list" else (b'{"a":', b"1", b"}")
    deep = head * depth + leaf + tail * depth
    for payload in (deep, b"\x01t-" + deep, b"\x01j-" + deep):
        with contextlib.suppress(CodecError):
            Codec().decode(payload)


def test_the_issue_examples_raise_the_documented_types() -> None:
    with pytest.raises(CodecError, match="InvalidOperation"):
        Codec().decode(b'\x01t-{"__t__":"decimal","v":"abc"}')
    with pytest.raises(InvalidKey, match="valid Unicode"):
        escape("\ud800")


# -- keys -------------------------------------------------------------------------------


@settings(max_examples=300)
@given(any_text)
def test_escape_of_any_text_is_key_safe_or_invalid_key(text: str) -> None:
    try:
        escaped = escape(text)
    except InvalidKey:
        return  # empty, or not valid Unicode: the documented refusal
    assert escaped and escaped.isascii()
    assert not set(escaped) & set("*?[]{}:\\ \n")


@settings(max_examples=300)
@given(any_text, any_text)
def test_escape_stays_injective_for_valid_text(a: str, b: str) -> None:
    try:
        escaped_a, escaped_b = escape(a), escape(b)
    except InvalidKey:
        return
    assert (escaped_a == escaped_b) == (a == b)


parts = st.text(min_size=1, max_size=24) | st.binary(min_size=1, max_size=24) | st.integers()


@given(parts, st.lists(parts, max_size=3), st.lists(parts, max_size=3))
def test_keys_of_one_tag_share_a_cluster_slot_whatever_their_parts(
    tag: str | bytes | int, a: list[str | bytes | int], b: list[str | bytes | int]
) -> None:
    space = KeySpace("app", "svc")
    key_a, key_b = space.tagged(tag, *a), space.tagged(tag, *b)
    assert key_slot_tag(key_a) == key_slot_tag(key_b) is not None
    assert key_slot(key_a.encode()) == key_slot(key_b.encode())


@given(parts, parts)
def test_different_tags_never_render_the_same_tag(
    a: str | bytes | int, b: str | bytes | int
) -> None:
    space = KeySpace("app", "svc")
    raw_a = a.encode() if isinstance(a, str) else str(a).encode() if isinstance(a, int) else a
    raw_b = b.encode() if isinstance(b, str) else str(b).encode() if isinstance(b, int) else b
    if raw_a != raw_b:
        assert key_slot_tag(space.tagged(a)) != key_slot_tag(space.tagged(b))


@given(st.text() | st.binary(), st.integers(8, 64))
def test_digest_is_a_fixed_length_key_safe_string(value: str | bytes, length: int) -> None:
    text = digest(value, length=length)
    assert text == digest(value, length=length)
    assert len(text) == length and text.isascii() and text.isalnum()
