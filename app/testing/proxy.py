"""A TCP proxy for fault injection between an app and Redis.

It runs its own event loop in a daemon thread, so it works the same from sync
fixtures and from any test's event loop. Faults apply to live connections:

* ``latency = 0.05``: every chunk waits that long before it is forwarded
  (each direction), so a round trip gains twice the value;
* ``stall()`` / ``resume()``: forwarding stops (bytes are held) while every
  connection stays open — the half-dead link that only timeouts detect;
* ``cut()``: every open connection is closed at once (like a network reset);
* ``refuse = True``: new connections are closed as soon as they arrive;
* ``arm(marker)``: the next command whose bytes contain *marker* (say, a
  script's SHA1) reaches Redis, which runs it, but its reply is dropped and
  that connection closed: a reply lost after the server ran the command (as
  when a reset or ``CLIENT KILL`` lands mid-call). ``lost`` counts them.

``count = True`` makes it parse the client-to-server byte stream and count RESP
requests in ``commands`` (a pipeline of 100 counts 100) and write bursts in
``writes`` (a pipeline counts 1): commands *sent*, unlike server statistics,
which also count what Lua scripts call.

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

__all__ = ["TcpProxy"]


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to *target_host*:*target_port*, with faults on demand."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.latency = 0.0
        self.refuse = False
        self.port = 0
        self.connections_accepted = 0
        self.count = False
        self.commands = 0
        self.writes = 0
        self.lost = 0
        self._armed: bytes | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="tcp-proxy"
        )
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._closing = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def arm(self, marker: bytes | None) -> None:
        """Lose the reply to the next command containing *marker* (None: disarm)."""
        self._armed = marker

    def _call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._start())
        return self

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_accepted += 1
        if self.refuse or self._closing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        except asyncio.CancelledError:  # close() gave up on a connect that hung
            writer.transport.abort()
            raise
        if self._closing:  # close() ran while this connection was being set up
            for w in (writer, up_writer):
                w.transport.abort()
            return
        self._writers.update((writer, up_writer))
        doomed = asyncio.Event()  # set once this connection carried the armed command
        await asyncio.gather(
            self._pipe(reader, up_writer, _RespCounter(self), doomed),
            self._pipe(up_reader, writer, None, doomed),
            return_exceptions=True,
        )
        for w in (writer, up_writer):
            self._writers.discard(w)
            if self._closing:
                w.transport.abort()  # close() would wait for the peer to take the buffered bytes
            else:
                w.close()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        counter: _RespCounter | None,
        doomed: asyncio.Event,
    ) -> None:
        assert self._flowing is not None
        try:
            while data := await reader.read(65536):
                upstream = counter is not None
                if upstream and self._armed is not None and self._armed in data:
                    self._armed = None
                    doomed.set()
                elif not upstream and doomed.is_set():
                    # One command in flight per connection: this is the armed one's reply.
                    self.lost += 1
                    writer.transport.abort()  # the client sees its connection reset
                    break
                if counter is not None and self.count:
                    counter.feed(data)
                if self.latency:
                    await asyncio.sleep(self.latency)
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def stall(self) -> None:
        """Hold all traffic; connections stay open."""
        self._loop.call_soon_threadsafe(self._flowing.clear)  # type: ignore[union-attr]

    def resume(self) -> None:
        self._loop.call_soon_threadsafe(self._flowing.set)  # type: ignore[union-attr]

    def cut(self) -> None:
        """Close every open connection now (new ones are still accepted)."""

        async def _cut() -> None:
            for w in list(self._writers):
                transport = w.transport
                if transport is not None:
                    transport.abort()
            self._writers.clear()

        self._call(_cut())

    @staticmethod
    async def _settle(deadline: float) -> None:
        """Wait until no other task runs on this loop; cancel what still runs at *deadline*.

        Not only the handlers seen so far: a connection accepted just before the
        server closed is still being set up (a task asyncio made), and its handler
        task starts only after that one ends, so this waits until none is left.
        """
        loop = asyncio.get_running_loop()
        while others := asyncio.all_tasks() - {asyncio.current_task()}:
            left = deadline - loop.time()
            if left <= 0:
                for task in others:
                    task.cancel()
                await asyncio.wait(others, timeout=5)
                return
            await asyncio.wait(others, timeout=left)

    def close(self) -> None:
        """Stop accepting, reset every connection and stop the thread; no socket is left open.

        A connection still being set up when this runs is reset by its handler
        (``_closing``); handlers that do not finish in time are cancelled, and
        the loop runs once more so every aborted transport closes its socket.
        """

        async def _close() -> None:
            self._closing = True
            loop = asyncio.get_running_loop()
            if self._server is not None:
                # Stop accepting first and close the server only once every accepted
                # connection is set up: closing it while asyncio still sets one up
                # leaves that socket open (the setup fails and never closes it).
                for sock in self._server.sockets:
                    loop.remove_reader(sock.fileno())
            for w in list(self._writers):
                if w.transport is not None:
                    w.transport.abort()
            if self._flowing is not None:
                self._flowing.set()
            await self._settle(deadline=loop.time() + 2)
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            await asyncio.sleep(0)  # the aborts' connection_lost callbacks close the sockets

        if self._thread.is_alive():
            self._call(_close(), timeout=15)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class _RespCounter:
    """Counts complete RESP requests (arrays of bulk strings, or inline lines) in a byte stream."""

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        self.proxy.writes += 1
        self.buf += data
        pos = 0
        while (end := self._request_end(pos)) is not None:
            self.proxy.commands += 1
            pos = end
        del self.buf[:pos]

    def _request_end(self, pos: int) -> int | None:
        buf = self.buf
        line_end = buf.find(b"\r\n", pos)
        if line_end == -1:
            return None
        if buf[pos : pos + 1] != b"*":  # inline command
            return line_end + 2
        count = int(buf[pos + 1 : line_end])
        pos = line_end + 2
        for _ in range(count):
            line_end = buf.find(b"\r\n", pos)
            if line_end == -1:
                return None
            length = int(buf[pos + 1 : line_end])
            pos = line_end + 2 + length + 2
            if pos > len(buf):
                return None
        return pos
