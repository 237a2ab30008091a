"""Which path a command takes on the auto-pipelined client, and the bytes it leaves as.

``goes_to_pool(args)``: True for the commands that must own a connection (blocking reads,
connection state, transactions, pub/sub; see ``POOLED_COMMANDS``), which keep using the
waiting pool. ``pack_command(args)``: the bytes redis-py's own packer sends for a command,
for a UTF-8 strict encoder, without its per-argument Python encoder. Both are used by
``app.core.multiplex``, which explains the paths and their failure rules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import hiredis
from redis.asyncio.connection import AbstractConnection, Connection

__all__ = ["POOLED_COMMANDS", "goes_to_pool", "pack_command", "packer_of"]

POOLED_COMMANDS = frozenset(
    {
        # blocking
        "BLPOP", "BRPOP", "BRPOPLPUSH", "BLMOVE", "BLMPOP", "BZPOPMIN", "BZPOPMAX",
        "BZMPOP", "WAIT", "WAITAOF",
        # connection state
        "AUTH", "HELLO", "SELECT", "CLIENT", "RESET", "QUIT", "MONITOR", "READONLY",
        "READWRITE", "ASKING", "SYNC", "PSYNC", "REPLCONF",
        # transactions
        "WATCH", "UNWATCH", "MULTI", "EXEC", "DISCARD",
        # pub/sub
        "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE",
        "SUNSUBSCRIBE",
        # per-connection prepared state (redis-py handles it on the pooled connection)
        "HIMPORT",
        # answered by a closed connection (SHUTDOWN) or meant to stall the server (DEBUG)
        "SHUTDOWN", "DEBUG",
    }
)  # fmt: skip
"""First words of the commands that always use the ordinary pool."""

_MAYBE_BLOCKING = frozenset({"XREAD", "XREADGROUP"})
_REDIS_PY_PACKER = Connection(encoding="utf-8", encoding_errors="strict").pack_command


def _word(value: Any) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("latin-1").upper()
    return str(value).upper()


def goes_to_pool(args: Sequence[Any]) -> bool:
    """True when the command *args* must run on a pooled connection of its own.

    Blocking commands, commands that change connection state, transactions and
    pub/sub (see ``POOLED_COMMANDS``), and ``XREAD``/``XREADGROUP`` with ``BLOCK``.
    """
    name = args[0]
    try:
        route = _ROUTES[name]
    except (KeyError, TypeError):
        route = _route_of(name)
        if len(_ROUTES) < 1024 and isinstance(name, str | bytes):
            _ROUTES[name] = route
    if route is not None:
        return route
    for arg in args[1:]:  # XREAD/XREADGROUP: options come before STREAMS, keys after it
        word = _word(arg) if isinstance(arg, str | bytes) else ""
        if word == "STREAMS":
            return False
        if word == "BLOCK":
            return True
    return False


def _route_of(name: Any) -> bool | None:
    """True: the pool; False: the links; None: it depends on the arguments (XREAD)."""
    first = _word(name).split(" ", 1)[0]
    if first in POOLED_COMMANDS:
        return True
    return None if first in _MAYBE_BLOCKING else False


_ROUTES: dict[Any, bool | None] = {}


_PLAIN_ARGS = (str, bytes, int)


def pack_command(args: tuple[Any, ...]) -> list[bytes]:
    """One command as the bytes redis-py's ``HiredisRespSerializer`` sends, for a UTF-8
    strict encoder: ``hiredis.pack_command`` straight on ``str``/``bytes``/``int``
    arguments (the common case: keys, script hashes, counts, payloads), without redis-py's
    per-argument Python encoder. Anything else (a float, a ``bool``, ``None``, a
    ``memoryview``) goes to redis-py's packer, for its exact formatting and errors.
    """
    for arg in args:
        if type(arg) not in _PLAIN_ARGS:
            return _REDIS_PY_PACKER(*args)
    name = args[0]
    if type(name) is str:
        name = name.encode()
    if b" " in name:  # "CLIENT LIST", b"SCRIPT LOAD": redis-py sends the words apart
        args = (*name.split(), *args[1:])
    return [hiredis.pack_command(args)]


def packer_of(conn: AbstractConnection) -> Callable[[tuple[Any, ...]], list[bytes]]:
    def pack(args: tuple[Any, ...]) -> list[bytes]:
        return conn.pack_command(*args)

    return pack
