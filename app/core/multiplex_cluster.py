"""Auto-pipelining on Redis Cluster: a multiplexed set of links per node.

``ClusterMultiplexing`` is mixed into the toolkit's ``RedisCluster``. redis-py
keeps doing everything cluster-shaped: it computes the slot, picks the node,
follows ``MOVED`` (refreshing its slot map) and ``ASK``, refreshes the topology
after connection errors and retries. Only the *first* attempt of a stateless
command (see ``app.core.multiplex.goes_to_pool``) leaves over the chosen node's
links (``NodeMultiplexer``, one per node, opened on demand); a redirected
attempt (``MOVED``/``ASK``, rare: during resharding or failover) runs on that
node's ordinary pooled connections, where redis-py sends ``ASKING`` and the
command itself. ``MOVED``/``ASK``/``TRYAGAIN``/``CLUSTERDOWN`` replies read on
a link raise the same exceptions as on a pooled connection, so the redirect
logic above sees no difference.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from redis import exceptions as redis_exc
from redis.client import EMPTY_RESPONSE, NEVER_DECODE

from app.core.multiplex import NodeMultiplexer, goes_to_pool

__all__ = ["ClusterMultiplexing"]


class _NodeConnections:
    """What a ``NodeMultiplexer`` needs of a pool, for one cluster node: new connections."""

    def __init__(self, node: Any) -> None:
        self.node = node

    def make_connection(self) -> Any:
        return self.node.connection_class(**self.node.connection_kwargs)


class _MultiplexedNode:
    """Stands for a ``ClusterNode`` during one command, which it sends over the node's links.

    Every other attribute (name, host, port, the pooled connections) is the node's.
    """

    __slots__ = ("_mux", "_node")

    def __init__(self, node: Any, mux: NodeMultiplexer) -> None:
        self._node = node
        self._mux = mux

    def __getattr__(self, name: str) -> Any:
        return getattr(self._node, name)

    async def execute_command(self, *args: Any, asking: bool = False, **kwargs: Any) -> Any:
        if asking:  # HIMPORT's ASK path: redis-py folds ASKING into a pooled connection's write
            return await self._node.execute_command(*args, asking=asking, **kwargs)
        try:
            response = await self._mux.request(args, NEVER_DECODE in kwargs)
        except redis_exc.ResponseError:
            if EMPTY_RESPONSE in kwargs:
                return kwargs[EMPTY_RESPONSE]
            raise
        command = args[0]
        if NEVER_DECODE in kwargs and command == "INFO":
            from redis._parsers.helpers import decode_info

            response = decode_info(response, self._node.get_encoder())  # type: ignore[no-untyped-call]
        fallback = self._mux.resp2_fallback
        if fallback is not None:
            from redis._parsers.response_callbacks import _get_response_callback

            callback = _get_response_callback(self._node.response_callbacks, command, fallback)
        else:
            callback = self._node.response_callbacks.get(command)
        if callback is None:
            return response
        extra = {k: v for k, v in kwargs.items() if k not in (NEVER_DECODE, EMPTY_RESPONSE, "keys")}
        return callback(response, **extra)


def _idle_suspect(node: Any) -> Callable[[redis_exc.ConnectionError], None]:
    """What to do when the server closes one of *node*'s links: distrust its idle connections.

    redis-py's ``ClusterNode`` hands out a free pooled connection without checking that it
    is alive, and marks the free ones for reconnect only when a command fails on one of
    them. With the links carrying nearly every command, the pooled connections can sit
    dead for long after a restart or a ``CLIENT KILL``, and the next pipeline would take
    one after another of them. Marking them here (lazily: each reconnects when next
    checked out) is what redis-py itself does after a connection error.
    """

    def mark(error: redis_exc.ConnectionError) -> None:
        for connection in tuple(node._free):  # what redis-py does after a connection error
            connection.mark_for_reconnect()

    return mark


class ClusterMultiplexing:
    """Mixin for ``RedisCluster``: stateless commands go over per-node links (see module)."""

    _mux_options: dict[str, Any] | None = None
    _node_muxes: dict[str, NodeMultiplexer]

    def enable_multiplexing(
        self, *, links: int = 2, max_in_flight: int = 1024, slot_timeout: float | None = 5.0
    ) -> None:
        """Route stateless commands over *links* shared connections per node."""
        self._mux_options = {
            "links": links,
            "max_in_flight": max_in_flight,
            "slot_timeout": slot_timeout,
        }
        self._node_muxes = {}

    @property
    def multiplexers(self) -> dict[str, NodeMultiplexer]:
        """The multiplexed path of each node used so far, by node name (empty when off)."""
        return dict(getattr(self, "_node_muxes", {}))

    async def _execute_command(self, target_node: Any, *args: Any, **kwargs: Any) -> Any:
        parent: Any = super()
        options = self._mux_options
        if options is None or goes_to_pool(args):
            return await parent._execute_command(target_node, *args, **kwargs)
        mux = self._node_muxes.get(target_node.name)
        if mux is None:
            pool: Any = _NodeConnections(target_node)
            mux = NodeMultiplexer(pool, on_server_close=_idle_suspect(target_node), **options)
            self._node_muxes[target_node.name] = mux
        return await parent._execute_command(_MultiplexedNode(target_node, mux), *args, **kwargs)

    async def aclose(self, *args: Any, **kwargs: Any) -> None:
        muxes = list(getattr(self, "_node_muxes", {}).values())
        self._node_muxes = {}
        await asyncio.gather(*(mux.aclose() for mux in muxes), return_exceptions=True)
        parent: Any = super()
        await parent.aclose(*args, **kwargs)
