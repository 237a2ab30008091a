"""One dedicated pub/sub connection, supervised: ``_Link`` connects, (re)subscribes, reads,
pings, and reconnects with backoff after any loss, telling subscribers the gap."""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ResponseError

from app.core.redis import CONNECTION_ERRORS
from app.core.telemetry import traced
from app.services.pubsub._types import Reconnected
from app.services.pubsub._wire import _CHANNEL, _PATTERN, _SHARD, _Key

if TYPE_CHECKING:
    from app.services.pubsub._broadcaster import Broadcaster
    from app.services.pubsub._subscription import Subscription, _Topic

log = logging.getLogger("app.pubsub")

_SUBSCRIBE = (b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE")
_UNSUBSCRIBE = (b"UNSUBSCRIBE", b"PUNSUBSCRIBE", b"SUNSUBSCRIBE")
_ACK_KIND = {b"subscribe": _CHANNEL, b"psubscribe": _PATTERN, b"ssubscribe": _SHARD}
_UNACK_KIND = {b"unsubscribe": _CHANNEL, b"punsubscribe": _PATTERN, b"sunsubscribe": _SHARD}
_COMMAND_CHUNK: Final = 512  # names per SUBSCRIBE command when (re)subscribing many


class _DeadLink(Exception):
    """No PONG came back within the bound."""


ConnectionFactory: TypeAlias = Callable[[], Any]


class _Link:
    """One dedicated pub/sub connection, supervised: connect, resubscribe, read, ping."""

    def __init__(self, owner: Broadcaster, name: str, factory: ConnectionFactory) -> None:
        self.owner = owner
        self.name = name
        self.factory = factory
        self.topics: dict[_Key, _Topic] = {}
        self.state = "idle"
        self.connected_once = False
        self.reconnects = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_gap: float | None = None
        self.loss_reason = "connection lost"
        self.rtt: float | None = None
        self.last_alive = 0.0
        self._conn: Any = None
        self._sent: set[_Key] = set()  # subscribed (or being subscribed) on this connection
        self._acks: dict[_Key, int] = {}  # SUBSCRIBE commands awaiting confirmation
        self._unacks: dict[_Key, int] = {}  # UNSUBSCRIBE commands we sent, unconfirmed
        self._dirty: set[_Key] = set()
        self._wake = asyncio.Event()
        self._pongs: collections.deque[asyncio.Future[None]] = collections.deque()
        self._recovering: set[_Topic] = set()
        self._task: asyncio.Task[None] | None = None

    # -- control ----------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._supervise(), name=f"pubsub-link-{self.name}"
            )
            self._task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:  # pragma: no cover - defensive
            exc = task.exception()
            self.owner._record_error(f"link {self.name} supervisor crashed: {exc!r}")
            log.error("pub/sub supervisor %s crashed", self.name, exc_info=exc)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await _cancel_all([task])
        await self._drop_connection()
        self.state = "closed"

    def add(self, topic: _Topic) -> None:
        key = topic.key
        self.topics[key] = topic
        if key in self._sent:  # still subscribed from a previous topic on this name
            if key not in self._acks:
                topic.active.set()
            return
        self._dirty.add(key)
        self._wake.set()

    def remove(self, topic: _Topic) -> None:
        self.topics.pop(topic.key, None)
        self._recovering.discard(topic)
        self._dirty.add(topic.key)
        self._wake.set()

    def mark_lost(self, topic: _Topic, now: float, lost_at: float) -> None:
        if topic.active.is_set():
            topic.active.clear()
            if topic.lost_at is None:
                topic.lost_at, topic.detected_at = lost_at, now
        if topic.lost_at is not None:
            self._recovering.add(topic)

    # -- supervision ------------------------------------------------------

    async def _supervise(self) -> None:
        attempt = 0
        owner = self.owner
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                self.state = "connecting"
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._lost(exc)
            if loop.time() - started > owner.backoff_cap:
                attempt = 0  # the session was healthy for a while: retry at once
            delay = random.uniform(0, min(owner.backoff_cap, owner.backoff_base * 2**attempt))
            attempt += 1
            self.state = "backoff"
            await asyncio.sleep(delay)
            await owner._router.before_reconnect(self)

    async def _session(self) -> None:
        conn = self.factory()
        self._conn = conn
        try:
            await self._run_session(conn)
        finally:
            self._conn = None
            await asyncio.shield(_disconnect(conn))

    async def _run_session(self, conn: Any) -> None:
        owner = self.owner
        try:
            async with asyncio.timeout(owner.connect_timeout):
                await conn.connect()
        except TimeoutError as exc:
            raise TimeoutError(f"connect timed out after {owner.connect_timeout}s") from exc
        loop = asyncio.get_running_loop()
        self.last_alive = loop.time()
        self._sent.clear()
        self._acks.clear()
        self._unacks.clear()
        self._dirty = set(self.topics)
        self.state = "connected"
        if self.connected_once:
            self.reconnects += 1
            owner._counters.reconnects += 1
        self.connected_once = True
        tasks = [
            loop.create_task(self._read(conn), name=f"pubsub-read-{self.name}"),
            loop.create_task(self._ping(conn), name=f"pubsub-ping-{self.name}"),
            loop.create_task(self._sync(conn), name=f"pubsub-sync-{self.name}"),
        ]
        self._wake.set()
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await _cancel_all(tasks)
        for task in done:
            error = task.exception()
            if error is not None:
                raise error
        raise ConnectionError("pub/sub session ended without an error")  # pragma: no cover

    @traced(
        "pubsub.reconnect",
        attrs=lambda link, exc: {"toolkit.pubsub.link": link.name},
        result=lambda _: "lost",
    )
    def _lost(self, exc: BaseException) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        was_connected = self.state == "connected"
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self.errors += 1
        self.last_error, self.last_error_at = text, time.time()
        self.owner._record_error(f"link {self.name}: {text}")
        expected = isinstance(exc, (_DeadLink, *CONNECTION_ERRORS))
        if was_connected:
            self.loss_reason = text
            log.warning(
                "pub/sub link %s lost (%s); reconnecting and resubscribing %d topics",
                self.name,
                text,
                len(self.topics),
                exc_info=None if expected else exc,
            )
        else:
            log.warning("pub/sub link %s cannot connect: %s", self.name, text)
        for topic in self.topics.values():
            self.mark_lost(topic, now, self.last_alive)
        while self._pongs:
            pong = self._pongs.popleft()
            if not pong.done():
                pong.cancel()
        self._sent.clear()
        self._acks.clear()
        self._unacks.clear()

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await _disconnect(conn)

    # -- the three tasks of a session -------------------------------------

    async def _read(self, conn: Any) -> None:
        owner = self.owner
        read = conn.read_response
        clock = asyncio.get_running_loop().time
        deliver = owner._dispatcher.deliver
        while True:
            try:
                response = await read(
                    disable_decoding=True,
                    timeout=math.inf,
                    disconnect_on_error=False,
                    push_request=True,
                )
            except ResponseError as exc:  # e.g. an ACL refusing one channel: keep the link
                owner._record_error(f"link {self.name}: {exc}")
                log.error("pub/sub link %s: Redis refused a command: %s", self.name, exc)
                continue
            self.last_alive = clock()
            if not isinstance(response, list):
                if response is not None:
                    self._pong()  # a plain "PONG" outside subscribed mode
                continue
            kind = response[0]
            if kind == b"message":
                deliver(self, _CHANNEL, response[1], response[2], None)
            elif kind == b"smessage":
                deliver(self, _SHARD, response[1], response[2], None)
            elif kind == b"pmessage":
                deliver(self, _PATTERN, response[2], response[3], response[1])
            elif kind == b"pong":
                self._pong()
            elif kind in _ACK_KIND:
                self._ack((_ACK_KIND[kind], response[1]))
            elif kind in _UNACK_KIND:
                self._unack((_UNACK_KIND[kind], response[1]))

    async def _ping(self, conn: Any) -> None:
        owner = self.owner
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(owner.ping_interval)
            if not conn.is_connected:
                raise ConnectionError("pub/sub connection closed")
            pong: asyncio.Future[None] = loop.create_future()
            self._pongs.append(pong)
            sent = loop.time()
            await conn.send_command("PING", check_health=False)
            try:
                async with asyncio.timeout(owner.ping_timeout):
                    await pong
            except TimeoutError:
                raise _DeadLink(
                    f"no PONG within {owner.ping_timeout}s on the pub/sub connection "
                    "(dead or half-open link)"
                ) from None
            self.rtt = loop.time() - sent

    async def _sync(self, conn: Any) -> None:
        """Reconcile the server's subscriptions with ``self.topics`` (batched)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            dirty, self._dirty = self._dirty, set()
            subscribe: list[list[bytes]] = [[], [], []]
            unsubscribe: list[list[bytes]] = [[], [], []]
            for key in dirty:
                wanted, sent = key in self.topics, key in self._sent
                if wanted and not sent:
                    self._sent.add(key)
                    self._acks[key] = self._acks.get(key, 0) + 1
                    subscribe[key[0]].append(key[1])
                elif sent and not wanted:
                    self._sent.discard(key)
                    self._unacks[key] = self._unacks.get(key, 0) + 1
                    unsubscribe[key[0]].append(key[1])
            if not conn.is_connected:
                raise ConnectionError("pub/sub connection closed")
            for kind in (_CHANNEL, _PATTERN, _SHARD):
                for commands, names in ((_UNSUBSCRIBE, unsubscribe), (_SUBSCRIBE, subscribe)):
                    for chunk in _chunks(kind, names[kind]):
                        await conn.send_command(commands[kind], *chunk, check_health=False)

    # -- replies ------------------------------------------------------------

    def _pong(self) -> None:
        while self._pongs:
            pong = self._pongs.popleft()
            if not pong.done():
                pong.set_result(None)
                return

    def _ack(self, key: _Key) -> None:
        count = self._acks.get(key, 0) - 1
        if count > 0:
            self._acks[key] = count
            return
        self._acks.pop(key, None)
        topic = self.topics.get(key)
        if topic is not None and key in self._sent:
            topic.active.set()
        if not self._acks and self._recovering:
            self._flush_recovered()

    def _unack(self, key: _Key) -> None:
        count = self._unacks.get(key, 0)
        if count > 0:
            if count == 1:
                del self._unacks[key]
            else:
                self._unacks[key] = count - 1
            return
        # The server dropped a subscription we did not give up: a Cluster slot moved.
        if key in self._sent:
            self._sent.discard(key)
            topic = self.topics.get(key)
            now = asyncio.get_running_loop().time()
            if topic is not None:
                self.mark_lost(topic, now, now)
            self.owner._router.server_unsubscribed(self, key)

    def _flush_recovered(self) -> None:
        now = asyncio.get_running_loop().time()
        gaps: dict[Subscription[Any], float] = {}
        flushed = 0
        for topic in [t for t in self._recovering if t.active.is_set()]:
            self._recovering.discard(topic)
            lost_at, detected_at = topic.lost_at, topic.detected_at
            topic.lost_at = topic.detected_at = None
            if lost_at is None or detected_at is None:
                continue
            flushed += 1
            gap = now - lost_at
            for sub in topic.subs:
                if sub._activated_at is not None and sub._activated_at <= detected_at:
                    gaps[sub] = max(gap, gaps.get(sub, 0.0))
        if not flushed:
            return
        worst = max(gaps.values(), default=0.0)
        self.last_gap = worst
        self.owner._counters.last_gap = worst
        reason = self.loss_reason
        for sub, gap in gaps.items():
            sub._push_control(Reconnected(gap=gap, may_have_missed=True, reason=reason))
        log.info(
            "pub/sub link %s resubscribed %d topics after a %.2fs gap; notified %d subscribers",
            self.name,
            flushed,
            worst,
            len(gaps),
        )

    def stats(self) -> dict[str, Any]:
        kinds = [0, 0, 0]
        for kind, _ in self.topics:
            kinds[kind] += 1
        return {
            "name": self.name,
            "state": self.state,
            "channels": kinds[_CHANNEL] + kinds[_SHARD],
            "patterns": kinds[_PATTERN],
            "reconnects": self.reconnects,
            "errors": self.errors,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "last_gap_seconds": self.last_gap,
            "ping_rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
        }


def _chunks(kind: int, names: list[bytes]) -> list[list[bytes]]:
    """Batches for one (UN)SUBSCRIBE command: shard channels of one command share a slot."""
    if not names:
        return []
    if kind == _SHARD:
        by_slot: dict[int, list[bytes]] = {}
        for name in names:
            by_slot.setdefault(key_slot(name), []).append(name)
        groups = list(by_slot.values())
    else:
        groups = [names]
    return [g[i : i + _COMMAND_CHUNK] for g in groups for i in range(0, len(g), _COMMAND_CHUNK)]


async def _cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel *tasks* and wait until every one has ended, even if this task is cancelled meanwhile.

    One cancel each is enough: a Redis call delivers it wherever it is
    (``app.core.pool`` sees to redis.asyncio's writes on Python 3.11).
    """
    for task in tasks:
        task.cancel()
    pending = {t for t in tasks if not t.done()}
    interrupted = False
    while pending:
        try:
            _, pending = await asyncio.wait(pending)
        except asyncio.CancelledError:  # we are being cancelled too: finish the cleanup first
            interrupted = True
            pending = {t for t in pending if not t.done()}
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: the caller reports the first error
    if interrupted:
        raise asyncio.CancelledError


async def _disconnect(conn: Any) -> None:
    try:
        await conn.disconnect(nowait=True)
    except Exception as exc:  # pragma: no cover - closing a broken socket
        log.debug("error while closing a pub/sub connection: %s", exc)


def _dedicated(connection_class: Any, kwargs: Mapping[str, Any]) -> Any:
    """A new connection with the client's settings, RESP2, no hidden retries or health PINGs."""
    options = dict(kwargs)
    options.update(protocol=2, health_check_interval=0, retry=Retry(NoBackoff(), 0))
    return connection_class(**options)
