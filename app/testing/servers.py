"""Real ``redis-server`` processes for tests: start on a free port, stop by pid.

``RedisServer`` runs one server in its own temporary directory, with no
persistence, bound to 127.0.0.1. It can be stopped, SIGKILLed, paused and
restarted on the same port, which is what fault-injection tests need. Only
processes started here are ever signalled.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

__all__ = [
    "PORT_SALT_ENV",
    "RedisServer",
    "free_cluster_port",
    "free_port",
    "ping",
    "redis_server_binary",
    "serve_app",
    "server_pid",
]


def redis_server_binary() -> str | None:
    """Path of ``redis-server`` on PATH, or None."""
    return shutil.which("redis-server")


# Port blocks: pytest-xdist workers (``PYTEST_XDIST_WORKER=gw<n>``) draw from blocks of
# their own, so two workers never start servers on the same port, and a worker's ping
# can never reach another worker's server. The blocks sit below the kernel's ephemeral
# range (32768+), where outgoing connections take their local ports.
_BLOCKS = 10
_PLAIN = (10000, 1000)  # plain servers, sentinels: 10 blocks of 1000 in 10000-19999
# Cluster nodes: 10 blocks of 250 in 20000-22499, so that their bus ports (+10000,
# 30000-32499) stay below the ephemeral range too; an outgoing connection holding a
# bus port made a node fail to start ("bind: Address already in use").
_CLUSTER = (20000, 250)


PORT_SALT_ENV = "REDIS_TEST_PORT_SALT"
"""Set once per test session (the plugin does, before xdist starts its workers, which
inherit it): two sessions on one machine then mostly draw from different blocks."""


def _worker_block() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    digits = worker.removeprefix("gw")
    index = int(digits) if digits.isdigit() else 0
    salt = os.environ.get(PORT_SALT_ENV, "0")
    return (index + (int(salt) if salt.isdigit() else 0)) % _BLOCKS


_handed_out: collections.deque[int] = collections.deque(maxlen=64)
"""Ports given out lately. A port is only checked free when it is picked, and a caller
may pick several before starting any (a Cluster picks its six nodes' ports first): without
this, two picks could draw the same still-unbound port, and the second node's server
would fail to start with "Address already in use"."""


def _free_in_block(area: tuple[int, int], *, with_bus: bool = False) -> int:
    base, size = area
    start = base + _worker_block() * size
    for _ in range(1000):
        port = random.randrange(start, start + size)
        if port in _handed_out:
            continue
        if _bindable(port) and (not with_bus or _bindable(port + 10000)):
            _handed_out.append(port)
            return port
    raise RuntimeError(f"no free port in {start}-{start + size - 1}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (in this worker's block)."""
    return _free_in_block(_PLAIN)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too (in this worker's block)."""
    return _free_in_block(_CLUSTER, with_bus=True)


def server_pid(host: str, port: int, timeout: float = 0.5) -> int | None:
    """The ``process_id`` that ``INFO server`` reports at host:port (None if none answers)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"INFO server\r\n")
            reply = sock.recv(65536)
            if not reply.startswith(b"$"):
                return None
            header, _, body = reply.partition(b"\r\n")
            while len(body) < int(header[1:]):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                body += chunk
    except (OSError, ValueError):
        return None
    for line in body.split(b"\r\n"):
        if line.startswith(b"process_id:"):
            return int(line.split(b":", 1)[1])
    return None


def ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a Redis server answers PING at host:port (plain socket, no event loop)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` child process on 127.0.0.1.

    Args:
        port: port to use (default: a free one, kept across restarts).
        extra_args: more ``redis-server`` arguments, e.g. ``["--maxmemory", "1mb"]``.
        binary: the executable (default: ``redis-server`` from PATH).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
        host: str = "127.0.0.1",
        config_text: str | None = None,
        sentinel: bool = False,
    ) -> None:
        found = binary or redis_server_binary()
        if found is None:
            raise FileNotFoundError("redis-server is not on PATH")
        self.binary = found
        self.host = host
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self._dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.sentinel = sentinel
        self.config_path: Path | None = None
        if config_text is not None:  # redis-server takes a config file only as its first argument
            self.config_path = self._dir / ("sentinel.conf" if sentinel else "redis.conf")
            self.config_path.write_text(config_text)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def log_path(self) -> Path:
        return self._dir / "redis.log"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        args = [self.binary]
        if self.config_path is not None:
            args.append(str(self.config_path))
        args += ["--port", str(self.port), "--bind", self.host, "--dir", str(self._dir)]
        args += ["--logfile", str(self.log_path), "--protected-mode", "no"]
        if self.sentinel:
            args.append("--sentinel")
        else:
            args += ["--save", "", "--appendonly", "no"]
        args += self.extra_args
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(
                    f"redis-server exited at start on port {self.port}: {err}{self._log_tail()}"
                )
            # Only our own process counts: another server on the port (one being restarted
            # and still exiting, or another session's) is never handed to a test; ours then
            # either binds once the port is free or exits, which is reported above.
            if ping(self.host, self.port) and server_pid(self.host, self.port) in (
                self.proc.pid,
                None,
            ):
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout}s")

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n" + "\n".join(self.log_path.read_text().splitlines()[-5:])
        return ""

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after *timeout*; waits for the process to exit."""
        if self.proc is None:
            return
        self._signal(signal.SIGCONT)  # a paused server cannot handle SIGTERM
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait(timeout)
        self._close_pipes()

    def kill(self) -> None:
        """SIGKILL (a crash: no shutdown work)."""
        if self.proc is None:
            return
        self._signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._close_pipes()

    def pause(self) -> None:
        """SIGSTOP: the server holds its connections open but answers nothing."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def restart(self, *, kill: bool = True, timeout: float = 10.0) -> None:
        """Kill (or stop) and start again on the same port: all data and scripts are gone."""
        self.kill() if kill else self.stop()
        deadline = time.monotonic() + timeout
        while True:  # the port can linger briefly after a kill
            try:
                self.start(timeout=timeout)
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _close_pipes(self) -> None:
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def cleanup(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


@contextlib.contextmanager
def serve_app(
    app: str = "app.main:app",
    *,
    env: Mapping[str, str] | None = None,
    drop_env: Sequence[str] = ("REDIS_URL",),
    ready_path: str = "/healthz",
    timeout: float = 60.0,
) -> Iterator[str]:
    """Run *app* under uvicorn in a subprocess on a free port; yield its base URL.

    The child gets this process's environment without the variables named in
    *drop_env* (or starting with a name there that ends in ``_``), plus *env*.
    The URL is yielded once ``GET ready_path`` answers at all (any status): the
    app's lifespan has run. Fails with the tail of uvicorn's output if it exits
    or does not answer within *timeout* seconds (a hang bound for a loaded
    machine, not a speed claim). The process is terminated on exit.
    """
    port = free_port()
    child = {
        k: v
        for k, v in os.environ.items()
        if not any(k == d or (d.endswith("_") and k.startswith(d)) for d in drop_env)
    }
    child.update(env or {})
    log = tempfile.NamedTemporaryFile(prefix="uvicorn-", suffix=".log", delete=False)  # noqa: SIM115
    command = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        [*command, "--log-level", "warning"], env=child, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"

    def tail() -> str:
        return Path(log.name).read_text(errors="replace")[-3000:]

    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"uvicorn {app} exited with {proc.returncode}:\n{tail()}")
            try:
                with urllib.request.urlopen(base + ready_path, timeout=1):
                    break
            except urllib.error.HTTPError:
                break  # it answered: the app is up, whatever the status
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"uvicorn {app} did not answer {ready_path} within {timeout:g} s:\n{tail()}"
                    ) from None
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        Path(log.name).unlink(missing_ok=True)
