"""The in-process tier of the cache (``LocalCache``) and the listener that keeps it coherent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from app.core.errors import ConfigurationError
from app.core.guard import Duration, as_seconds, as_text
from app.core.keys import star_glob_matcher
from app.core.redis import is_cluster

__all__ = [
    "InvalidationListener",
    "LocalCache",
    "LocalEntry",
    "cancel_and_wait",
    "encode_message",
    "pattern_predicate",
]

log = logging.getLogger("app.cache")

_ENTRY_OVERHEAD: Final = 96  # rough per-entry bookkeeping, counted against max_bytes


@dataclass(slots=True, eq=False)
class LocalEntry:
    """One cached payload (the codec envelope, undecoded)."""

    payload: bytes | str
    expires: float
    hard_expires: float
    tags: tuple[str, ...]
    size: int


class LocalCache:
    """A bounded LRU of payloads in front of Redis (one per ``CacheService``).

    It keeps (bounded by entry count *and* bytes) the raw payloads a
    ``CacheService`` read from or wrote to Redis. Entries live for a
    short ``ttl`` (and never past the moment the Redis entry stops being fresh),
    so a process answers hot keys without a network round trip.

    **Coherence across processes: pub/sub, not RESP3 client tracking.**
    Every write, delete, expire and invalidation of a namespace publishes a small
    message on the namespace's invalidation channel (from inside the same Lua
    script as the write where there is one, so the message cannot be lost between
    the write and the publish). ``InvalidationListener`` holds one subscriber
    connection per ``CacheService`` and evicts the named keys, tags or patterns
    from its ``LocalCache`` as messages arrive, typically well under a
    millisecond after the write.

    Why not RESP3 client-side tracking (``CLIENT TRACKING ... BCAST``)? redis-py's
    asyncio client does not implement it (redis/redis-py#3916; the attempt in
    #4220 was closed unmerged), tracking needs a redirect connection per node on
    Cluster plus Redis >= 7.4 for the redis-py sync support, fakeredis does not
    emulate it, and BCAST would push every key change under the prefix (including
    lock and bookkeeping keys) to every process. Our own channel carries exactly
    what the local tier needs: keys, whole tags (one message for any number of
    keys) and patterns, works on every topology and on fakeredis, and costs one
    ``PUBLISH`` per write.

    On a Cluster the listener subscribes on one primary with classic (not
    sharded) pub/sub: Redis forwards a ``PUBLISH`` to every node over the
    cluster bus, so the namespace's one channel reaches it from the scripts of
    every shard. Sharded pub/sub would not do: ``SPUBLISH`` from a script must
    name a channel in the script's slot, and a namespace spans 16 slots.

    **Never serving stale data after a missed message.**

    * The tier serves nothing until the listener's subscription is confirmed.
    * Every confirmation of the subscription (the first one *and* every silent
      reconnect redis-py performs, which re-subscribes and makes Redis confirm
      again) flushes the tier: messages published while the connection was down
      are lost, so everything cached before is dropped.
    * When the listener fails, the tier is switched off (entries are kept only as
      a *stale-if-error* fallback, see ``peek_stale``) until it is subscribed again.
    * A fill that raced with an invalidation is discarded: readers note the tier's
      ``epoch`` before asking Redis and ``put`` refuses the result if any
      invalidation arrived in between.

    Args:
        max_entries: most entries kept; the least recently used go first.
        max_bytes: most payload bytes kept (plus ~96 bytes per entry).
        ttl: longest time (seconds) an entry is served without asking Redis.
            Entries also stop being served when the Redis entry stops being
            fresh, whichever comes first.
        max_item_bytes: larger payloads are not kept locally (default:
            ``max_bytes // 16``), so one big value cannot flush the tier.
        clock: monotonic clock (tests may pass their own).

    Give each ``CacheService`` its own instance (its listener owns it). Not
    thread-safe; use it from one event loop (as ``CacheService`` does).
    """

    def __init__(
        self,
        *,
        max_entries: int = 1024,
        max_bytes: int = 16 * 1024 * 1024,
        ttl: Duration = 1.0,
        max_item_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ConfigurationError("max_entries and max_bytes must be positive")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl = as_seconds(ttl, "the local tier's ttl")
        self.max_item_bytes = max_item_bytes if max_item_bytes is not None else max_bytes // 16
        self.clock = clock
        self._entries: OrderedDict[str, LocalEntry] = OrderedDict()
        self._by_tag: dict[str, set[str]] = {}
        self.bytes = 0
        self.epoch = 0
        """Bumped by every invalidation: a fill started before a bump is discarded."""
        self.active = False
        """True while the invalidation subscription is confirmed (only then are entries served)."""
        self.evictions = 0
        self.invalidations = 0
        self.flushes = 0
        self.on_invalidate: Callable[[], None] | None = None
        """Called after every invalidation or flush (metrics, tests); must not raise."""

    def __len__(self) -> int:
        return len(self._entries)

    # -- reads ------------------------------------------------------------------

    def get(self, rkey: str) -> LocalEntry | None:
        """The fresh entry for *rkey*, or None (also None while the tier is inactive)."""
        if not self.active:
            return None
        entry = self._entries.get(rkey)
        if entry is None or entry.expires <= self.clock():
            return None
        self._entries.move_to_end(rkey)
        return entry

    def peek_stale(self, rkey: str) -> LocalEntry | None:
        """The entry even if expired or the tier is inactive, while Redis would still hold it.

        Only for *stale-if-error*: invalidated entries are gone, so this never
        returns a value a write or invalidation replaced.
        """
        entry = self._entries.get(rkey)
        if entry is None or entry.hard_expires <= self.clock():
            return None
        return entry

    # -- writes -----------------------------------------------------------------

    def put(
        self,
        rkey: str,
        payload: bytes | str,
        *,
        ttl: float | None,
        hard_ttl: float | None,
        tags: tuple[str, ...],
        epoch: int,
    ) -> None:
        """Keep *payload* for min(ttl, self.ttl) seconds unless an invalidation won the race.

        *epoch* is ``self.epoch`` as read before the value was fetched or
        written; if it changed since, the payload may be older than an
        invalidation already processed and is dropped.
        """
        if epoch != self.epoch or not self.active:
            return
        size = len(payload) + len(rkey) + _ENTRY_OVERHEAD
        if size > self.max_item_bytes:
            self._remove(rkey)
            return
        now = self.clock()
        life = self.ttl if ttl is None else min(ttl, self.ttl)
        if life <= 0:
            self._remove(rkey)
            return
        hard = now + hard_ttl if hard_ttl is not None else float("inf")
        self._remove(rkey)
        self._entries[rkey] = LocalEntry(payload, now + life, hard, tags, size)
        self.bytes += size
        for tag in tags:
            self._by_tag.setdefault(tag, set()).add(rkey)
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            old_key, _ = next(iter(self._entries.items()))
            self._remove(old_key)
            self.evictions += 1

    def _remove(self, rkey: str) -> bool:
        entry = self._entries.pop(rkey, None)
        if entry is None:
            return False
        self.bytes -= entry.size
        for tag in entry.tags:
            keys = self._by_tag.get(tag)
            if keys is not None:
                keys.discard(rkey)
                if not keys:
                    del self._by_tag[tag]
        return True

    # -- invalidation -------------------------------------------------------------

    def invalidate_keys(self, rkeys: Iterable[str]) -> int:
        """Drop these keys; returns how many were present."""
        self.epoch += 1
        self.invalidations += 1
        removed = sum(self._remove(k) for k in rkeys)
        self._notify()
        return removed

    def invalidate_tags(self, tags: Iterable[str]) -> int:
        """Drop every entry carrying one of *tags* (escaped tag names)."""
        self.epoch += 1
        self.invalidations += 1
        removed = 0
        for tag in tags:
            for rkey in list(self._by_tag.get(tag, ())):
                removed += self._remove(rkey)
        self._notify()
        return removed

    def invalidate_matching(self, predicate: Callable[[str], bool]) -> int:
        """Drop every entry whose key satisfies *predicate*."""
        self.epoch += 1
        self.invalidations += 1
        doomed = [k for k in self._entries if predicate(k)]
        for rkey in doomed:
            self._remove(rkey)
        self._notify()
        return len(doomed)

    def flush(self) -> None:
        """Drop everything."""
        self.epoch += 1
        self.flushes += 1
        self._entries.clear()
        self._by_tag.clear()
        self.bytes = 0
        self._notify()

    def _notify(self) -> None:
        if self.on_invalidate is not None:
            self.on_invalidate()

    def stats(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "entries": len(self._entries),
            "bytes": self.bytes,
            "max_entries": self.max_entries,
            "max_bytes": self.max_bytes,
            "ttl": self.ttl,
            "evictions": self.evictions,
            "invalidations": self.invalidations,
            "flushes": self.flushes,
        }


async def cancel_and_wait(task: asyncio.Task[Any], *, attempts: int = 50) -> None:
    """Cancel *task* and wait for it to end, cancelling again if it swallowed the cancel.

    The tasks run a caller's code (a refresh's factory, a listener), which may
    catch a cancellation and carry on; re-cancelling every 0.1 s (at most
    *attempts* times) still ends it, and shutdown never waits on it for longer.
    """
    for _ in range(attempts):
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.1)
        if done:
            break
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: an error at shutdown is not worth a traceback


# -- messages -----------------------------------------------------------------
#
# "<sender>|<op>|<body>": op "k" (rkeys, one per line), "t" (escaped tags, one
# per line), "p" (a pattern over the escaped key, "*" the only wildcard), "f"
# (flush). Keys and tags are escaped by the service, so they never contain "|"
# or a newline.


def encode_message(sender: str, op: str, items: Iterable[str] = ()) -> str:
    return f"{sender}|{op}|" + "\n".join(items)


def pattern_predicate(glob: str) -> Callable[[str], bool]:
    """A predicate over rkeys for an escaped-key glob whose only wildcard is ``*`` (linear time)."""
    glob_matches = star_glob_matcher(glob)

    def matches(rkey: str) -> bool:
        _, sep, ekey = rkey.partition("}:")
        return bool(sep) and glob_matches(ekey)

    return matches


class InvalidationListener:
    """Subscribes to a namespace's invalidation channel and applies it to a ``LocalCache``.

    Runs as one background task; ``start()`` is idempotent, ``aclose()``
    stops it. On any failure the tier is deactivated and the subscription is
    retried with capped backoff; every (re)subscription flushes the tier.
    """

    def __init__(
        self,
        client: Any,
        channel: str,
        local: LocalCache,
        *,
        sender: str,
        backoff: tuple[float, float] = (0.05, 1.0),
    ) -> None:
        self._client = client
        self.channel = channel
        self.local = local
        self.sender = sender
        self._backoff = backoff
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._active_event = asyncio.Event()
        self.subscriptions = 0
        self.messages = 0
        self.failures = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the listener task (needs a running event loop)."""
        if self.running:
            return
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"cache-invalidation:{self.channel}"
        )

    async def wait_active(self, timeout: float = 5.0) -> bool:
        """Wait until the subscription is confirmed (the tier serves from then on)."""
        self.start()
        try:
            async with asyncio.timeout(timeout):
                await self._active_event.wait()
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        """Stop listening; the tier is flushed and deactivated."""
        task, self._task = self._task, None
        self._closing = True
        if task is not None:
            await cancel_and_wait(task)
        self._closing = False
        self._deactivate()
        self.local.flush()

    def _deactivate(self) -> None:
        self.local.active = False
        self.local.epoch += 1
        self._active_event.clear()

    async def _subscriber(self, refresh: bool) -> Any:
        """A pub/sub object of the client; on a Cluster, bound to one primary.

        redis-py's ``ClusterPubSub`` picks its node from the client's slot map,
        which is empty until the client's first command (the subscribe then
        fails with ``KeyError`` forever) and stale after a failover. A classic
        ``PUBLISH`` reaches every node of a Cluster over the cluster bus, so
        any primary serves: load the map (reload it after a failure) and take
        a random one.
        """
        client = self._client
        if not is_cluster(client):
            return client.pubsub()
        if refresh:
            await client.nodes_manager.initialize()
        else:
            await client.initialize()
        return client.pubsub(node=random.choice(client.get_primaries()))

    async def _run(self) -> None:
        delay = self._backoff[0]
        failed = False
        while not self._closing:
            pubsub: Any = None
            try:
                pubsub = await self._subscriber(refresh=failed)
                await pubsub.subscribe(self.channel)
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is not None:
                        self._handle(message)
                        delay = self._backoff[0]
            except asyncio.CancelledError:
                raise
            # Not under the service's Guard: a subscription is a connection held open, not
            # a call (a guard would hold a half-open breaker's one trial for its whole
            # life), and it has its own retry with backoff; the tier stays off meanwhile.
            except Exception as exc:
                if self._closing:
                    return  # a cancellation turned into an error by the client library
                self.failures += 1
                failed = True
                if self.local.active:
                    log.warning(
                        "cache invalidation channel %r lost (%s); local tier off until "
                        "resubscribed",
                        self.channel,
                        exc,
                    )
                self._deactivate()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff[1])
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(pubsub.aclose())

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "subscribe":
            # First subscription or a silent reconnect: anything may have been missed.
            self.subscriptions += 1
            self.local.flush()
            self.local.active = True
            self._active_event.set()
            return
        if kind != "message":
            return
        data = message.get("data")
        text = as_text(data) or ""
        sender, _, rest = text.partition("|")
        op, _, body = rest.partition("|")
        self.messages += 1
        if sender == self.sender:
            return  # our own write: already applied locally
        if op == "k":
            self.local.invalidate_keys(body.split("\n"))
        elif op == "t":
            self.local.invalidate_tags(body.split("\n"))
        elif op == "p":
            self.local.invalidate_matching(pattern_predicate(body))
        else:  # "f", or anything this version does not know: be safe
            self.local.flush()
