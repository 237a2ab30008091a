"""Catch CROSSSLOT errors without a cluster: a fakeredis client that checks key slots.

``slot_checking_fake_redis()`` behaves like ``fakeredis.FakeAsyncRedis`` but refuses,
with the same ``CROSSSLOT`` error Redis Cluster sends, any command or script
whose keys hash to more than one slot — including ``MULTI``/``EXEC``
transactions. Enable it for a whole suite with the ini option
``redis_strict_slots = true``: every unit test on ``fake_redis`` then proves the
code would run on Cluster.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import fakeredis
from redis.crc import key_slot
from redis.exceptions import ResponseError

__all__ = ["SlotCheckingRedis", "command_keys", "slot_checking_fake_redis", "slots_of"]

_ALL_KEYS = frozenset(
    [
        "MGET",
        "DEL",
        "UNLINK",
        "EXISTS",
        "TOUCH",
        "WATCH",
        "SINTER",
        "SUNION",
        "SDIFF",
        "PFCOUNT",
        "PFMERGE",
        "SINTERSTORE",
        "SUNIONSTORE",
        "SDIFFSTORE",
        "RENAME",
        "RENAMENX",
        "SMOVE",
        "RPOPLPUSH",
        "LMOVE",
        "COPY",
        "GEOSEARCHSTORE",
        "ZRANGESTORE",
    ]
)
_ALL_BUT_LAST = frozenset(["BLPOP", "BRPOP", "BZPOPMIN", "BZPOPMAX", "BLMOVE", "BRPOPLPUSH"])
_NUMKEYS_AT_1 = frozenset(["EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"])
_DEST_THEN_NUMKEYS = frozenset(["ZUNIONSTORE", "ZINTERSTORE", "ZDIFFSTORE"])
_NUMKEYS_AT_0 = frozenset(
    ["ZUNION", "ZINTER", "ZDIFF", "ZINTERCARD", "SINTERCARD", "LMPOP", "ZMPOP"]
)
_NO_KEY = frozenset(
    [
        "PING",
        "ECHO",
        "TIME",
        "INFO",
        "PUBLISH",
        "SPUBLISH",
        "SCRIPT",
        "CLIENT",
        "CONFIG",
        "MULTI",
        "EXEC",
        "DISCARD",
        "FLUSHALL",
        "FLUSHDB",
        "DBSIZE",
        "SELECT",
        "HELLO",
        "AUTH",
        "COMMAND",
        "ROLE",
        "WAIT",
    ]
)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def command_keys(args: Sequence[Any]) -> list[Any]:
    """The keys of a command (as sent), for the commands where several keys are possible."""
    if not args:
        return []
    name, rest = _text(args[0]).upper(), list(args[1:])
    if name in _ALL_KEYS:
        if name in ("COPY", "GEOSEARCHSTORE", "ZRANGESTORE"):
            return rest[:2]
        return rest
    if name in ("MSET", "MSETNX"):
        return rest[::2]
    if name in _ALL_BUT_LAST:
        return rest[:-1] if name.startswith(("BLPOP", "BRPOP", "BZPOP")) else rest[:2]
    if name in _NUMKEYS_AT_1:
        return rest[2 : 2 + int(rest[1])]
    if name in _DEST_THEN_NUMKEYS:
        return [rest[0], *rest[2 : 2 + int(rest[1])]]
    if name in _NUMKEYS_AT_0:
        return rest[1 : 1 + int(rest[0])]
    if name in ("XREAD", "XREADGROUP"):
        upper = [_text(a).upper() for a in rest]
        if "STREAMS" in upper:
            tail = rest[upper.index("STREAMS") + 1 :]
            return tail[: len(tail) // 2]
    return []


def slots_of(keys: Iterable[Any]) -> set[int]:
    return {key_slot(k if isinstance(k, bytes) else str(k).encode()) for k in keys}


def _check(args: Sequence[Any], keys: list[Any] | None = None) -> None:
    keys = command_keys(args) if keys is None else keys
    if len(keys) > 1 and len(slots_of(keys)) > 1:
        shown = ", ".join(_text(k) for k in keys[:4])
        raise ResponseError(
            f"CROSSSLOT Keys in request don't hash to the same slot ({_text(args[0])}: {shown})"
        )


class SlotCheckingRedis(fakeredis.FakeAsyncRedis):
    """fakeredis (Lua included) that answers CROSSSLOT like Redis Cluster would."""

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        _check(args)
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction=transaction, shard_hint=shard_hint)
        if not transaction:
            return pipe  # cluster clients split non-transactional pipelines by node
        original = pipe.execute

        async def execute(raise_on_error: bool = True) -> Any:
            keys: list[Any] = []
            for args, _ in pipe.command_stack:
                _check(args)
                if _text(args[0]).upper() in _NO_KEY:
                    continue
                keys += command_keys(args) or ([args[1]] if len(args) > 1 else [])
            if len(slots_of(keys)) > 1:
                _check(("MULTI",), keys)
            return await original(raise_on_error=raise_on_error)

        pipe.execute = execute  # type: ignore[method-assign]
        return pipe


def slot_checking_fake_redis(**kwargs: Any) -> SlotCheckingRedis:
    """A fakeredis client (Lua included) that refuses multi-slot commands with CROSSSLOT."""
    return SlotCheckingRedis(**kwargs)
