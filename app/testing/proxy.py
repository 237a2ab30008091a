"""A TCP proxy for fault injection between an app and Redis.

It runs its own event loop in a daemon thread, so it works the same from sync
fixtures and from any test's event loop. Faults apply to live connections:

* ``latency = 0.05``: every chunk waits that long before it is forwarded
  (each direction), so a round trip gains twice the value;
* ``stall()`` / ``resume()``: forwarding stops (bytes are held) while every
  connection stays open — the half-dead link that only timeouts detect;
* ``cut()``: every open connection is closed at once (like a network reset);
* ``refuse = True``: new connections are closed as soon as they arrive.

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
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="tcp-proxy"
        )
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

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
        if self.refuse:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while data := await reader.read(65536):
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

    def close(self) -> None:
        async def _close() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                if w.transport is not None:
                    w.transport.abort()
            if self._flowing is not None:
                self._flowing.set()

        if self._thread.is_alive():
            self._call(_close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
