"""What the console pages show, read from Redis with bounded calls only.

Every reader here makes a fixed number of round trips or walks one page
(``_scan.scan_page``, ``XRANGE``/``XPENDING``/``SSCAN`` with ``COUNT``).
Readers raise ``RedisUnavailable`` (or a ``RedisError``) when Redis fails; the
pages turn that into a 503 without internals.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from app.console._scan import (
    KeyCounts,
    count_namespaces,
    parse_cursor,
    primaries,
    scan_page,
    text,
    unescape,
)
from app.core.errors import RedisUnavailable
from app.core.keys import KeySpace, escape, escape_glob
from app.core.redis import CONNECTION_ERRORS, AnyRedis, breaker_for, health, is_cluster
from app.services.cache import CacheService
from app.services.streams import DeadLetter, StreamConsumer, stream_keys

__all__ = [
    "PAGE",
    "CacheView",
    "LockRow",
    "StreamRow",
    "cache_view",
    "dead_letter_page",
    "is_stream_id",
    "live_counters",
    "locks_page",
    "overview",
    "pubsub_view",
    "stream_detail",
    "streams_page",
]

PAGE = 50
"""Rows per listing page."""
_STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


def is_stream_id(value: str) -> bool:
    """True for a full stream entry id (``<ms>-<seq>``)."""
    return bool(_STREAM_ID.match(value))


def _tag_of(key: str, root: str) -> str | None:
    """The unescaped hash tag of ``<root>{tag}`` (None for other keys)."""
    if not (key.startswith(root + "{") and key.endswith("}")):
        return None
    inner = key[len(root) + 1 : -1]
    return None if "{" in inner or "}" in inner else unescape(inner)


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _merge_info(client: AnyRedis, info: Any) -> dict[str, Any]:
    """One INFO dict: a Cluster's per-node replies summed where numeric."""
    if not isinstance(info, dict):
        return {}
    if not is_cluster(client):
        return info
    nodes = [v for v in info.values() if isinstance(v, dict)]
    merged: dict[str, Any] = {}
    for node in nodes:
        for k, v in node.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                merged[k] = merged.get(k, 0) + v
            else:
                merged.setdefault(k, v)
    return merged


def pool_use(client: AnyRedis) -> tuple[int | None, int | None]:
    """Connections in use and the pool size of *client* (None when it does not say)."""
    pool = getattr(client, "connection_pool", None)
    in_use = getattr(pool, "_in_use_connections", None)
    size = getattr(pool, "max_connections", None)
    return (len(in_use) if in_use is not None else None, size if isinstance(size, int) else None)


async def live_counters(client: AnyRedis) -> dict[str, Any]:
    """The overview's live numbers: two round trips (PING, INFO) plus local state."""
    start = time.perf_counter()
    try:
        await client.ping()
    except CONNECTION_ERRORS as exc:
        raise RedisUnavailable("Redis did not answer PING") from exc
    latency_ms = round((time.perf_counter() - start) * 1000, 3)
    try:
        info = _merge_info(client, await client.info())
    except ResponseError:  # the embedded store has no INFO
        info = {}
    in_use, size = pool_use(client)
    return {
        "latency_ms": latency_ms,
        "breaker": breaker_for(client).state,
        "ops_per_sec": int(_num(info.get("instantaneous_ops_per_sec"))),
        "clients": int(_num(info.get("connected_clients"))),
        "used_memory": int(_num(info.get("used_memory"))),
        "pool_in_use": in_use,
        "pool_size": size,
    }


async def overview(client: AnyRedis, prefix: str) -> dict[str, Any]:
    """Health, role, version, memory, breaker, pool use and key counts per namespace."""
    status = await health(client)
    live = await live_counters(client)
    try:
        memory = _merge_info(client, await client.info("memory"))
    except ResponseError:
        memory = {}
    counts: KeyCounts = await count_namespaces(client, prefix)
    return {
        "health": status,
        "live": live,
        "memory_human": memory.get("used_memory_human"),
        "maxmemory": int(_num(memory.get("maxmemory"))),
        "counts": counts,
        "primaries": len(primaries(client)),
        "cluster": is_cluster(client),
        "pid": os.getpid(),
    }


# -- streams -----------------------------------------------------------------


@dataclass(slots=True)
class StreamRow:
    name: str
    length: int
    dead_letters: int
    groups: list[dict[str, Any]] = field(default_factory=list)


def _groups(reply: Any) -> list[dict[str, Any]]:
    out = []
    for g in reply or ():
        lag = g.get("lag")
        out.append(
            {
                "name": text(g.get("name", b"")),
                "consumers": int(g.get("consumers", 0)),
                "pending": int(g.get("pending", 0)),
                "lag": None if lag is None else int(lag),
                "last_delivered": text(g.get("last-delivered-id", b"")),
            }
        )
    return out


async def _stream_row(client: AnyRedis, name: str) -> StreamRow:
    keys = stream_keys(name)
    length = int(await client.xlen(keys.stream))
    dead = int(await client.xlen(keys.dead_letter))
    try:
        groups = _groups(await client.xinfo_groups(keys.stream))
    except ResponseError:  # no such stream (deleted meanwhile)
        groups = []
    return StreamRow(name, length, dead, groups)


