"""Serialization with a small self-describing envelope.

Wire format of every value the toolkit stores::

    b"\\x01" <format> <compression> <payload>

``format`` is ``j`` (JSON), ``t`` (JSON with tagged values), ``b`` (raw
bytes), ``m`` (msgpack) or ``p`` (HMAC-signed pickle); ``compression`` is
``-`` (none) or ``z`` (zlib). When the envelope is *text-safe* (for clients made
with ``decode_responses=True``) binary payloads are base64-encoded and the
format or compression letter is upper case. A payload without the ``\\x01``
header is read as plain JSON, so values written by other tools still decode.

JSON is the default (orjson). Pydantic models and dataclasses are encoded as
objects; ``bytes``, ``datetime``, ``date``, ``time``, ``Decimal`` and
``set``/``frozenset`` anywhere in a value are *tagged* so an untyped
``decode`` gives them back as they were; a top-level tuple stays a tuple,
nested tuples are JSON arrays (a typed decode restores them). Encoding is one ``orjson.dumps``; only a value whose
own dicts use the tag key takes a slower escaping pass. ``decode(data, type_)``
validates through a cached pydantic ``TypeAdapter`` (a model comes back as a
model).

Compression applies above ``compress_threshold`` bytes and only when it
saves space. Decompression and payload sizes are capped
(``max_payload_bytes``): a zip bomb raises ``PayloadTooLarge``. Any payload
that cannot be decoded raises ``CodecError``, never another exception.

Pickle is refused unless the codec is built with ``allow_pickle=True`` *and*
a secret; pickled payloads carry an HMAC-SHA256 that is verified with
``hmac.compare_digest`` before anything is unpickled.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import hashlib
import hmac
import math
import pickle
import zlib
from collections.abc import Callable, Sequence
from decimal import Decimal
from functools import lru_cache
from typing import Any, Final, Protocol, TypeVar, cast, overload

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError

from app.core.config import check_secret_keys
from app.core.errors import CodecError, EncodeError, PayloadTooLarge, SignatureError

__all__ = ["Codec", "JsonCodec", "Serializer", "default_codec"]

T = TypeVar("T")

_MAGIC: Final = 0x01
_TAG: Final = "__t__"
_VAL: Final = "v"
_HMAC_LEN: Final = 32


class Serializer(Protocol):
    """What services need from a codec."""

    def encode(self, value: Any) -> bytes: ...

    def decode(self, data: bytes | str, type_: Any = None) -> Any: ...


@lru_cache(maxsize=512)
def _adapter(type_: Any) -> TypeAdapter[Any]:
    return TypeAdapter(type_)


def _type_adapter(type_: Any) -> TypeAdapter[Any]:
    try:
        return _adapter(type_)
    except TypeError:  # unhashable type expression: build uncached
        return TypeAdapter(type_)


class _Tagged:
    """Per-encode state: how many tags were written, and whether user dicts must be escaped."""

    __slots__ = ("count", "escape")

    def __init__(self, escape: bool = False) -> None:
        self.count = 0
        self.escape = escape


def _tag(kind: str, value: Any) -> dict[str, Any]:
    return {_TAG: kind, _VAL: value}


def _encode_default(state: _Tagged) -> Callable[[Any], Any]:
    fix = _escape_lookalikes if state.escape else _identity

    def default(obj: Any) -> Any:
        if isinstance(obj, BaseModel):
            try:
                # JSON mode keeps the typed-decode fast path (validate_json) for models.
                return fix(obj.model_dump(mode="json"))
            except (PydanticSerializationError, UnicodeDecodeError):  # non-UTF-8 bytes fields
                return fix(obj.model_dump(mode="python"))
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return fix({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
        if isinstance(obj, _EscapedDict):
            state.count += 1
            return _tag("dict", {k: _escape_lookalikes(v) for k, v in obj.items.items()})
        tagged = _tag_scalar(obj, fix)
        if tagged is None:
            raise TypeError(f"{type(obj).__name__} is not serializable by the JSON codec")
        state.count += 1
        return tagged

    return default


def _identity(value: Any) -> Any:
    return value


def _tag_scalar(obj: Any, fix: Callable[[Any], Any]) -> dict[str, Any] | None:
    if isinstance(obj, bytes | bytearray | memoryview):
        return _tag("bytes", base64.b64encode(bytes(obj)).decode("ascii"))
    if isinstance(obj, dt.datetime):
        return _tag("datetime", obj.isoformat())
    if isinstance(obj, dt.date):
        return _tag("date", obj.isoformat())
    if isinstance(obj, dt.time):
        return _tag("time", obj.isoformat())
    if isinstance(obj, Decimal):
        return _tag("decimal", str(obj))
    if isinstance(obj, set | frozenset):
        return _tag("set", [fix(v) for v in obj])
    return None


_ORJSON_OPTS: Final = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_NON_STR_KEYS
    | orjson.OPT_SERIALIZE_NUMPY
)
_TAG_MARK: Final = b'"__t__"'


def _escape_lookalikes(value: Any) -> Any:
    """The slow path: wrap user dicts shaped like our tags so decoding stays injective."""
    if isinstance(value, dict):
        if _TAG in value and len(value) == 2 and _VAL in value:
            return _EscapedDict(value)
        return {k: _escape_lookalikes(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escape_lookalikes(v) for v in value]
    return value


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, list | tuple | set | frozenset):
        return any(_has_non_finite(v) for v in value)
    if isinstance(value, BaseModel):
        return _has_non_finite(value.model_dump())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _has_non_finite(dataclasses.asdict(value))
    return False


class _EscapedDict:
    __slots__ = ("items",)

    def __init__(self, items: dict[Any, Any]) -> None:
        self.items = items


def _restore(value: Any) -> Any:
    if isinstance(value, list):
        return [_restore(v) for v in value]
    if isinstance(value, dict):
        if len(value) == 2 and _TAG in value and _VAL in value:
            return _untag(value[_TAG], value[_VAL])
        return {k: _restore(v) for k, v in value.items()}
    return value


def _untag(kind: str, raw: Any) -> Any:
    if kind == "bytes":
        return base64.b64decode(raw, validate=True)
    if kind == "datetime":
        return dt.datetime.fromisoformat(raw)
    if kind == "date":
        return dt.date.fromisoformat(raw)
    if kind == "time":
        return dt.time.fromisoformat(raw)
    if kind == "decimal":
        return Decimal(raw)
    if kind == "set":
        return set(_restore(raw))
    if kind == "tuple":
        return tuple(_restore(raw))
    if kind == "dict":
        return {k: _restore(v) for k, v in raw.items()}
    raise CodecError(f"unknown tagged type {kind!r} in stored payload")


class Codec:
    """Encode values to envelope bytes and back. Thread- and task-safe; reuse one instance.

    Args:
        fmt: ``"json"`` (default) or ``"msgpack"`` (needs the ``msgpack`` package)
            or ``"pickle"`` (needs ``allow_pickle=True`` and a ``secret``).
        compress_threshold: compress payloads larger than this many bytes (0: never).
        max_payload_bytes: refuse to decode (or decompress to) more than this.
        allow_pickle: decoding a pickle payload is refused unless this is True.
        secret: HMAC key(s) for signed pickle; the first signs, all verify. In a
            production-strict ``APP_ENV`` weak keys raise ``ConfigurationError``.
        text_safe: produce envelopes that are valid UTF-8 (for ``decode_responses=True``).
    """

    def __init__(
        self,
        *,
        fmt: str = "json",
        compress_threshold: int = 4096,
        max_payload_bytes: int = 16 * 1024 * 1024,
        allow_pickle: bool = False,
        secret: bytes | Sequence[bytes] | None = None,
        text_safe: bool = False,
    ) -> None:
        if fmt not in ("json", "msgpack", "pickle"):
            raise CodecError(f"unknown codec format {fmt!r}; use json, msgpack or pickle")
        secrets_ = [secret] if isinstance(secret, bytes) else list(secret or [])
        if secrets_:
            check_secret_keys(secrets_, source="Codec(secret=...)")
        if fmt == "pickle" and not (allow_pickle and secrets_):
            raise CodecError(
                "pickle needs allow_pickle=True and a secret to sign with; "
                "prefer the JSON codec, which cannot execute code on decode"
            )
        if fmt == "msgpack":
            _msgpack()  # fail at construction, not on first use
        self.fmt = fmt
        self.compress_threshold = compress_threshold
        self.max_payload_bytes = max_payload_bytes
        self.allow_pickle = allow_pickle
        self._secrets = secrets_
        self.text_safe = text_safe

    def with_text_safe(self, text_safe: bool = True) -> Codec:
        """A copy of this codec that writes text-safe (or binary) envelopes."""
        if text_safe == self.text_safe:
            return self
        clone = Codec.__new__(Codec)
        clone.__dict__.update(self.__dict__)
        clone.text_safe = text_safe
        return clone

    # -- encode --------------------------------------------------------------

    def encode(self, value: Any) -> bytes:
        """Encode *value* into an envelope.

        Raises ``EncodeError`` (a ``CodecError``) for values JSON cannot hold
        (unsupported types, inf or nan, integers past 64 bits, lone surrogates)
        and ``PayloadTooLarge`` past ``max_payload_bytes``.
        """
        if isinstance(value, bytes | bytearray | memoryview) and self.fmt != "pickle":
            fmt, payload = b"b", bytes(value)
            binary = True
        elif self.fmt == "json":
            fmt, payload = self._json(value)
            binary = False
        elif self.fmt == "msgpack":
            fmt, payload, binary = b"m", self._msgpack_dump(value), True
        else:
            fmt, payload, binary = b"p", self._pickle_dump(value), True
        if len(payload) > self.max_payload_bytes:
            raise PayloadTooLarge(
                f"encoded value is {len(payload)} bytes, over the {self.max_payload_bytes} cap",
                limit=self.max_payload_bytes,
            )
        comp = b"-"
        if self.compress_threshold and len(payload) > self.compress_threshold:
            packed = zlib.compress(payload, 1)
            if len(packed) < len(payload):
                payload, comp, binary = packed, b"z", True
        if binary and self.text_safe:
            payload = base64.b64encode(payload)
            if comp == b"z":
                comp = b"Z"
            else:
                fmt = fmt.upper()
        return b"\x01" + fmt + comp + payload

    def _json(self, value: Any) -> tuple[bytes, bytes]:
        state = _Tagged()
        if type(value) is tuple:  # a function's (items, total) result stays a tuple
            value = _tag("tuple", value)
            state.count += 1
        payload = self._dumps(value, state)
        if payload.count(_TAG_MARK) != state.count:
            # Some user data contains our tag key: redo it with look-alike dicts escaped.
            state = _Tagged(escape=True)
            payload = self._dumps(_escape_lookalikes(value), state)
        if b"null" in payload and _has_non_finite(value):
            # orjson writes inf and nan as null: they would come back as None, silently.
            raise EncodeError("cannot encode inf or nan as JSON; store them as strings or None")
        return (b"t" if state.count else b"j"), payload

    @staticmethod
    def _dumps(value: Any, state: _Tagged) -> bytes:
        try:
            return orjson.dumps(value, default=_encode_default(state), option=_ORJSON_OPTS)
        except (TypeError, orjson.JSONEncodeError) as exc:
            raise EncodeError(f"cannot encode {type(value).__name__} as JSON: {exc}") from exc

    def _msgpack_dump(self, value: Any) -> bytes:
        # msgpack has no pydantic/datetime support of its own: go through JSON-able python.
        _, payload = self._json(value)
        try:
            return cast(bytes, _msgpack().packb(orjson.loads(payload), use_bin_type=True))
        except (OverflowError, TypeError, ValueError) as exc:
            raise EncodeError(f"cannot encode {type(value).__name__} as msgpack: {exc}") from exc

    def _pickle_dump(self, value: Any) -> bytes:
        try:
            body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError, RecursionError) as exc:
            raise EncodeError(f"cannot pickle {type(value).__name__}: {exc}") from exc
        return hmac.new(self._secrets[0], body, hashlib.sha256).digest() + body

    # -- decode --------------------------------------------------------------

    @overload
    def decode(self, data: bytes | str) -> Any: ...

    @overload
    def decode(self, data: bytes | str, type_: type[T]) -> T: ...

    @overload
    def decode(self, data: bytes | str, type_: Any) -> Any: ...

    def decode(self, data: bytes | str, type_: Any = None) -> Any:
        """Decode an envelope (or plain JSON). Raises ``CodecError`` on any malformed input."""
        try:
            raw = data.encode("utf-8") if isinstance(data, str) else data
        except UnicodeEncodeError as exc:  # a lone surrogate: not text Redis could have stored
            raise CodecError(f"stored text is not valid Unicode: {exc.reason}") from exc
        if len(raw) > self.max_payload_bytes + 64:
            raise PayloadTooLarge(
                f"stored payload is {len(raw)} bytes, over the {self.max_payload_bytes} cap",
                limit=self.max_payload_bytes,
            )
        if not raw or raw[0] != _MAGIC:
            return self._from_json(raw, type_, tagged=False)
        if type_ is None and raw[1:3] == b"j-":  # plain, uncompressed JSON: the common envelope
            try:
                return orjson.loads(raw[3:])
            except orjson.JSONDecodeError as exc:
                raise CodecError(f"corrupted JSON payload: {exc}") from exc
        fmt, payload = self._open_envelope(raw)
        kind = fmt.lower()
        if kind == b"j":
            return self._from_json(payload, type_, tagged=False)
        if kind == b"t":
            return self._from_json(payload, type_, tagged=True)
        return self._decode_binary(fmt, payload, type_)

    def _open_envelope(self, raw: bytes) -> tuple[bytes, bytes]:
        """The format letter and the plain payload of an envelope (base64 and zlib undone)."""
        if len(raw) < 3:
            raise CodecError("stored payload is truncated (no envelope body)")
        fmt, comp, payload = raw[1:2], raw[2:3], raw[3:]
        try:
            if fmt.isupper() or comp == b"Z":
                payload = base64.b64decode(payload, validate=True)
            if comp in (b"z", b"Z"):
                payload = self._inflate(payload)
            elif comp != b"-":
                raise CodecError(f"unknown compression {comp!r} in stored payload")
        except binascii.Error as exc:
            raise CodecError("stored payload has a corrupted base64 body") from exc
        return fmt, payload

    def _decode_binary(self, fmt: bytes, payload: bytes, type_: Any) -> Any:
        """Decode the non-JSON formats: raw bytes, msgpack and signed pickle."""
        kind = fmt.lower()
        if kind == b"b":
            return self._validate(payload, type_)
        if kind == b"m":
            try:
                plain = _restore(_msgpack().unpackb(payload, raw=False))
            except Exception as exc:  # msgpack's errors, and tags that do not parse
                raise CodecError(f"corrupted msgpack payload: {exc}") from exc
            return self._validate(plain, type_)
        if kind == b"p":
            return self._validate(self._pickle_load(payload), type_)
        raise CodecError(f"unknown format {fmt!r} in stored payload")

    def _inflate(self, payload: bytes) -> bytes:
        inflater = zlib.decompressobj()
        try:
            out = inflater.decompress(payload, self.max_payload_bytes + 1)
        except zlib.error as exc:
            raise CodecError(f"corrupted compressed payload: {exc}") from exc
        if len(out) > self.max_payload_bytes or inflater.unconsumed_tail:
            raise PayloadTooLarge(
                f"payload inflates past the {self.max_payload_bytes}-byte cap; refused",
                limit=self.max_payload_bytes,
            )
        if not inflater.eof:
            raise CodecError("compressed payload is truncated")
        return out

    def _from_json(self, payload: bytes, type_: Any, *, tagged: bool) -> Any:
        if type_ is not None and not tagged:
            try:
                return _type_adapter(type_).validate_json(payload)
            except ValidationError as exc:
                raise CodecError(f"stored value does not match {type_!r}: {exc}") from exc
        try:
            value = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise CodecError(f"corrupted JSON payload: {exc}") from exc
        if tagged:
            try:
                value = _restore(value)
            except (ValueError, TypeError, AttributeError, ArithmeticError, RecursionError) as exc:
                # ArithmeticError: decimal.InvalidOperation for a tagged decimal like "abc"
                raise CodecError(
                    f"corrupted tagged value in payload: {type(exc).__name__}: {exc}"
                ) from exc
        return self._validate(value, type_)

    @staticmethod
    def _validate(value: Any, type_: Any) -> Any:
        if type_ is None:
            return value
        try:
            return _type_adapter(type_).validate_python(value)
        except ValidationError as exc:
            raise CodecError(f"stored value does not match {type_!r}: {exc}") from exc

    def _pickle_load(self, payload: bytes) -> Any:
        if not self.allow_pickle or not self._secrets:
            raise CodecError(
                "refusing to unpickle: pickle is disabled (allow_pickle=False or no secret)"
            )
        mac, body = payload[:_HMAC_LEN], payload[_HMAC_LEN:]
        if len(mac) != _HMAC_LEN or not any(
            hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest())
            for key in self._secrets
        ):
            raise SignatureError("pickled payload failed HMAC verification; refusing to load")
        try:
            return pickle.loads(body)
        except Exception as exc:
            raise CodecError(f"signed pickle payload could not be loaded: {exc}") from exc


def _msgpack() -> Any:
    try:
        import msgpack
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise CodecError(
            "the msgpack codec needs the 'msgpack' package: pip install msgpack"
        ) from exc
    return msgpack


JsonCodec = Codec
"""Alias: ``Codec()`` is the JSON codec."""


@lru_cache(maxsize=4)
def default_codec(text_safe: bool = False) -> Codec:
    """The shared JSON codec built from settings (compression threshold, size cap)."""
    from app.core.config import get_settings

    s = get_settings()
    return Codec(
        compress_threshold=s.codec_compress_threshold,
        max_payload_bytes=s.codec_max_payload_bytes,
        text_safe=text_safe,
    )
