"""Where a cache key lives in Redis: escaping, shards (hash tags) and tag sets.

Layout (``<root>`` is ``<prefix>:<namespace>:``)::

    <root>{<ns>.<shard>}:<key>            the entry
    <root>{<ns>.<shard>}:<key>|lock       lease of the caller computing the value
    <root>{<ns>.<shard>}:<key>|wait       how many callers wait for it
    <root>{<ns>.<shard>}:<key>|wake       wake-up list those callers BLPOP on
    <root>{<ns>.<shard>}|tag|<tag>        tag set: keys of this shard carrying <tag>
"""

from __future__ import annotations

import re
import zlib
from typing import Final

from app.core.errors import ConfigurationError, InvalidKey
from app.core.keys import escape

__all__ = ["KeyLayout", "escape_key", "glob_to_escaped", "lease_keys", "shard_root", "tag_key"]

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.~@+=,;!$&'()/:-]+").fullmatch
_KEY_MEMO_SIZE: Final = 4096


def escape_key(key: str) -> str:
    """Escape a user key, keeping ``:`` (injective: escape() never emits ``:``)."""
    if not isinstance(key, str):
        raise InvalidKey(f"cache keys are str, got {type(key).__name__}")
    if not key:
        raise InvalidKey("a cache key must not be empty")
    if _PLAIN_KEY(key):
        return key
    return ":".join(escape(part) if part else "" for part in key.split(":"))


def glob_to_escaped(pattern: str) -> str:
    """A user pattern (``*`` wildcard, ``\\`` escapes) as a glob over escaped keys."""
    pieces: list[str] = []
    current: list[str] = []
    chars = iter(pattern)
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, "\\"))
        elif ch == "*":
            pieces.append("".join(current))
            current = []
        else:
            current.append(ch)
    pieces.append("".join(current))
    return "*".join(escape_key(p) if p else "" for p in pieces)


def shard_root(rkey: str) -> str:
    """``<root>{<ns>.<shard>}``: the part of an entry's key its bookkeeping keys share."""
    return rkey[: rkey.index("}:") + 1]


def tag_key(shard_root: str, etag: str) -> str:
    return f"{shard_root}|tag|{etag}"


def lease_keys(rkey: str) -> tuple[str, str, str]:
    """The lease, waiter count and wake-up list of the entry *rkey*."""
    return rkey + "|lock", rkey + "|wait", rkey + "|wake"


class KeyLayout:
    """The Redis keys of one namespace: ``redis_key`` memoizes the user key -> entry key map."""

    __slots__ = ("memo", "root", "shard_roots", "shards")

    def __init__(self, root: str, namespace: str, shards: int) -> None:
        if not 1 <= shards <= 1024:
            raise ConfigurationError("shards must be between 1 and 1024")
        self.root = root
        self.shards = shards
        self.shard_roots = [f"{root}{{{namespace}.{i}}}" for i in range(shards)]
        self.memo: dict[str, str] = {}

    def redis_key(self, key: str) -> str:
        """The Redis key that holds *key* (escaped, namespaced, sharded)."""
        rkey = self.memo.get(key)
        if rkey is None:
            ekey = escape_key(key)
            shard = zlib.crc32(ekey.encode()) % self.shards
            rkey = f"{self.shard_roots[shard]}:{ekey}"
            if len(self.memo) >= _KEY_MEMO_SIZE:
                self.memo.clear()
            self.memo[key] = rkey
        return rkey
