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
from collections.abc import Callable, Sequence

from redis import Redis as SyncRedis
from redis.exceptions import RedisError

from app.testing.servers import RedisServer, free_cluster_port

__all__ = ["LocalCluster", "LocalSentinel", "topology_binaries_missing", "wait_until"]

SERVICE = "mymaster"


def topology_binaries_missing() -> str | None:
    """Why clusters/sentinels cannot be started here, or None when they can."""
    missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    return f"{' and '.join(missing)} not on PATH" if missing else None


def wait_until(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    """Ask *check* every 0.1 s until it is true (a Redis or socket error means "not yet").

    Raises ``TimeoutError`` naming *what* after *timeout* seconds. Synchronous:
    for fixtures and threads that wait on servers.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _info_field(port: int, section: str, field: str) -> str | None:
    with SyncRedis(port=port, socket_timeout=1) as r:
        value = r.info(section).get(field)
        return None if value is None else str(value)


class LocalCluster:
    """A Redis Cluster on 127.0.0.1 (default 3 primaries x 1 replica)."""

    def __init__(
        self,
        primaries: int = 3,
        replicas: int = 1,
        *,
        ports: Sequence[int] = (),
        node_args: Callable[[int], Sequence[str]] = lambda port: (),
    ) -> None:
        """*ports*: the nodes' ports (default: free ones); *node_args(port)*: more
        ``redis-server`` arguments for the node on *port* (e.g. ``cluster-announce-port``)."""
        self.size = primaries * (1 + replicas)
        self.replicas = replicas
        self.servers: list[RedisServer] = []
        self._ports = list(ports)
        self._node_args = node_args

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(s.address for s in self.servers[:3])

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    def start(self, timeout: float = 60.0) -> LocalCluster:
        try:
            ports = self._ports or [free_cluster_port() for _ in range(self.size)]
            for port in ports:
                server = RedisServer(
                    port,
                    extra_args=[
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", "2000",
                        *self._node_args(port),
                    ]
                )  # fmt: skip
                self.servers.append(server.start())
            subprocess.run(
                ["redis-cli", "--cluster", "create", *(s.address for s in self.servers),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                check=True, capture_output=True, timeout=timeout,
            )  # fmt: skip
            wait_until("cluster_state:ok on every node", self._healthy, timeout)
        except BaseException:
            self.cleanup()
            raise
        return self

    def ready(self) -> bool:
        """Every node says ``cluster_state:ok`` and knows every other node."""
        return self._healthy()

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

    def __init__(
        self,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 2000,
        *,
        replica: bool = True,
        sentinels: int = 3,
        primary_port: int | None = None,
        monitor_port: Callable[[int], int] = lambda port: port,
    ) -> None:
        """*replica*: start a replica (without one nothing can be promoted);
        *monitor_port(primary port)*: the port the sentinels know the primary by
        (a proxy in front of it, say): clients asking them get that address."""
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.with_replica = replica
        self.sentinel_count = sentinels
        self.primary_port = primary_port
        self.monitor_port = monitor_port
        self.primary: RedisServer | None = None
        self.replica: RedisServer | None = None
        self.sentinels: list[RedisServer] = []

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(s.address for s in self.sentinels) + f"/{SERVICE}/0"

    def start(self, timeout: float = 30.0) -> LocalSentinel:
        try:
            fast_sync = ["--repl-diskless-sync-delay", "0"]  # a rejoining replica syncs at once
            self.primary = RedisServer(self.primary_port, extra_args=fast_sync).start()
            if self.with_replica:
                replica = self.replica = RedisServer(
                    extra_args=[*fast_sync, "--replicaof", "127.0.0.1", str(self.primary.port)]
                ).start()
                wait_until(
                    "the replica to sync",
                    lambda: _info_field(replica.port, "replication", "master_link_status") == "up",
                    timeout,
                )
            monitored, quorum = self.monitor_port(self.primary.port), min(2, self.sentinel_count)
            conf = (
                f"sentinel monitor {SERVICE} 127.0.0.1 {monitored} {quorum}\n"
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            for _ in range(self.sentinel_count):
                self.sentinels.append(RedisServer(config_text=conf, sentinel=True).start())
            wait_until(
                "sentinels to see each other and the replica", self._sentinels_ready, timeout
            )
        except BaseException:
            self.cleanup()
            raise
        return self

    def ready(self) -> bool:
        """Every sentinel knows the others, the replica (if any), and a primary it deems up."""
        return self._sentinels_ready()

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
                    int(fields.get("num-other-sentinels", 0)) < self.sentinel_count - 1
                    or int(fields.get("num-slaves", 0)) < int(self.with_replica)
                    or fields.get("flags") != "master"
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
        wait_until(
            "the sentinels to promote the replica",
            lambda: self.master_address()[1] != old.port,
            timeout,
        )
        new = self.current_primary()
        wait_until("the new primary to accept writes",
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
