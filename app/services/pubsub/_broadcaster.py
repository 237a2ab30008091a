"""``Broadcaster``: publish to every process, subscribe over one connection per process.

The class holds the options, the names, ``publish`` and ``subscribe``; its parts do the
rest: ``_Router`` (which link a channel lives on), ``_Link`` (one supervised connection),
``_Dispatcher`` (messages into subscriber queues), ``_History`` (catch-up replays).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar, overload
from urllib.parse import unquote_to_bytes

from app.core.codec import Codec, default_codec
from app.core.errors import ConfigurationError, RedisCommandError, RedisUnavailable, StateError
from app.core.guard import Duration, Guard, as_seconds, as_text, to_ms
from app.core.keys import KeySpace, bound_pattern, deprecated_prefix, escape, escape_glob
from app.core.redis import AnyRedis, client_decodes_responses, is_cluster
from app.core.scripts import Script
from app.core.telemetry import traced
from app.services.pubsub._dispatch import _Dispatcher
from app.services.pubsub._history import _History
from app.services.pubsub._routing import _Router
from app.services.pubsub._subscription import Subscription, _Topic
from app.services.pubsub._types import OverflowPolicy, Published, _check_overflow, _Counters
from app.services.pubsub._wire import _CHANNEL, _PATTERN, _SHARD, _Key, _with_trace

__all__ = ["Broadcaster"]

log = logging.getLogger("app.pubsub")

T = TypeVar("T")

_PUBLISH = Script.from_package("app.services.pubsub", "lua/pubsub_publish.lua")


def _publish_attrs(broadcaster: Any, channel: str, message: Any) -> dict[str, str]:
    # the channel stays on spans: it may name a user, so it is no metric attribute
    return {"messaging.system": "redis", "toolkit.pubsub.channel": channel}


class Broadcaster:
    """Publish and subscribe across processes over one Redis pub/sub connection per process.

    Every duration below is seconds or a ``timedelta``; a negative, NaN or infinite
    one, or zero where a wait must be positive, raises ``ConfigurationError``.

    Args:
        client: any ``redis.asyncio`` client (standalone, Sentinel-managed or
            ``RedisCluster``, ``decode_responses`` True or False) or fakeredis.
            Publishing goes through it; subscribing opens one dedicated
            connection with its settings (never one of its pooled connections).
        codec: payload codec (default: the JSON codec from settings).
        queue_size: per-subscriber queue bound (default 1000 events).
        overflow: ``"drop_oldest"`` (default; counted) or ``"disconnect"``.
        ping_interval: seconds between PINGs on the pub/sub connection.
        ping_timeout: seconds a PONG may take before the link counts as dead.
        connect_timeout: bound on connecting (and the handshake) per attempt.
        backoff_base, backoff_cap: reconnect delay is uniform in
            ``[0, min(cap, base * 2**attempt)]`` (full jitter).
        subscribe_timeout: how long ``subscribe`` waits for Redis to confirm
            before raising ``RedisUnavailable``.
        history: approximate stream length kept per channel for catch-up, as an
            int for every channel or a function of the logical channel name
            (0: plain pub/sub, the default).
        history_ttl: seconds a channel's history outlives its last publish.
        sharded: use ``SPUBLISH``/``SSUBSCRIBE`` (default: when *client* is a
            ``RedisCluster``). Sharded pub/sub has no patterns.
        drain_timeout: on ``aclose``, how long to wait for subscribers to finish.
        namespace: the key space of channels and history streams
            (``<REDIS_KEY_PREFIX>:<namespace>:...``, default ``pubsub``).
        key_prefix: deprecated (``DeprecationWarning``): overrides the root prefix
            instead. Use ``namespace=``.
    """

    def __init__(
        self,
        client: AnyRedis | Any,
        *,
        codec: Codec | None = None,
        queue_size: int = 1000,
        overflow: OverflowPolicy = "drop_oldest",
        ping_interval: Duration = 5.0,
        ping_timeout: Duration = 3.0,
        connect_timeout: Duration = 5.0,
        backoff_base: Duration = 0.1,
        backoff_cap: Duration = 5.0,
        subscribe_timeout: Duration = 10.0,
        history: int | Callable[[str], int] = 0,
        history_ttl: Duration = 3600.0,
        sharded: bool | None = None,
        drain_timeout: Duration = 5.0,
        namespace: str = "pubsub",
        key_prefix: str | None = None,
    ) -> None:
        _check_overflow(overflow)
        if queue_size < 1:
            raise ConfigurationError("queue_size must be at least 1")
        self.ping_interval = as_seconds(ping_interval, "ping_interval")
        self.ping_timeout = as_seconds(ping_timeout, "ping_timeout")
        self.connect_timeout = as_seconds(connect_timeout, "connect_timeout")
        self.backoff_base = as_seconds(backoff_base, "backoff_base", allow_zero=True)
        self.backoff_cap = as_seconds(backoff_cap, "backoff_cap", allow_zero=True)
        self.subscribe_timeout = as_seconds(subscribe_timeout, "subscribe_timeout")
        self.history_ttl_ms = to_ms(as_seconds(history_ttl, "history_ttl"))  # streams expire
        self.drain_timeout = as_seconds(drain_timeout, "drain_timeout", allow_zero=True)
        self.client = client
        self._cluster = is_cluster(client)
        self.sharded = self._cluster if sharded is None else sharded
        if self.sharded and not self._cluster:
            raise ConfigurationError("sharded pub/sub needs a RedisCluster client")
        base_codec = codec or default_codec()
        self.codec = base_codec.with_text_safe(client_decodes_responses(client))
        self.queue_size = queue_size
        self.overflow: OverflowPolicy = overflow
        self.history = history
        self.keys = KeySpace.of(namespace, deprecated_prefix(key_prefix, "Broadcaster"))
        # Publishing and history reads go through the client's breaker; the subscriber
        # links are dedicated connections supervised by _Link (reconnect with backoff).
        self._guard = Guard(client, "pub/sub publish")
        self._history_guard = Guard(client, "pub/sub history")
        self._root = (self.keys.root + "{").encode()
        self._pattern_root = escape_glob(self.keys.root) + "{"
        self._kind = _SHARD if self.sharded else _CHANNEL
        self._topics: dict[_Key, _Topic] = {}
        self._subs: set[Subscription[Any]] = set()
        self._closing = False
        self._started = False
        self._drained: asyncio.Event | None = None
        self._counters = _Counters()
        self._dispatcher = _Dispatcher(self)
        self._history = _History(self)
        self._router = _Router(self)

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> Broadcaster:
        """Connect ahead of the first subscriber (optional: ``subscribe`` starts it lazily).

        Returns at once; the connection is made in the background and retried
        with backoff while Redis is down.
        """
        if self._closing:
            raise StateError("this Broadcaster is closed; build a new one")
        self._started = True
        if not self.sharded:
            self._router.main_link().start()
        return self

    async def aclose(self, drain_timeout: Duration | None = None) -> None:
        """Stop: end every subscription, wait for subscribers to finish, close the connections.

        New ``subscribe`` calls raise ``StateError`` (a ``RuntimeError``). Each subscriber's
        iteration yields what is already queued, then ends. After
        *drain_timeout* seconds (default: the constructor's) the connections
        are closed regardless. ``publish`` keeps working (it uses the client).
        """
        bound = (
            self.drain_timeout
            if drain_timeout is None
            else as_seconds(drain_timeout, "drain_timeout", allow_zero=True)
        )
        self._closing = True
        for sub in list(self._subs):
            sub._close("shutdown")
        if self._subs:
            self._drained = asyncio.Event()
            try:
                async with asyncio.timeout(bound):
                    await self._drained.wait()
            except TimeoutError:
                log.warning(
                    "pub/sub shutdown: %d subscribers still open after %.1fs; closing anyway",
                    len(self._subs),
                    bound,
                )
        await self._router.aclose()

    async def __aenter__(self) -> Broadcaster:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- names --------------------------------------------------------------

    def channel_name(self, channel: str) -> str:
        """The Redis channel for the logical *channel* (escaped, namespaced)."""
        if not channel:
            raise ConfigurationError("a channel name must not be empty")
        return self.keys.tagged(channel)

    def history_key(self, channel: str) -> str:
        """The stream key backing *channel* when it keeps history."""
        return self.keys.tagged(channel, "history")

    def pattern_name(self, pattern: str) -> str:
        """The Redis glob for a logical *pattern* (``*`` and ``?`` are the wildcards).

        Runs of ``*`` collapse; more than ``MAX_PATTERN_WILDCARDS`` wildcards
        raise ``PatternTooComplex``: Redis matches every pattern against every
        published channel, so an unbounded one would stall the server.
        """
        if not pattern:
            raise ConfigurationError("a pattern must not be empty")
        pattern = bound_pattern(pattern, wildcards="*?", escapes=False, what="pub/sub pattern")
        out: list[str] = []
        for piece in re.split(r"([*?])", pattern):
            if piece in ("*", "?"):
                out.append(piece)
            elif piece:
                out.append(escape(piece))
        return self._pattern_root + "".join(out) + "}"

    def _logical(self, raw: bytes) -> str:
        root = self._root
        if raw.startswith(root) and raw.endswith(b"}"):
            raw = unquote_to_bytes(raw[len(root) : -1])
        return raw.decode("utf-8", "replace")

    def history_length(self, channel: str) -> int:
        """Approximate number of messages kept for *channel* (0: no history)."""
        history = self.history
        return history if isinstance(history, int) else int(history(channel))

    # -- publish ------------------------------------------------------------

    @traced("pubsub.publish", kind="producer", attrs=_publish_attrs)
    async def publish(self, channel: str, message: Any) -> Published:
        """Publish *message* (encoded with the codec) on *channel* to every process.

        One round trip: ``PUBLISH`` (``SPUBLISH`` when sharded), or on a
        history-backed channel one script that appends to the capped stream
        (``XADD MAXLEN ~``, TTL ``history_ttl`` refreshed) and publishes
        atomically. Pub/sub is at-most-once: a process whose link is down
        misses the message (its subscribers get ``Reconnected``; history
        channels replay it). Cancelled mid-flight, the message may or may not
        have been published. Raises ``RedisUnavailable`` when Redis is down
        (or its circuit breaker is open, or refuses writes for now: OOM,
        READONLY), ``RedisCommandError`` when Redis refuses the command (its
        text is in ``__cause__``), ``CodecError`` for unencodable values. Both
        Redis failures count in ``stats()["publish_errors"]``.
        """
        raw = self.channel_name(channel)
        payload = _with_trace(self.codec.encode(message))
        maxlen = self.history_length(channel)
        try:
            with self._guard:
                if maxlen > 0:
                    reply = await _PUBLISH(
                        self.client,
                        keys=[self.history_key(channel)],
                        args=[raw, payload, maxlen, self.history_ttl_ms, int(self.sharded)],
                    )
                elif self.sharded:
                    reply = await self.client.spublish(raw, payload)
                else:
                    reply = await self.client.publish(raw, payload)
        except (RedisUnavailable, RedisCommandError):
            self._counters.publish_errors += 1
            raise
        self._counters.published += 1
        if maxlen > 0:
            return Published(int(reply[1]), as_text(reply[0]))
        return Published(int(reply), None)

    # -- subscribe ----------------------------------------------------------

    @overload
    def subscribe(
        self,
        *channels: str,
        patterns: Sequence[str] = (),
        type_: None = None,
        last_ids: Mapping[str, str] | None = None,
        queue_size: int | None = None,
        overflow: OverflowPolicy | None = None,
    ) -> AbstractAsyncContextManager[Subscription[Any]]: ...

    @overload
    def subscribe(
        self,
        *channels: str,
        patterns: Sequence[str] = (),
        type_: type[T],
        last_ids: Mapping[str, str] | None = None,
        queue_size: int | None = None,
        overflow: OverflowPolicy | None = None,
    ) -> AbstractAsyncContextManager[Subscription[T]]: ...

    def subscribe(
        self,
        *channels: str,
        patterns: Sequence[str] = (),
        type_: Any = None,
        last_ids: Mapping[str, str] | None = None,
        queue_size: int | None = None,
        overflow: OverflowPolicy | None = None,
    ) -> AbstractAsyncContextManager[Subscription[Any]]:
        """Subscribe to *channels* and *patterns*: ``async with b.subscribe("a") as sub``.

        Entering returns once Redis has confirmed every subscription (so a
        message published afterwards is received), waiting at most
        ``subscribe_timeout`` (then ``RedisUnavailable``). No extra Redis
        connection is opened: all subscriptions of the process share one.
        Messages are decoded once per type: ``type_=Model`` validates into it
        (undecodable messages are logged, counted and skipped).

        On history-backed channels, ``last_ids`` (logical channel -> stream id)
        replays what was published after that id before live messages; after
        a reconnect the missed messages are replayed automatically.

        Leaving the block (also on cancellation or error) unsubscribes at once
        without waiting for Redis; the Redis channel is released when its last
        local subscriber leaves.
        """
        if not channels and not patterns:
            raise ConfigurationError("subscribe needs at least one channel or pattern")
        if patterns and self.sharded:
            raise ConfigurationError(
                "sharded pub/sub (the default on a Cluster) has no pattern subscriptions; "
                "build the Broadcaster with sharded=False to use patterns"
            )
        policy = self.overflow if overflow is None else overflow
        _check_overflow(policy)
        size = self.queue_size if queue_size is None else queue_size
        if size < 1:
            raise ConfigurationError("queue_size must be at least 1")
        return self._subscription(
            tuple(dict.fromkeys(channels)),
            tuple(dict.fromkeys(patterns)),
            type_,
            dict(last_ids or {}),
            size,
            policy,
        )

    @asynccontextmanager
    async def _subscription(
        self,
        channels: tuple[str, ...],
        patterns: tuple[str, ...],
        type_: Any,
        last_ids: dict[str, str],
        queue_size: int,
        overflow: OverflowPolicy,
    ) -> AsyncIterator[Subscription[Any]]:
        if self._closing:
            raise StateError("this Broadcaster is closed; build a new one")
        keys = [(self._kind, self.channel_name(c).encode(), c) for c in channels]
        keys += [(_PATTERN, self.pattern_name(p).encode(), p) for p in patterns]
        if self._cluster:
            await self._router.ensure_cluster()
        sub: Subscription[Any] = Subscription(self, channels, patterns, type_, queue_size, overflow)
        self._subs.add(sub)
        try:
            for kind, raw, name in keys:
                self._attach(sub, (kind, raw), name)
            await self._await_active(sub)
            sub._activated_at = asyncio.get_running_loop().time()
            await self._history.prime(sub, last_ids)
            yield sub
        finally:
            self._detach(sub)
            sub._close("exited")
            self._subs.discard(sub)
            if self._drained is not None and not self._subs:
                self._drained.set()

    def _attach(self, sub: Subscription[Any], key: _Key, name: str) -> None:
        topic = self._topics.get(key)
        if topic is None:
            link = self._router.link_for(key)
            topic = self._topics[key] = _Topic(key, name, link)
            link.add(topic)
            link.start()
        topic.subs = (*topic.subs, sub)
        sub._topics.append(topic)

    def _detach(self, sub: Subscription[Any]) -> None:
        for topic in sub._topics:
            topic.subs = tuple(s for s in topic.subs if s is not sub)
            if not topic.subs and self._topics.get(topic.key) is topic:
                del self._topics[topic.key]
                topic.link.remove(topic)
        sub._topics = []

    async def _await_active(self, sub: Subscription[Any]) -> None:
        try:
            async with asyncio.timeout(self.subscribe_timeout):
                while True:
                    pending = [t for t in sub._topics if not t.active.is_set()]
                    if not pending:
                        return
                    for topic in pending:
                        await topic.active.wait()
        except TimeoutError as exc:
            errors = {t.link.last_error for t in sub._topics if t.link.last_error}
            raise RedisUnavailable(
                f"Redis did not confirm the subscription to {sub._describe()} within "
                f"{self.subscribe_timeout}s" + (f" (last error: {errors.pop()})" if errors else "")
            ) from exc

    def _overflowed(self, sub: Subscription[Any]) -> None:
        self._counters.overflow_disconnects += 1
        log.warning(
            "pub/sub subscriber on %s exceeded its queue of %d and was disconnected",
            sub._describe(),
            sub.queue_size,
        )
        sub._close("overflow")
        self._detach(sub)

    def _record_error(self, text: str) -> None:
        self._counters.errors += 1
        self._counters.last_error = text

    # -- observability --------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters and link states (cheap; safe to serve on a metrics endpoint)."""
        links = [link.stats() for link in self._router.links.values()]
        counters = self._counters
        states = {link["state"] for link in links}
        return {
            "state": "closed"
            if self._closing
            else (states.pop() if len(states) == 1 else ("mixed" if states else "idle")),
            "sharded": self.sharded,
            "subscribers": len(self._subs),
            "channels": sum(1 for k in self._topics if k[0] != _PATTERN),
            "patterns": sum(1 for k in self._topics if k[0] == _PATTERN),
            "published": counters.published,
            "publish_errors": counters.publish_errors,
            "received": counters.received,
            "delivered": counters.delivered,
            "dropped": counters.dropped,
            "overflow_disconnects": counters.overflow_disconnects,
            "decode_errors": counters.decode_errors,
            "reconnects": counters.reconnects,
            "errors": counters.errors,
            "last_error": counters.last_error,
            "last_gap_seconds": counters.last_gap,
            "links": links,
        }
