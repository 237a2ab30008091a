"""Real Redis Cluster and Sentinel setups built from ``redis-server`` processes.

``LocalCluster``: ``primaries`` primaries, each with ``replicas`` replicas, on
free ports, joined by ``redis-cli --cluster create``; ready when every node
reports ``cluster_state:ok`` and knows every other node.

``LocalSentinel``: one primary, one replica and three sentinels monitoring
``mymaster`` with a quorum of 2 and a 1 s down-after, so a killed primary is
replaced in a few seconds.

Both are synchronous (usable from session fixtures) and stop only the
processes they started.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable

from redis import Redis as SyncRedis
from redis.exceptions import RedisError

from app.testing.servers import RedisServer, free_cluster_port

__all__ = ["LocalCluster", "LocalSentinel", "topology_binaries_missing"]

SERVICE = "mymaster"


def topology_binaries_missing() -> str | None:
    """Why clusters/sentinels cannot be started here, or None when they can."""
    missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    return f"{' and '.join(missing)} not on PATH" if missing else None


def _wait(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (RedisError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _info_field(port: int, section: str, field: str) -> str | None:
    with SyncRedis(port=port, socket_timeout=1) as r:
        value = r.info(section).get(field)
        return None if value is None else str(value)


class LocalCluster:
    """A Redis Cluster on 127.0.0.1 (default 3 primaries x 1 replica)."""

    def __init__(self, primaries: int = 3, replicas: int = 1) -> None:
        self.size = primaries * (1 + replicas)
        self.replicas = replicas
        self.servers: list[RedisServer] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(s.address for s in self.servers[:3])

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    def start(self, timeout: float = 60.0) -> LocalCluster:
        try:
            for _ in range(self.size):
                server = RedisServer(
                    free_cluster_port(),
                    extra_args=[
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", "2000",
                    ]
                )  # fmt: skip
                self.servers.append(server.start())
            subprocess.run(
                ["redis-cli", "--cluster", "create", *(s.address for s in self.servers),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                check=True, capture_output=True, timeout=timeout,
            )  # fmt: skip
            _wait("cluster_state:ok on every node", self._healthy, timeout)
        except BaseException:
            self.cleanup()
            raise
        return self

    def _healthy(self) -> bool:
        for s in self.servers:
            with SyncRedis(port=s.port, socket_timeout=1) as r:
                info = r.cluster("INFO")  # parsed into a dict by redis-py
                if info.get("cluster_state") != "ok":
                    return False
                if int(info.get("cluster_known_nodes", 0)) != self.size:
                    return False
        return True

    def primary_ports(self) -> list[int]:
        ports = []
        for s in self.servers:
            if _info_field(s.port, "replication", "role") == "master":
                ports.append(s.port)
        return ports

    def flushall(self) -> None:
        for port in self.primary_ports():
            with SyncRedis(port=port, socket_timeout=2) as r:
                r.flushall()
                r.script_flush()

    def cleanup(self) -> None:
        for s in self.servers:
            s.cleanup()
        self.servers.clear()


class LocalSentinel:
    """One primary, one replica and three sentinels watching ``mymaster``."""

    def __init__(self, down_after_ms: int = 1000, failover_timeout_ms: int = 2000) -> None:
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.primary: RedisServer | None = None
        self.replica: RedisServer | None = None
        self.sentinels: list[RedisServer] = []

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(s.address for s in self.sentinels) + f"/{SERVICE}/0"

    def start(self, timeout: float = 30.0) -> LocalSentinel:
        try:
            fast_sync = ["--repl-diskless-sync-delay", "0"]  # a rejoining replica syncs at once
            self.primary = RedisServer(extra_args=fast_sync).start()
            self.replica = RedisServer(
                extra_args=[*fast_sync, "--replicaof", "127.0.0.1", str(self.primary.port)]
            ).start()
            _wait(
                "the replica to sync",
                lambda: _info_field(self.replica.port, "replication", "master_link_status") == "up",  # type: ignore[union-attr]
                timeout,
            )
            conf = (
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            for _ in range(3):
                self.sentinels.append(RedisServer(config_text=conf, sentinel=True).start())
            _wait("sentinels to see each other and the replica", self._sentinels_ready, timeout)
        except BaseException:
            self.cleanup()
            raise
        return self

    def _sentinels_ready(self) -> bool:
        for s in self.sentinels:
            with SyncRedis(port=s.port, socket_timeout=1) as r:
                reply = r.execute_command("SENTINEL", "MASTER", SERVICE)
                pairs = (
                    reply
                    if isinstance(reply, dict)
                    else dict(zip(reply[::2], reply[1::2], strict=False))
                )
                fields = {_text(k): _text(v) for k, v in pairs.items()}
                if (
                    int(fields.get("num-other-sentinels", 0)) < 2
                    or int(fields.get("num-slaves", 0)) < 1
                ):
                    return False
        return True

    def master_address(self) -> tuple[str, int]:
        """The primary the sentinels currently name."""
        with SyncRedis(port=self.sentinels[0].port, socket_timeout=1) as r:
            host, port = r.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
            return (host.decode() if isinstance(host, bytes) else host), int(port)

    def current_primary(self) -> RedisServer:
        _, port = self.master_address()
        for s in (self.primary, self.replica):
            if s is not None and s.port == port:
                return s
        raise RuntimeError(f"sentinels name an unknown primary on port {port}")

    def kill_primary_and_wait_for_failover(self, timeout: float = 30.0) -> RedisServer:
        """SIGKILL the current primary; return the replica once sentinels promote it."""
        old = self.current_primary()
        old.kill()
        _wait(
            "the sentinels to promote the replica",
            lambda: self.master_address()[1] != old.port,
            timeout,
        )
        new = self.current_primary()
        _wait("the new primary to accept writes",
              lambda: _info_field(new.port, "replication", "role") == "master", timeout)  # fmt: skip
        return new

    def flushall(self) -> None:
        _, port = self.master_address()
        with SyncRedis(port=port, socket_timeout=2) as r:
            r.flushall()
            r.script_flush()

    def cleanup(self) -> None:
        for s in [*self.sentinels, self.replica, self.primary]:
            if s is not None:
                s.cleanup()
        self.sentinels.clear()
