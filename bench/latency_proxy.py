"""``--latency-ms``: a TCP proxy adding round-trip time, in a process of its own.

Run as ``python -m bench.latency_proxy HOST PORT RTT_MS``: it prints its port,
forwards 127.0.0.1:<port> to HOST:PORT and exits when its standard input
closes (its parent stopped it, or died). Each chunk read in either direction
is stamped and sent half the RTT later by a writer thread, so every round
trip gains the RTT while pipelined traffic keeps flowing.

Why not the test plugin's asyncio ``TcpProxy``: event-loop timers wait at
least a millisecond (epoll's resolution), which turns a 1 ms RTT into 2-3 ms,
and in the benchmark's process its thread would compete with the measured
code for the GIL. Threads sleeping on ``time.sleep`` in another process are
accurate to well under 0.1 ms.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["LatencyProxy"]

ROOT = Path(__file__).resolve().parents[1]


class LatencyProxy:
    """The proxy process; ``close()`` stops it (by its pid if it does not exit)."""

    def __init__(self, host: str, port: int, rtt_ms: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.latency_proxy", host, str(port), str(rtt_ms)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError(f"the latency proxy did not start: {line!r}")
        self.port = int(line)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _pump(source: socket.socket, target: socket.socket, delay: float) -> None:
    """Read from *source*; a writer thread sends each chunk to *target* *delay* s later."""
    pending: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

    def writer() -> None:
        with contextlib.suppress(OSError):
            while True:
                due, data = pending.get()
                if not data:
                    break
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            pending.put((time.perf_counter() + delay, data))
    pending.put((0.0, b""))
    thread.join()


def _serve(client: socket.socket, target: tuple[str, int], delay: float) -> None:
    with client, socket.create_connection(target) as upstream:
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        back = threading.Thread(target=_pump, args=(upstream, client, delay), daemon=True)
        back.start()
        _pump(client, upstream, delay)
        back.join()


def main() -> None:
    host, port, rtt_ms = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    delay = rtt_ms / 2000  # per direction
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)

    def accept() -> None:
        while True:
            client, _ = listener.accept()
            threading.Thread(target=_serve, args=(client, (host, port), delay), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    sys.stdin.read()  # until the parent closes our stdin
    listener.close()


if __name__ == "__main__":
    main()
