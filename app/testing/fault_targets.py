"""Standalone, Cluster and Sentinel deployments that fault tests may break.

A ``FaultTarget`` is one topology on 127.0.0.1 whose data nodes (each one a
primary) a test may kill, restart, reconfigure or reach directly
(``node_urls``). With ``proxied=True`` every connection that a client of
``url`` opens to a data node passes through a ``TcpProxy`` (``proxy`` drives
them all at once), where the test injects latency, stalls, cuts and lost
replies:

* standalone: one server; ``url`` names its proxy.
* cluster: three primaries without replicas; each node announces its proxy's
  port (``cluster-announce-port``), so the slot map a client loads, and every
  ``MOVED``, names the proxies. The cluster bus stays direct: a faulty link
  between the app and Redis is not a cluster partition.
* sentinel: one primary without a replica and one sentinel that knows the
  primary by its proxy's address, so clients find every connection through the
  sentinel and it goes through the proxy. Nothing can be promoted: a killed
  primary comes back as itself (promotion is ``tests/integration/topology``'s
  subject).

Readiness is asked of the servers (PING, ``CLUSTER INFO``, ``SENTINEL MASTER``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from redis import Redis as SyncRedis

from app.testing.proxy import TcpProxy
from app.testing.servers import RedisServer, free_cluster_port, free_port
from app.testing.topologies import LocalCluster, LocalSentinel, wait_until

__all__ = ["KINDS", "FaultTarget", "Kind", "Proxies"]

Kind = Literal["standalone", "cluster", "sentinel"]
KINDS: tuple[Kind, ...] = ("standalone", "cluster", "sentinel")


class Proxies:
    """The proxies in front of every data node, driven as one ``TcpProxy``."""

    def __init__(self, members: list[TcpProxy]) -> None:
        self.members = members

    @property
    def latency(self) -> float:
        return max((p.latency for p in self.members), default=0.0)

    @latency.setter
    def latency(self, seconds: float) -> None:
        for p in self.members:
            p.latency = seconds

    @property
    def connections_accepted(self) -> int:
        return sum(p.connections_accepted for p in self.members)

    @property
    def lost(self) -> int:
        """Replies dropped by ``arm`` (over every proxy)."""
        return sum(p.lost for p in self.members)

    def _each(self, fault: Callable[[TcpProxy], object]) -> None:
        for p in self.members:
            fault(p)

    def arm(self, marker: bytes | None) -> None:
        """Lose the reply to the next command containing *marker*, on whichever node runs it."""
        self._each(lambda p: p.arm(marker))

    def stall(self) -> None:
        """Hold all traffic on every proxy; connections stay open."""
        self._each(TcpProxy.stall)

    def resume(self) -> None:
        self._each(TcpProxy.resume)

    def cut(self) -> None:
        """Close every open connection on every proxy."""
        self._each(TcpProxy.cut)

    def reset(self) -> None:
        """No fault any more: traffic flows, no latency, nothing armed, counters at zero."""
        for p in self.members:
            p.resume()
            p.latency, p.refuse, p.lost = 0.0, False, 0
            p.arm(None)

    def close(self) -> None:
        self._each(TcpProxy.close)


class FaultTarget:
    """One topology (``kind``) of primaries only, optionally behind proxies (see module doc)."""

    def __init__(self, kind: Kind, *, proxied: bool = False) -> None:
        self.kind = kind
        self.proxied = proxied
        self.proxy = Proxies([])
        self.nodes: list[RedisServer] = []
        self.url = ""
        self._cluster: LocalCluster | None = None
        self._sentinel: LocalSentinel | None = None

    def start(self, timeout: float = 60.0) -> FaultTarget:
        """Start every process and return once the servers say the topology is ready."""
        try:
            self._start(timeout)
        except BaseException:
            self.cleanup()
            raise
        return self

    def _start(self, timeout: float) -> None:
        ports = [free_cluster_port() for _ in range(3)] if self.kind == "cluster" else [free_port()]
        fronts = {p: TcpProxy("127.0.0.1", p).start() for p in ports} if self.proxied else {}
        self.proxy = Proxies(list(fronts.values()))

        def front(port: int) -> int:
            return fronts[port].port if fronts else port

        if self.kind == "standalone":
            self.nodes = [RedisServer(ports[0]).start()]
            self.url = f"redis://127.0.0.1:{front(ports[0])}/0"
        elif self.kind == "cluster":
            announce = ["--cluster-announce-port", "--cluster-announce-bus-port"]
            self._cluster = LocalCluster(
                3,
                0,
                ports=ports,
                node_args=lambda p: (
                    [announce[0], str(front(p)), announce[1], str(p + 10000)] if fronts else []
                ),
            ).start(timeout)
            self.nodes = list(self._cluster.servers)
            self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{front(p)}" for p in ports)
        else:
            # No replica, and a down-after far beyond any test: the sentinel never
            # declares the primary down during a stall (it talks through the proxy too).
            self._sentinel = LocalSentinel(
                down_after_ms=600_000,
                replica=False,
                sentinels=1,
                primary_port=ports[0],
                monitor_port=front,
            ).start(timeout)
            assert self._sentinel.primary is not None
            self.nodes = [self._sentinel.primary]
            self.url = self._sentinel.url

    def node_urls(self) -> list[str]:
        """Direct URLs of the data nodes (past any proxy): for admin commands."""
        return [n.url for n in self.nodes]

    def ready(self) -> bool:
        """Every node answers; the cluster says ok; the sentinel names a healthy primary."""
        if self._cluster is not None:
            return self._cluster.ready()
        if self._sentinel is not None:
            return self._sentinel.ready()
        with SyncRedis.from_url(self.nodes[0].url, socket_timeout=1) as r:
            return bool(r.ping())

    def wait_ready(self, timeout: float = 60.0) -> None:
        wait_until(f"the {self.kind} fault target to be ready", self.ready, timeout)

    def kill(self) -> None:
        """SIGKILL every data node (a crash of the whole data tier)."""
        for node in self.nodes:
            node.kill()

    def restart(self, timeout: float = 60.0) -> None:
        """Kill every data node and start it again on its port, empty (no persistence).

        Returns once the topology is ready again (a restarted Cluster keeps its
        slots: ``nodes.conf`` survives in the node's directory).
        """
        self.kill()
        for node in self.nodes:
            node.restart()
        self.wait_ready(timeout)

    def reset(self) -> None:
        """Undo what a test did to a shared target: no fault, no data, no scripts, no limit."""
        self.proxy.reset()
        for url in self.node_urls():
            with SyncRedis.from_url(url, socket_timeout=5) as r:
                r.config_set("maxmemory", 0)
                r.flushall()
                r.script_flush()
        self.wait_ready()

    def cleanup(self) -> None:
        """Stop every process this target started (by pid) and its proxies."""
        if self._cluster is not None:
            self._cluster.cleanup()
        elif self._sentinel is not None:
            self._sentinel.cleanup()
        else:
            for node in self.nodes:
                node.cleanup()
        self.nodes = []
        self.proxy.close()