async def streams_page(
    client: AnyRedis, prefix: str, cursor: str | None
) -> tuple[list[StreamRow], str | None]:
    """One page of streams (``SCAN ... TYPE stream``), each with its groups and dead letters."""
    space = KeySpace(prefix, "stream")
    page = await scan_page(client, space.pattern("*"), cursor, type_="stream", want=PAGE)
    names = [n for n in (_tag_of(k, space.root) for k in page.keys) if n is not None]
    return [await _stream_row(client, n) for n in sorted(names)], page.cursor


async def stream_detail(client: AnyRedis, name: str) -> dict[str, Any]:
    """Groups, their consumers (first 50) and pending entries (oldest 50) of stream *name*."""
    row = await _stream_row(client, name)
    key = stream_keys(name).stream
    for group in row.groups:
        consumers = await client.xinfo_consumers(key, group["name"])
        group["consumer_rows"] = [
            {
                "name": text(c.get("name", b"")),
                "pending": int(c.get("pending", 0)),
                "idle_s": round(int(c.get("idle", 0)) / 1000, 1),
            }
            for c in list(consumers)[:PAGE]
        ]
        pending = await client.xpending_range(key, group["name"], "-", "+", PAGE)
        group["pending_rows"] = [
            {
                "id": text(p["message_id"]),
                "consumer": text(p["consumer"]),
                "idle_s": round(int(p["time_since_delivered"]) / 1000, 1),
                "deliveries": int(p["times_delivered"]),
            }
            for p in pending
        ]
    return {"row": row}


async def _no_handler(message: Any) -> None:  # pragma: no cover - never run: reads only
    raise RuntimeError("the console never consumes")


async def dead_letter_page(
    client: AnyRedis, name: str, after: str | None
) -> tuple[list[DeadLetter], str | None]:
    """One page of *name*'s dead letters (oldest first) after entry id *after*."""
    reader: StreamConsumer[Any] = StreamConsumer(
        client, name, "console", "console", _no_handler, dead_letter_maxlen=None
    )
    start = f"({after}" if after else "-"
    rows = await reader.dead_letters(PAGE + 1, start=start)
    more = rows[PAGE - 1].id if len(rows) > PAGE else None
    return rows[:PAGE], more


# -- locks and semaphores ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class LockRow:
    name: str
    owner: str
    remaining_s: float
    fence: int | None
    waiters: int


async def _lock_row(client: AnyRedis, space: KeySpace, name: str) -> LockRow | None:
    key = space.tagged(name)
    async with client.pipeline(transaction=False) as pipe:
        pipe.get(key)
        pipe.pttl(key)
        pipe.get(key + ":fence")
        pipe.zcard(key + ":queue")
        owner, pttl, fence, waiters = await pipe.execute()
    if owner is None:
        return None
    return LockRow(
        name,
        text(owner),
        max(0, int(pttl)) / 1000,
        int(fence) if fence is not None else None,
        int(waiters),
    )


async def _semaphore_row(client: AnyRedis, space: KeySpace, name: str) -> dict[str, Any]:
    key = space.tagged(name)
    seconds, micros = await client.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    async with client.pipeline(transaction=False) as pipe:
        pipe.zcount(key, now_ms, "+inf")
        pipe.zrange(key, 0, 9, withscores=True)
        pipe.zcard(key + ":queue")
        holders, first, waiters = await pipe.execute()
    return {
        "name": name,
        "holders": int(holders),
        "permits": [
            {"owner": text(t), "remaining_s": max(0.0, (float(s) - now_ms) / 1000)}
            for t, s in first
            if float(s) > now_ms
        ],
        "waiters": int(waiters),
    }


async def locks_page(client: AnyRedis, prefix: str, cursor: str | None) -> dict[str, Any]:
    """Held locks (owner, remaining lease, fence, fair waiters) and semaphores, one page."""
    locks, semaphores = KeySpace(prefix, "lock"), KeySpace(prefix, "semaphore")
    page = await scan_page(client, locks.pattern("*"), cursor, type_="string", want=PAGE)
    rows = []
    for name in sorted(n for n in (_tag_of(k, locks.root) for k in page.keys) if n is not None):
        row = await _lock_row(client, locks, name)
        if row is not None:
            rows.append(row)
    sem_page = await scan_page(client, semaphores.pattern("*"), None, type_="zset", want=PAGE)
    sems = [
        await _semaphore_row(client, semaphores, n)
        for n in sorted(x for x in (_tag_of(k, semaphores.root) for k in sem_page.keys) if x)
    ]
    return {"locks": rows, "cursor": page.cursor, "semaphores": sems}


async def lock_holder(client: AnyRedis, prefix: str, name: str) -> LockRow | None:
    """The current holder of lock *name* (None when free)."""
    return await _lock_row(client, KeySpace(prefix, "lock"), name)


# -- cache -------------------------------------------------------------------


