"""Bounded key listings: one page of ``SCAN`` per request, on every primary of a Cluster.

A console page never walks the whole keyspace. ``scan_page`` issues at most
``MAX_CALLS`` ``SCAN ... COUNT SCAN_COUNT`` calls and returns the keys found
plus an opaque cursor (``<primary index>.<SCAN cursor>``) for the next page,
or None when every primary has been walked. On Cluster the primaries are
walked one after the other, each with its own cursor (the way
``app.core.redis.scan_keys`` walks them, but resumable). ``KEYS`` is never used.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

from app.core.keys import escape_glob
from app.core.redis import AnyRedis, is_cluster

__all__ = [
    "MAX_CALLS",
    "SCAN_COUNT",
    "KeyCounts",
    "count_namespaces",
    "parse_cursor",
    "primaries",
    "scan_page",
    "unescape",
]

SCAN_COUNT = 200
"""``COUNT`` hint of each ``SCAN`` call."""
MAX_CALLS = 10
"""``SCAN`` calls one page may make (so at most ~2,000 keys examined per request)."""

_CURSOR = re.compile(r"^(\d{1,4})\.(\d{1,20})$")


def unescape(part: str) -> str:
    """The text a ``KeySpace`` part was escaped from (``%XX`` back to bytes, then UTF-8)."""
    return unquote_to_bytes(part).decode("utf-8", "replace")


def text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def parse_cursor(value: str | None) -> tuple[int, int]:
    """``(primary index, SCAN cursor)`` from a page cursor; ``(0, 0)`` for the first page.

    Raises ``ValueError`` for anything that is not a cursor this module produced.
    """
    if not value:
        return 0, 0
    found = _CURSOR.match(value)
    if found is None:
        raise ValueError("not a console cursor")
    return int(found.group(1)), int(found.group(2))


def primaries(client: AnyRedis) -> list[Any]:
    """The nodes to walk: every Cluster primary, or ``[None]`` for one server."""
    if is_cluster(client):
        return list(client.get_primaries())  # type: ignore[union-attr]
    return [None]


async def _scan_once(
    client: AnyRedis, node: Any, cursor: int, match: str, type_: str | None
) -> tuple[int, list[Any]]:
    args: list[Any] = ["SCAN", cursor, "MATCH", match, "COUNT", SCAN_COUNT]
    if type_:
        args += ["TYPE", type_]
    if node is None:
        reply = await client.execute_command(*args)
    else:
        reply = await client.execute_command(*args, target_nodes=node)
    if isinstance(reply, dict):  # a Cluster reply keyed by node name
        reply = next(iter(reply.values()))
    if isinstance(reply, tuple | list) and len(reply) == 2 and isinstance(reply[0], dict):
        cursors, keys = reply  # redis-py's cluster callback: ({node: cursor}, keys)
        return int(next(iter(cursors.values()))), list(keys)
    next_cursor, keys = reply
    return int(next_cursor), list(keys)


@dataclass(frozen=True, slots=True)
class Page:
    """Keys found by one bounded walk and the cursor of the next page (None: done)."""

    keys: list[str]
    cursor: str | None


async def scan_page(
    client: AnyRedis,
    match: str,
    cursor: str | None = None,
    *,
    type_: str | None = None,
    want: int = 50,
) -> Page:
    """Up to about *want* keys matching *match*, from *cursor*, in at most ``MAX_CALLS`` SCANs."""
    index, position = parse_cursor(cursor)
    nodes = primaries(client)
    found: list[str] = []
    calls = 0
    while index < len(nodes) and calls < MAX_CALLS and len(found) < want:
        position, keys = await _scan_once(client, nodes[index], position, match, type_)
        calls += 1
        found.extend(text(k) for k in keys)
        if position == 0:
            index += 1
    next_cursor = f"{index}.{position}" if index < len(nodes) else None
    return Page(sorted(set(found)), next_cursor)


@dataclass(frozen=True, slots=True)
class KeyCounts:
    """Keys per service namespace (``<prefix>:<service>:...``) seen by a bounded walk."""

    counts: dict[str, int]
    examined: int
    complete: bool


async def count_namespaces(client: AnyRedis, prefix: str, *, budget: int = 5_000) -> KeyCounts:
    """Count keys per service under *prefix*, examining at most about *budget* keys."""
    counts: Counter[str] = Counter()
    match = escape_glob(prefix) + ":*"
    examined = calls = 0
    complete = True
    for node in primaries(client):
        position = 0
        while True:
            position, keys = await _scan_once(client, node, position, match, None)
            calls += 1
            examined += len(keys)
            for key in keys:
                parts = text(key).split(":", 2)
                counts[parts[1] if len(parts) > 2 else "(other)"] += 1
            if position == 0:
                break
            if examined >= budget or calls >= 2 * budget // SCAN_COUNT:
                complete = False
                break
        if not complete:
            break
    return KeyCounts(dict(sorted(counts.items())), examined, complete)
