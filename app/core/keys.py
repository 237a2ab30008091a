"""Cluster-safe key building: ``<prefix>:<service>:<part>:<part>...``.

Rules that make keys safe to build from untrusted input:

* The prefix and service are code-chosen names (``[A-Za-z0-9_.-]``) and are
  validated; every other part is *escaped*: any byte outside
  ``[A-Za-z0-9_.~@+=,;!$&'()/-]`` becomes ``%XX``. So a part can never contain
  ``:`` (no collision between ``("a:b",)`` and ``("a", "b")``), ``{``/``}``
  (no forged hash tag), or ``*?[]\\`` (no glob in ``SCAN MATCH``). Escaping is
  injective: two different parts never produce the same key.
* ``KeySpace.tagged(tag, ...)`` wraps the escaped tag in ``{...}`` so every key
  one Lua script touches lands in the same Redis Cluster slot.
* ``digest()`` turns long or sensitive values into a fixed-length hex part.
* ``bound_pattern()`` is the one gate for glob patterns from callers: runs of
  ``*`` collapse and more than ``MAX_PATTERN_WILDCARDS`` wildcards raise
  ``PatternTooComplex``; ``star_glob_matcher()`` matches a ``*``-only glob in
  linear passes (no backtracking), where a regex or the embedded store's
  matcher would take exponential time (CVE-2022-36021 is the same weakness in
  Redis before 7.0.9).
"""

from __future__ import annotations

import functools
import hashlib
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from app.core.config import get_settings
from app.core.errors import InvalidKey, PatternTooComplex

if TYPE_CHECKING:
    from _hashlib import HASH

__all__ = [
    "MAX_PATTERN_WILDCARDS",
    "HmacKey",
    "KeySpace",
    "bound_pattern",
    "deprecated_prefix",
    "digest",
    "escape",
    "escape_glob",
    "key_slot_tag",
    "star_glob_matcher",
]

MAX_PATTERN_WILDCARDS = 4
"""Most wildcards a caller's pattern may hold (after runs of ``*`` collapse)."""

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.~@+=,;!$&'()/-")
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")
_ALL_SAFE = re.compile(b"[" + re.escape(bytes(sorted(_SAFE))) + b"]+")
_ESCAPES = {b: f"%{b:02X}" for b in range(256) if b not in _SAFE}
"""``str.translate`` table over the Latin-1 reading of the bytes: one C pass per part."""


def escape(part: str | bytes | int) -> str:
    """Escape one untrusted key part (injective; no ``:``, braces or glob characters).

    Raises ``InvalidKey`` for an empty part and for text that is not valid
    Unicode (a lone surrogate such as ``"\\ud800"``, which has no UTF-8 form).
    """
    if isinstance(part, int) and not isinstance(part, bool):
        return str(part)
    try:
        raw = part.encode("utf-8") if isinstance(part, str) else bytes(part)
    except UnicodeEncodeError as exc:
        raise InvalidKey(
            f"a key part must be valid Unicode text: {exc.reason} at position {exc.start}"
        ) from exc
    if not raw:
        raise InvalidKey("a key part must not be empty")
    text = raw.decode("latin-1")  # one character per byte
    return text if _ALL_SAFE.fullmatch(raw) else text.translate(_ESCAPES)