@dataclass(slots=True)
class CacheView:
    stats: dict[str, Any]
    tags: list[tuple[str, int]]
    cursor: str | None
    tag: str | None = None
    entries: list[tuple[str, float | None]] = field(default_factory=list)
    entries_cursor: str | None = None
    key: str | None = None
    key_ttl: float | None = None
    key_found: bool = False


def _ttl_seconds(pttl: int) -> float | None:
    return None if pttl < 0 else pttl / 1000


async def _tag_entries(
    client: AnyRedis, service: CacheService, tag: str, cursor: str | None
) -> tuple[list[tuple[str, float | None]], str | None]:
    """One ``SSCAN COUNT 100`` of one shard's set of *tag*, with each member's TTL.

    The cursor is ``<shard set index>.<SSCAN cursor>``; the shard sets of the tag
    are found with one bounded SCAN page.
    """
    root = service.keys.root
    match = escape_glob(root) + "{*}|tag|" + escape_glob(escape(tag))
    sets = (await scan_page(client, match, None, type_="set", want=1024)).keys
    index, position = parse_cursor(cursor)
    if index >= len(sets):
        return [], None
    position, members = await client.sscan(sets[index], position, count=100)
    shard_root = sets[index].rsplit("|tag|", 1)[0]  # a member m is the key <shard root>:m
    names = sorted(text(m) for m in members)
    entries: list[tuple[str, float | None]] = []
    if names:
        async with client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.pttl(f"{shard_root}:{name}")
            ttls = await pipe.execute()
        entries = [
            (unescape(n), _ttl_seconds(int(t)))
            for n, t in zip(names, ttls, strict=True)
            if int(t) != -2
        ]
    if position == 0:
        index, position = index + 1, 0
    return entries, (f"{index}.{position}" if index < len(sets) else None)


async def cache_view(
    client: AnyRedis,
    service: CacheService,
    *,
    cursor: str | None,
    tag: str | None,
    tag_cursor: str | None,
    key: str | None,
) -> CacheView:
    """This worker's stats, one page of tags (with sizes), a tag's entries, a key's TTL."""
    root = service.keys.root
    match = escape_glob(root) + "{*}|tag|*"
    page = await scan_page(client, match, cursor, type_="set", want=PAGE)
    tags: dict[str, int] = {}
    for tag_key in page.keys:
        name = unescape(tag_key.rsplit("|tag|", 1)[1])
        tags[name] = tags.get(name, 0) + int(await client.scard(tag_key))
    view = CacheView(service.stats(), sorted(tags.items()), page.cursor)
    if tag:
        view.tag = tag
        view.entries, view.entries_cursor = await _tag_entries(client, service, tag, tag_cursor)
    if key:
        view.key = key
        pttl = int(await client.pttl(service.redis_key(key)))
        view.key_found = pttl != -2
        view.key_ttl = _ttl_seconds(pttl)
    return view


# -- pub/sub -----------------------------------------------------------------


def _numsub_pairs(reply: Any) -> list[tuple[str, int]]:
    """``PUBSUB (SHARD)NUMSUB`` as (channel, count) pairs, whatever shape the client parsed."""
    if isinstance(reply, dict):
        return [(text(k), int(v)) for k, v in reply.items()]
    items = list(reply or ())
    if items and isinstance(items[0], list | tuple):
        return [(text(k), int(v)) for k, v in items]
    return [(text(items[i]), int(items[i + 1])) for i in range(0, len(items) - 1, 2)]


async def _channels(client: AnyRedis, match: str) -> dict[str, int]:
    """Channels matching *match* with subscriber counts, on every node (sharded ones too).

    On Cluster each primary is asked directly (no result merging by the client), for
    sharded and classic channels.
    """
    found: dict[str, int] = {}
    if is_cluster(client):
        for node in primaries(client):
            for kind, numsub in (("SHARDCHANNELS", "SHARDNUMSUB"), ("CHANNELS", "NUMSUB")):
                names = await node.execute_command("PUBSUB", kind, match)
                names = [text(n) for n in (names or [])][:200]
                if names:
                    reply = await node.execute_command("PUBSUB", numsub, *names)
                    for name, count in _numsub_pairs(reply):
                        found[name] = found.get(name, 0) + count
        return found
    names = [text(n) for n in (await client.pubsub_channels(match))][:200]
    if names:
        for name, count in _numsub_pairs(await client.pubsub_numsub(*names)):
            found[name] = count
    return found


async def pubsub_view(client: AnyRedis, prefix: str) -> list[dict[str, Any]]:
    """Channels of the toolkit's broadcasters (first 200), subscribers, last 5 history entries."""
    space = KeySpace(prefix, "pubsub")
    channels = await _channels(client, space.pattern("*"))
    rows = []
    for raw, count in sorted(channels.items()):
        name = _tag_of(raw, space.root)
        if name is None:
            continue
        history = await client.xrevrange(space.tagged(name, "history"), count=5)
        rows.append(
            {
                "name": name,
                "subscribers": count,
                "history": [
                    {
                        "id": text(i),
                        "fields": {text(k): text(v)[:200] for k, v in (f or {}).items()},
                    }
                    for i, f in history or ()
                ],
            }
        )
    return rows
