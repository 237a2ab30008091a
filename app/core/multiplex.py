"""Auto-pipelining: concurrent commands share a few multiplexed connections.

On by default (``REDIS_AUTOPIPELINE=false``: plain pooled redis.asyncio): ``get_redis()``
returns a ``MultiplexedRedis`` (standalone, Sentinel primary) or a ``RedisCluster`` with
per-node links (``app.core.multiplex_cluster``). Services never know which path ran
their command; every command returns exactly what redis.asyncio returns.

How: ``MultiplexedRedis`` is a ``redis.asyncio.Redis`` whose stateless commands
do not check a connection out of the pool. Every command that tasks issue in
the same event-loop tick is packed (by redis-py's own packer, so the bytes on
the wire are the ones redis.asyncio sends) into one buffer, written with one
``transport.write`` scheduled by ``loop.call_soon`` (a sequential caller's command on an
idle link is written at once), over one of a few long-lived *links*
(``asyncio.Protocol`` connections; ``REDIS_AUTOPIPELINE_LINKS``,
default 2, opened on demand, each command to the least loaded one). Replies are
parsed by ``hiredis.Reader`` inside ``data_received`` and resolve the callers'
futures in FIFO order; redis-py's response callbacks are then applied (RESP2
and RESP3, with or without ``decode_responses``). Links authenticate, select
the database and set the client name exactly like pooled connections.

Which path each command takes:

* the links: every other single command (``GET``, ``SET``, ``EVALSHA``,
  ``XADD``, ``XREAD``/``XREADGROUP`` without ``BLOCK``, ``PUBLISH``, ...);
* the ordinary waiting pool, unchanged, for what must own a connection:
  blocking commands (``BLPOP``, ``BRPOP``, ``BRPOPLPUSH``, ``BLMOVE``,
  ``BLMPOP``, ``BZPOPMIN``, ``BZPOPMAX``, ``BZMPOP``, ``WAIT``, ``WAITAOF``,
  and ``XREAD`` / ``XREADGROUP`` with ``BLOCK``); commands that change or read
  connection state (``AUTH``, ``HELLO``, ``SELECT``, ``CLIENT ...``, ``RESET``,
  ``QUIT``, ``MONITOR``, ``READONLY``, ``READWRITE``, ``ASKING``, ``HIMPORT``);
  ``WATCH``, ``UNWATCH``, ``MULTI``, ``EXEC``, ``DISCARD``; ``(P|S)(UN)SUBSCRIBE``;
  ``SHUTDOWN`` and ``DEBUG`` (one closes the connection, the other stalls it);
* pipelines and transactions (``client.pipeline()``, one contiguous write on
  one pooled connection), pub/sub (``client.pubsub()``) and single-connection
  clients (``client.client()``): redis-py runs them on pooled connections,
  never through this path.

Guarantees under faults (tested with many tasks each writing and reading its
own key while the connection is stalled, cut, killed by ``CLIENT KILL``, the
server killed and restarted, or a Sentinel failover happens):

* no reply reaches the wrong caller: a caller that is cancelled or whose
  socket timeout expires keeps its reply slot; the reply is read and dropped
  when it arrives, so every later reply still reaches its own caller;
  RESP3 push frames are never taken for replies;
* no caller waits past the socket timeout for a reply: it gets redis'
  ``TimeoutError``; if nothing at all arrived on the link during that time the
  link is presumed dead and takes no new command (the next one opens a new
  link), while the commands already on it keep their slots until their own
  deadlines (a server that was only slow still answers them, and nothing is
  retried that it may have run); it closes once none is left (a link still
  receiving a large reply stays);
* a lost link fails exactly the commands in flight on it with redis'
  ``ConnectionError``; the next command opens a new link. Failed commands are
  retried by the client's ``Retry`` policy exactly as redis.asyncio retries
  them today (``REDIS_RETRY_ATTEMPTS`` times, on connection errors and
  timeouts, every command: so, as on the pool, a write whose reply was lost
  may run twice); nothing acknowledged is lost by the client;
* back-pressure: at most ``REDIS_AUTOPIPELINE_MAX_IN_FLIGHT`` commands wait for
  replies on one link; past that callers wait FIFO (up to the pool timeout,
  then ``ConnectionError``) for a slot, so a burst of any size (10,000 tasks
  at once) uses bounded memory and gets no error;
* the circuit breaker, ``NOSCRIPT`` reload and the scripts' registration work
  above this path as on the pool.

Sentinel: a link connects to the primary the sentinels name, and a
``READONLY`` reply (the primary was demoted by a failover) closes the link, so
the command is retried on a new link to the new primary, as redis-py's
Sentinel connections do. Cluster: see ``app.core.multiplex_cluster`` (links
per node under redis-py's slot routing, ``MOVED``/``ASK``, topology refresh).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import hiredis
from redis import exceptions as redis_exc
from redis._parsers.helpers import decode_info as _decode_info_untyped
from redis._parsers.response_callbacks import _get_response_callback
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.client import EMPTY_RESPONSE, NEVER_DECODE

from app.core.errors import ConfigurationError
from app.core.multiplex_commands import POOLED_COMMANDS, goes_to_pool, pack_command, packer_of

__all__ = [
    "POOLED_COMMANDS",
    "MultiplexedRedis",
    "NodeMultiplexer",
    "goes_to_pool",
    "pack_command",
]

_NOT_ENOUGH_DATA = object()
_decode_info: Any = _decode_info_untyped
_NOT_FOR_CALLBACKS = frozenset({NEVER_DECODE, EMPTY_RESPONSE, "keys"})


class _Request:
    """One command's reply slot: the caller's future and how to parse its reply."""

    __slots__ = ("deadline", "future", "raw")

    def __init__(self, future: asyncio.Future[Any], raw: bool, deadline: float) -> None:
        self.future = future
        self.raw = raw  # NEVER_DECODE: read the reply as bytes even with decode_responses
        self.deadline = deadline


class _Link(asyncio.Protocol):
    """One multiplexed connection: FIFO of reply slots over one transport.

    Built from an ordinary redis-py connection after its handshake (AUTH, HELLO, CLIENT
    SETNAME, SELECT: exactly what the pool's connections do), by taking over its transport.
    """

    def __init__(self, conn: AbstractConnection, owner: NodeMultiplexer) -> None:
        self.conn = conn
        self.owner = owner
        self.loop = asyncio.get_running_loop()
        self.host = conn._host_error()
        self.timeout: float | None = conn.socket_timeout
        self.pending: collections.deque[_Request] = collections.deque()
        self.max_pending = 0
        self.alive = True
        self.draining = False
        """Presumed dead (silent for a socket timeout): takes no new command."""
        self.last_received = self.loop.time()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._batched = self._last_batch = 0  # commands in _out / in the last write
        self._watchdog: asyncio.TimerHandle | None = None
        self.closed: asyncio.Future[None] = self.loop.create_future()
        """Done once the transport is closed (``connection_lost``)."""
        options: dict[str, Any] = {
            "protocolError": redis_exc.InvalidResponse,
            "replyError": conn._parser.parse_error,
            "notEnoughData": _NOT_ENOUGH_DATA,
        }
        if conn.encoder.decode_responses:
            options["encoding"] = conn.encoder.encoding
            options["errors"] = conn.encoder.encoding_errors
        self.reader = hiredis.Reader(**options)
        encoder = conn.encoder
        self.pack = (
            pack_command
            if encoder.encoding.lower().replace("_", "-") in ("utf-8", "utf8")
            and encoder.encoding_errors == "strict"
            else packer_of(conn)
        )
        """Packs one command into the bytes redis-py's own packer would send."""
        writer = conn._writer
        if writer is None:  # pragma: no cover - connect() always sets it
            raise redis_exc.ConnectionError(f"connection to {self.host} has no transport")
        self.transport: asyncio.Transport = writer.transport  # type: ignore[assignment]
        leftover = bytes(getattr(conn._reader, "_buffer", b""))
        # The connection object stays for its packer, encoder and protocol; the
        # transport is ours now (and its close, so the object must not close it).
        # The stream objects stay referenced: a collected StreamWriter closes its transport.
        self._streams = (conn._reader, writer)
        parser: Any = conn._parser
        parser.on_disconnect()
        conn._reader = conn._writer = None
        self.transport.set_protocol(self)
        if leftover:  # pragma: no cover - the handshake reads every reply it asks for
            self.data_received(leftover)

    # -- writing ------------------------------------------------------------

    def send(self, packed: Iterable[bytes], request: _Request) -> None:
        pending = self.pending
        pending.append(request)
        if len(pending) > self.max_pending:
            self.max_pending = len(pending)
        if self._flush_scheduled:
            self._out.extend(packed)
            self._batched += 1
        elif len(pending) == 1 and self._last_batch <= 1 and self.alive:
            # Idle, and the last write carried one command: a sequential caller's command
            # leaves now, a loop turn earlier; concurrent callers still share a write.
            self.transport.write(b"".join(packed))
            self._last_batch = 1
        else:
            self._out.extend(packed)
            self._batched = 1
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        if self._watchdog is None and self.timeout is not None:
            self._watchdog = self.loop.call_at(request.deadline, self._check_deadlines)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._last_batch = self._batched
        self._batched = 0
        if self._out and self.alive:
            data = b"".join(self._out)
            self._out.clear()
            self.transport.write(data)

    # -- reading ------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.last_received = self.loop.time()
        reader = self.reader
        reader.feed(data)
        pending = self.pending
        try:
            while True:
                raw = bool(pending) and pending[0].raw
                reply = reader.gets(False) if raw else reader.gets()
                if reply is _NOT_ENOUGH_DATA:
                    return
                if isinstance(reply, hiredis.PushNotification):
                    self.owner.pushes_dropped += 1
                    continue  # RESP3 out-of-band frame: never a command's reply
                if not pending:
                    raise redis_exc.InvalidResponse(f"{self.host} sent a reply nobody asked for")
                request = pending.popleft()
                self.owner.slot_freed()
                if not request.future.done():  # a cancelled/timed-out caller's reply is dropped
                    request.future.set_result(reply)
        except redis_exc.RedisError as exc:
            self.abort(exc)
            return
        if self.draining and not pending:
            self.close()  # a retired link that answered everything it was sent

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        reason = f"Connection to {self.host} lost" + (f": {exc}" if exc else "")
        error = redis_exc.ConnectionError(reason)
        if self.alive:  # the server or the network closed it, not our close() or abort()
            self.owner.server_closed(error)
        self._fail_all(error)

    def pause_writing(self) -> None:
        """Nothing to do: ``max_in_flight`` bounds what can be buffered."""

    def resume_writing(self) -> None:
        """See ``pause_writing``."""

    # -- failure ------------------------------------------------------------

    def _check_deadlines(self) -> None:
        self._watchdog = None
        now = self.loop.time()
        silent = False
        for request in self.pending:
            if request.deadline > now:
                self._watchdog = self.loop.call_at(request.deadline, self._check_deadlines)
                break
            if not request.future.done():
                request.future.set_exception(
                    redis_exc.TimeoutError(f"Timeout reading from {self.host}")
                )
            if self.timeout is not None and self.last_received < request.deadline - self.timeout:
                silent = True
        if silent and not self.draining:
            # Nothing arrived for a whole socket timeout: presumed dead, the link takes no
            # new command. The commands already on it keep their slots until their own
            # deadlines, so a server that was only slow still answers them (failing them
            # now would make the client retry commands the server may have run).
            self.draining = True
            self.owner.retire(self)
        if self.draining and all(request.future.done() for request in self.pending):
            self.abort(redis_exc.ConnectionError(f"{self.host} stopped answering"))

    def abort(self, exc: BaseException) -> None:
        """Close the link now and fail every command still waiting on it."""
        self.transport.abort()
        self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        if not self.alive:
            return
        self.alive = False
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._out.clear()
        pending, self.pending = self.pending, collections.deque()
        for request in pending:
            self.owner.slot_freed()
            if not request.future.done():
                request.future.set_exception(exc)
        self.owner.link_lost(self)

    def close(self) -> None:
        self.transport.close()
        self._fail_all(redis_exc.ConnectionError(f"Connection to {self.host} closed"))


class NodeMultiplexer:
    """The links to one server and the in-flight cap shared by them.

    ``links`` connections at most, opened on demand; each command goes to the
    least loaded one. ``max_in_flight`` is per link: past ``links *
    max_in_flight`` commands awaiting replies, callers queue (FIFO) for up to
    ``slot_timeout`` seconds.
    """

    CLOSE_TIMEOUT = 1.0
    """Seconds ``aclose`` waits for the links' sockets to close."""

    def __init__(
        self,
        pool: ConnectionPool,
        *,
        links: int = 2,
        max_in_flight: int = 1024,
        slot_timeout: float | None = 5.0,
        on_server_close: Callable[[redis_exc.ConnectionError], None] | None = None,
    ) -> None:
        if links < 1 or max_in_flight < 1:
            raise ConfigurationError("links and max_in_flight must be at least 1")
        self.pool = pool
        self.size = links
        self.max_in_flight = max_in_flight
        self.slot_timeout = slot_timeout
        self.links: list[_Link] = []
        self.retired: set[_Link] = set()
        """Links presumed dead that still wait for (or time out) their commands' replies."""
        self.in_flight = 0
        self.max_in_flight_seen = 0
        self.slot_waits = 0
        self.pushes_dropped = 0
        self.connects = 0
        self._capacity = links * max_in_flight
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._connecting: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.follows_master = bool(getattr(pool, "is_master", False))
        """A Sentinel primary's pool: a READONLY reply means a failover happened."""
        self.resp2_fallback: AbstractConnection | None = None
        """A link's connection when the server refused HELLO (RESP2 callbacks then apply)."""
        self.on_server_close = on_server_close
        """Told when the server side closes a link (restart, ``CLIENT KILL``, idle timeout)."""

    # -- slots --------------------------------------------------------------

    async def _wait_for_slot(self) -> None:
        self.slot_waits += 1
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.slot_timeout):
                await waiter  # slot_freed hands the slot over: in_flight already counts us
            if self.in_flight > self.max_in_flight_seen:
                self.max_in_flight_seen = self.in_flight
        except TimeoutError as exc:
            raise redis_exc.ConnectionError(
                f"{self._capacity} Redis commands awaiting replies for {self.slot_timeout}s; "
                "raise REDIS_POOL_TIMEOUT or REDIS_AUTOPIPELINE_MAX_IN_FLIGHT"
            ) from exc
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.slot_freed()  # handed over just as we gave up: pass it on
            else:
                waiter.cancel()
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def slot_freed(self) -> None:
        """A reply slot emptied: hand it to the first waiter, else count it free."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.in_flight -= 1

    # -- links --------------------------------------------------------------

    def _ready_link(self) -> _Link | None:
        """The least loaded open link, or None when one should be opened first."""
        links = self.links
        best: _Link | None = None
        for link in links:
            if best is None or len(link.pending) < len(best.pending):
                best = link
        if best is not None and (len(links) >= self.size or not best.pending):
            return best
        return None

    async def _link(self) -> _Link:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # links belong to one loop; a new loop starts afresh
            self.links, self.retired = [], set()
            self._connecting = None
            self._loop = loop
        while True:
            ready = self._ready_link()
            if ready is not None:
                return ready
            if self._connecting is None:
                self._connecting = loop.create_task(self._open())
            try:
                await asyncio.shield(self._connecting)
            except redis_exc.RedisError:
                for link in self.links:
                    return link  # a second link could not open: keep using the first
                raise
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if me is not None and me.cancelling():
                    raise  # this caller was cancelled
                # aclose() cancelled the connect this caller was waiting for
                raise redis_exc.ConnectionError("the client was closed while connecting") from None

    async def _open(self) -> None:
        pool: Any = self.pool
        conn = pool.make_connection()
        try:
            try:
                await conn.connect()
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)  # a handshake cut short: close its socket
                raise
            link = _Link(conn, self)
            self.resp2_fallback = conn if conn._resp2_fallback else None
            self.links.append(link)
            self.connects += 1
        finally:
            self._connecting = None

    def server_closed(self, error: redis_exc.ConnectionError) -> None:
        """A link was closed by the server or the network, not by us.

        Whatever closed it (a restart, ``CLIENT KILL``, the server's idle ``timeout``)
        has most likely closed this server's idle pooled connections too; the owner
        hears of it (Cluster: redis-py checks those out without a liveness check).
        """
        if self.on_server_close is not None:
            self.on_server_close(error)

    def retire(self, link: _Link) -> None:
        """*link* takes no new command; it closes once its commands are answered or timed out."""
        self.link_lost(link)
        self.retired.add(link)

    def link_lost(self, link: _Link) -> None:
        if link in self.links:
            self.links.remove(link)
        if not link.alive:
            self.retired.discard(link)

    async def aclose(self) -> None:
        """Close every link (commands still in flight fail) and wait until they are closed."""
        links, self.links = [*self.links, *self.retired], []
        self.retired = set()
        for link in links:
            link.close()
        task, self._connecting = self._connecting, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, redis_exc.RedisError, OSError):
                await task
        if links and self._loop is asyncio.get_running_loop():
            await asyncio.wait([link.closed for link in links], timeout=self.CLOSE_TIMEOUT)

    # -- commands -----------------------------------------------------------

    async def request(self, args: tuple[Any, ...], raw: bool) -> Any:
        """Send one command; its raw (unparsed) reply, or the error it raised."""
        if self.in_flight < self._capacity and not self._waiters:
            self.in_flight += 1
            if self.in_flight > self.max_in_flight_seen:
                self.max_in_flight_seen = self.in_flight
        else:
            await self._wait_for_slot()
        try:
            link = self._ready_link() if self._loop is asyncio.get_running_loop() else None
            if link is None:
                link = await self._link()
            packed = link.pack(args)  # bad arguments raise DataError here
        except BaseException:
            self.slot_freed()
            raise
        loop = link.loop
        future: asyncio.Future[Any] = loop.create_future()
        link.send(packed, _Request(future, raw, loop.time() + (link.timeout or 0.0)))
        reply = await future
        if isinstance(reply, redis_exc.ReadOnlyError) and self.follows_master:
            # Sentinel: the primary this link reached was demoted. Like redis-py's
            # SentinelManagedConnection: drop the link (the next one asks the sentinels).
            error = redis_exc.ConnectionError("The previous master is now a slave")
            link.abort(error)
            raise error
        if isinstance(reply, redis_exc.ResponseError | redis_exc.ConnectionError):
            raise reply  # an error reply (hiredis maps a few, e.g. max clients, to ConnectionError)
        return reply

    def stats(self) -> dict[str, int]:
        """Links open, commands awaiting replies, the high-water marks, slot waits."""
        return {
            "links": len(self.links),
            "connects": self.connects,
            "in_flight": self.in_flight,
            "max_in_flight_seen": self.max_in_flight_seen,
            "max_link_queue": max((link.max_pending for link in self.links), default=0),
            "slot_waits": self.slot_waits,
            "pushes_dropped": self.pushes_dropped,
        }


class MultiplexedRedis(Redis):
    """``redis.asyncio.Redis`` whose stateless commands are auto-pipelined.

    Build with ``MultiplexedRedis.from_pool(pool)`` then ``enable_multiplexing``
    (``app.core.redis.build_client`` does both when ``REDIS_AUTOPIPELINE`` is
    on). Without ``enable_multiplexing``, and for single-connection clients, it
    behaves exactly like ``Redis``. See the module docstring for which commands
    use the pool and for the failure rules.
    """

    _mux: NodeMultiplexer | None = None

    def enable_multiplexing(
        self, *, links: int = 2, max_in_flight: int = 1024, slot_timeout: float | None = 5.0
    ) -> None:
        """Route stateless commands over *links* shared connections (see the class)."""
        self._mux = NodeMultiplexer(
            self.connection_pool,
            links=links,
            max_in_flight=max_in_flight,
            slot_timeout=slot_timeout,
        )

    @property
    def multiplexer(self) -> NodeMultiplexer | None:
        """The multiplexed path (``None`` when off): links and their statistics."""
        return self._mux

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        mux = self._mux
        if mux is None or self.single_connection_client or goes_to_pool(args):
            parent: Any = super()
            return await parent.execute_command(*args, **options)
        try:
            return await self._multiplexed(mux, args, options)
        except (redis_exc.ConnectionError, redis_exc.TimeoutError) as error:
            retry = self.connection_pool.connection_kwargs.get("retry")
            if retry is None:
                raise
            first: list[BaseException] = [error]

            async def again() -> Any:  # the client's Retry decides, from the first failure on
                if first:
                    raise first.pop()
                return await self._multiplexed(mux, args, options)

            return await retry.call_with_retry(again, _no_cleanup)

    async def _multiplexed(
        self, mux: NodeMultiplexer, args: tuple[Any, ...], options: dict[str, Any]
    ) -> Any:
        """One attempt; *options* are left as they are (a retry reuses them)."""
        command_name = args[0]
        raw = NEVER_DECODE in options
        try:
            response = await mux.request(args, raw)
        except redis_exc.ResponseError:
            if EMPTY_RESPONSE in options:
                return options[EMPTY_RESPONSE]
            raise
        if raw and command_name == "INFO":
            pool: Any = self.connection_pool
            response = _decode_info(response, pool.get_encoder())
        fallback = mux.resp2_fallback
        if fallback is not None:
            callback = _get_response_callback(self.response_callbacks, command_name, fallback)
        else:
            callback = self.response_callbacks.get(command_name)
        if callback is None:
            return response
        extra = {k: v for k, v in options.items() if k not in _NOT_FOR_CALLBACKS}
        result = callback(response, **extra)
        return await result if inspect.isawaitable(result) else result

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        if self._mux is not None:
            await self._mux.aclose()
        await super().aclose(close_connection_pool)


async def _no_cleanup(error: BaseException) -> None:
    """The link cleans up after itself; a retry just sends the command again."""
