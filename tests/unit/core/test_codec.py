"""Codec: round trips, compression, size caps, corruption and pickle safety."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import pickle
import zlib
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from app.core.codec import Codec
from app.core.errors import CodecError, PayloadTooLarge, SignatureError


class User(BaseModel):
    id: int
    name: str
    joined: dt.datetime
    avatar: bytes = b""


@dataclasses.dataclass
class Point:
    x: int
    y: int


NOW = dt.datetime(2026, 11, 21, 8, 0, tzinfo=dt.UTC)
VALUES: list[Any] = [
    {"a": 1, "b": [1, 2, {"c": None}]},
    [1, "two", 3.5, True, None],
    None,
    "text with ünïcode",
    b"\x00\xff binary",
    NOW,
    dt.date(2026, 1, 2),
    Decimal("1.10"),
    {"nested": {"blob": b"\x00\x01", "when": NOW, "tags": {"a", "b"}}},
    {"__t__": "bytes", "v": "looks like a tag"},
    [{"__t__": "set", "v": [1]}, {"k": {"__t__": "dict", "v": {}}}, b"\x00"],
    {"text": 'a "__t__" inside a string', "__t__": 1},
    12345678901234567890,
]
CODECS = {
    "plain": Codec(compress_threshold=0),
    "compressed": Codec(compress_threshold=1),
    "text-safe": Codec(compress_threshold=1, text_safe=True),
}


@pytest.mark.parametrize("codec", CODECS.values(), ids=CODECS.keys())
@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_untyped_round_trip(codec: Codec, value: Any) -> None:
    assert codec.decode(codec.encode(value)) == value


@pytest.mark.parametrize("codec", CODECS.values(), ids=CODECS.keys())
def test_models_and_dataclasses_come_back_typed(codec: Codec) -> None:
    user = User(id=1, name="ada", joined=NOW, avatar=b"\xff\x00")
    assert codec.decode(codec.encode(user), User) == user
    assert codec.decode(codec.encode(Point(1, 2)), Point) == Point(1, 2)
    assert codec.decode(codec.encode([user, user]), list[User]) == [user, user]
    assert codec.decode(codec.encode(NOW), dt.datetime) == NOW


def test_tuples_are_json_arrays_and_typed_decoding_restores_them() -> None:
    codec = Codec()
    assert codec.decode(codec.encode((1, [2, 3]))) == (1, [2, 3])  # top level: still a tuple
    encoded = codec.encode({"pair": (1, 2)})
    assert codec.decode(encoded) == {"pair": [1, 2]}
    assert codec.decode(encoded, dict[str, tuple[int, int]]) == {"pair": (1, 2)}


def test_lookalike_dicts_inside_models_and_dataclasses_are_escaped() -> None:
    @dataclasses.dataclass
    class Holder:
        data: dict[str, Any]

    codec = Codec()
    value = Holder({"__t__": "bytes", "v": "AA=="})
    assert codec.decode(codec.encode(value)) == {"data": {"__t__": "bytes", "v": "AA=="}}


def test_untyped_model_decodes_to_its_fields() -> None:
    codec = Codec()
    assert codec.decode(codec.encode(User(id=1, name="a", joined=NOW)))["name"] == "a"


def test_compression_applies_above_the_threshold_only() -> None:
    codec = Codec(compress_threshold=100)
    small, large = codec.encode("x" * 50), codec.encode("x" * 5000)
    assert small[2:3] == b"-"
    assert large[2:3] == b"z" and len(large) < 200
    assert codec.decode(large) == "x" * 5000


def test_text_safe_envelopes_are_utf8_and_decode_from_str() -> None:
    codec = Codec(compress_threshold=1, text_safe=True)
    for value in (b"\xff\xfe", "y" * 500, {"k": b"\x00"}):
        encoded = codec.encode(value)
        text = encoded.decode("utf-8")  # a decode_responses=True client can read it
        assert codec.decode(text) == value


def test_decompression_bomb_is_refused() -> None:
    codec = Codec(max_payload_bytes=1024 * 1024)
    bomb = b"\x01jz" + zlib.compress(b"0" * (50 * 1024 * 1024), 9)
    assert len(bomb) < 100_000
    with pytest.raises(PayloadTooLarge) as info:
        codec.decode(bomb)
    assert info.value.limit == 1024 * 1024


def test_oversized_values_are_refused_on_encode() -> None:
    with pytest.raises(PayloadTooLarge):
        Codec(max_payload_bytes=1024).encode("x" * 5000)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x01j-{broken",
        b"\x01",
        b"\x01q-data",
        b"\x01jzNOTZLIB",
        b"\x01j?{}",
        b'\x01t-{"__t__":"bytes","v":"@@"}',
        b'\x01t-{"__t__":"nope","v":1}',
        b"\x01Bzzz!",
        b"\x01jz" + zlib.compress(b'{"a":1}')[:-3],
        b"not json at all",
        b"\xff\xfe",
    ],
)
def test_corrupted_payloads_raise_codec_error(payload: bytes) -> None:
    with pytest.raises(CodecError):
        Codec().decode(payload)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_decoder(payload: bytes) -> None:
    with contextlib.suppress(CodecError):  # the only exception allowed out
        Codec().decode(payload)


def test_typed_decode_of_a_wrong_shape_is_a_codec_error() -> None:
    codec = Codec()
    with pytest.raises(CodecError, match="does not match"):
        codec.decode(codec.encode({"id": "not-an-int"}), User)


def test_foreign_plain_json_still_decodes() -> None:
    assert Codec().decode(b'{"written": "by another tool"}') == {"written": "by another tool"}


def test_pickle_needs_opt_in_and_a_secret() -> None:
    with pytest.raises(CodecError, match="allow_pickle"):
        Codec(fmt="pickle")
    with pytest.raises(CodecError, match="allow_pickle"):
        Codec(fmt="pickle", allow_pickle=True)


def test_pickle_payloads_are_refused_by_the_default_codec() -> None:
    signer = Codec(fmt="pickle", allow_pickle=True, secret=b"k" * 32)
    payload = signer.encode({"x": 1})
    with pytest.raises(CodecError, match="refusing to unpickle"):
        Codec().decode(payload)


def test_signed_pickle_round_trips_and_tampering_is_rejected() -> None:
    codec = Codec(fmt="pickle", allow_pickle=True, secret=b"k" * 32)
    payload = codec.encode(Point(3, 4))
    assert codec.decode(payload) == Point(3, 4)
    tampered = payload[:-1] + bytes([payload[-1] ^ 1])
    with pytest.raises(SignatureError):
        codec.decode(tampered)
    forged = b"\x01p-" + b"\x00" * 32 + pickle.dumps("evil")
    with pytest.raises(SignatureError):
        codec.decode(forged)
    other_key = Codec(fmt="pickle", allow_pickle=True, secret=b"other" * 8)
    with pytest.raises(SignatureError):
        other_key.decode(payload)


def test_pickle_key_rotation_verifies_with_old_keys() -> None:
    old = Codec(fmt="pickle", allow_pickle=True, secret=b"old-key" * 5)
    new = Codec(fmt="pickle", allow_pickle=True, secret=[b"new-key" * 5, b"old-key" * 5])
    assert new.decode(old.encode([1, 2])) == [1, 2]


def test_msgpack_format_round_trips() -> None:
    codec = Codec(fmt="msgpack", compress_threshold=1)
    value = {"a": [1, 2], "b": b"\x00", "when": NOW}
    assert codec.decode(codec.encode(value)) == value
    assert Codec().decode(codec.encode(value)) == value  # any codec reads any envelope


def test_unknown_format_is_refused() -> None:
    with pytest.raises(CodecError, match="unknown codec format"):
        Codec(fmt="yaml")


def test_unserializable_values_raise_codec_error() -> None:
    with pytest.raises(CodecError, match="cannot encode"):
        Codec().encode(object())


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_floats_are_refused_instead_of_becoming_none(value: float) -> None:
    with pytest.raises(CodecError, match="inf or nan"):
        Codec().encode({"price": [1.0, value]})
    assert Codec().decode(Codec().encode({"price": None})) == {"price": None}