def escape_glob(text: str) -> str:
    """Escape ``* ? [ ] \\`` so *text* matches itself literally in ``SCAN MATCH``."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)


def bound_pattern(
    pattern: str,
    *,
    wildcards: str = "*",
    escapes: bool = True,
    max_wildcards: int = MAX_PATTERN_WILDCARDS,
    what: str = "pattern",
) -> str:
    """*pattern* with runs of ``*`` collapsed; refuses more than *max_wildcards* wildcards.

    *wildcards* are the characters the pattern's syntax treats as wildcards
    (``"*"`` for cache patterns, ``"*?"`` for pub/sub patterns, ``"*?["`` for
    a raw Redis glob, where ``[`` opens a class). With *escapes*, ``\\x``
    is the literal ``x``: escaped characters are kept and never counted.
    ``a**b`` becomes ``a*b`` (same matches, less work). Raises
    ``PatternTooComplex`` (an ``InvalidKey``) naming the count and the cap.
    """
    out: list[str] = []
    count = 0
    previous_star = False
    chars = iter(pattern)
    for ch in chars:
        if escapes and ch == "\\":
            out.append(ch + next(chars, ""))
            previous_star = False
            continue
        if ch == "*" and "*" in wildcards:
            if previous_star:
                continue
            previous_star = True
            count += 1
        else:
            previous_star = False
            if ch in wildcards:
                count += 1
        out.append(ch)
    if count > max_wildcards:
        raise PatternTooComplex(
            f"{what} {_preview(pattern)} has {count} wildcards; at most {max_wildcards} are "
            "allowed (runs of '*' count once): match fewer, more literal parts",
            limit=max_wildcards,
        )
    return "".join(out)


def _preview(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def star_glob_matcher(glob: str) -> Callable[[str], bool]:
    """A predicate: does a whole string match *glob*, whose only wildcard is ``*``?

    Every other character is literal. Leftmost placement of each literal piece
    is optimal for ``*``-only globs, so matching is one ``startswith``, one
    ``endswith`` and a ``find`` per piece: time linear in the text per piece,
    whatever the input (a backtracking regex is exponential in the stars).
    """
    pieces = glob.split("*")
    if len(pieces) == 1:
        return glob.__eq__
    head, tail, middle = pieces[0], pieces[-1], pieces[1:-1]
    fixed = len(head) + len(tail)

    def matches(text: str) -> bool:
        if len(text) < fixed or not text.startswith(head) or not text.endswith(tail):
            return False
        pos, end = len(head), len(text) - len(tail)
        for piece in middle:
            found = text.find(piece, pos, end)
            if found < 0:
                return False
            pos = found + len(piece)
        return True

    return matches


def digest(value: str | bytes, *, length: int = 32) -> str:
    """A hex SHA-256 digest of *value*, truncated to *length* characters (default 128 bits)."""
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return hashlib.sha256(raw).hexdigest()[:length]


def key_slot_tag(key: str) -> str | None:
    """The hash tag Redis Cluster would hash for *key*, or None when it has none."""
    start = key.find("{")
    if start == -1:
        return None
    end = key.find("}", start + 1)
    if end == -1 or end == start + 1:
        return None
    return key[start + 1 : end]


def _check_name(kind: str, name: str) -> str:
    if not _NAME.match(name):
        raise InvalidKey(f"{kind} {name!r} must match [A-Za-z0-9_.-]{{1,64}}")
    return name


@dataclass(frozen=True, slots=True)
class KeySpace:
    """The keys of one service: ``<prefix>:<service>:...``.

    ``KeySpace("app", "cache").key("user", 1)`` -> ``"app:cache:user:1"``;
    ``KeySpace("app", "lock").tagged("jobs:42", "fence")`` ->
    ``"app:lock:{jobs%3A42}:fence"``.
    """

    prefix: str
    service: str
    root: str = field(init=False, repr=False, compare=False)
    """``<prefix>:<service>:`` — every key of this space starts with it."""

    def __post_init__(self) -> None:
        _check_name("key prefix", self.prefix)
        _check_name("service name", self.service)
        object.__setattr__(self, "root", f"{self.prefix}:{self.service}:")  # built once

    def key(self, *parts: str | bytes | int) -> str:
        """A key from escaped *parts* (at least one)."""
        if not parts:
            raise InvalidKey("a key needs at least one part")
        return self.root + ":".join(escape(p) for p in parts)

    def tagged(self, tag: str | bytes | int, *parts: str | bytes | int) -> str:
        """A key whose escaped *tag* is a Cluster hash tag; extra *parts* follow it."""
        base = f"{self.root}{{{escape(tag)}}}"
        return base + "".join(":" + escape(p) for p in parts) if parts else base

    def pattern(self, glob: str = "*") -> str:
        """A ``SCAN MATCH`` pattern confined to this space.

        *glob* is used as given: escape user input with ``escape_glob(escape(x))``
        before putting it in. The namespace part is always literal.
        """
        return escape_glob(self.root) + glob

    @classmethod
    def of(cls, service: str, prefix: str | None = None) -> KeySpace:
        """The space of *service* under *prefix*, or under the settings' ``redis_key_prefix``.

        The one way a service finds its keys: ``KeySpace.of(namespace)``. The prefix is
        read when the service is built, so a test's ``settings_override`` applies.
        """
        if prefix is None:
            prefix = get_settings().redis_key_prefix
        return cls(prefix, service)

    def child(self, service: str) -> KeySpace:
        """A sibling space under the same prefix (e.g. ``cache`` -> ``cache.tags``)."""
        return KeySpace(self.prefix, service)


def deprecated_prefix(prefix: str | None, owner: str, argument: str = "key_prefix") -> str | None:
    """The root prefix a service was given through its old ``key_prefix=`` argument.

    Every service names its keys with ``namespace=`` (``<REDIS_KEY_PREFIX>:<namespace>:``);
    the lock, semaphore, Redlock and pub/sub constructors and ``stream_keys`` once took a
    root-prefix override instead. It still works (``<key_prefix>:<service>:``, the same
    keys as before) and warns with ``DeprecationWarning``. ``None`` and ``""`` mean "not
    given", as they always did.
    """
    if not prefix:
        return None
    warnings.warn(
        f"{owner}({argument}=...) is deprecated: use namespace=, as every other service does",
        DeprecationWarning,
        stacklevel=3,
    )
    return prefix


# -- keyed digests --------------------------------------------------------------------------

_BLOCK: Final = 64  # SHA-256's block size: the HMAC pad length (RFC 2104)
_IPAD: Final = bytes(x ^ 0x36 for x in range(256))
_OPAD: Final = bytes(x ^ 0x5C for x in range(256))


class HmacKey:
    """HMAC-SHA256 under one secret, with an optional *context* absorbed before every message.

    ``HmacKey.of(secret, context).hexdigest(data)`` equals
    ``hmac.new(secret, context + data, sha256).hexdigest()``. The two padded
    hash states of RFC 2104 are computed once per key, so a digest copies two
    plain hash states: half the cost of copying an ``hmac.HMAC``, which hot
    paths (a caller's scope, an idempotency record's name, a session cookie's
    signature) pay on every request.
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, secret: bytes, context: bytes = b"") -> None:
        block = hashlib.sha256(secret).digest() if len(secret) > _BLOCK else secret
        block = block.ljust(_BLOCK, b"\0")
        self._inner: HASH = hashlib.sha256(block.translate(_IPAD))
        self._inner.update(context)
        self._outer: HASH = hashlib.sha256(block.translate(_OPAD))

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def of(secret: bytes, context: bytes = b"") -> HmacKey:
        """The key for *secret* and *context*, built once (a process has a handful)."""
        return HmacKey(secret, context)

    def digest(self, data: bytes) -> bytes:
        """The 32-byte HMAC of *context* + *data*."""
        inner = self._inner.copy()
        inner.update(data)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def hexdigest(self, data: bytes) -> str:
        """``digest(data)`` as 64 hex digits."""
        return self.digest(data).hex()
