"""Which connection a channel lives on: one main link, or on a Cluster with sharded
pub/sub one link per primary (by hash slot), rerouted when the topology changes."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING, Any

from redis.crc import key_slot

from app.services.pubsub._link import ConnectionFactory, _dedicated, _Link
from app.services.pubsub._wire import _SHARD, _Key

if TYPE_CHECKING:
    from app.services.pubsub._broadcaster import Broadcaster

log = logging.getLogger("app.pubsub")


class _Router:
    """The links of one broadcaster (by name: ``"main"`` or a Cluster node's name)."""

    def __init__(self, owner: Broadcaster) -> None:
        self.owner = owner
        self.links: dict[str, _Link] = {}
        self._cluster_lock: asyncio.Lock | None = None
        self.background: set[asyncio.Task[Any]] = set()

    def main_link(self) -> _Link:
        link = self.links.get("main")
        if link is None:
            link = self.links["main"] = _Link(self.owner, "main", self._main_factory())
        return link

    def _main_factory(self) -> ConnectionFactory:
        client: Any = self.owner.client
        if self.owner._cluster:

            def from_cluster() -> Any:
                node = random.choice(client.get_primaries() or [client.get_default_node()])
                return _dedicated(node.connection_class, node.connection_kwargs)

            return from_cluster
        pool = client.connection_pool
        return lambda: _dedicated(pool.connection_class, pool.connection_kwargs)

    def link_for(self, key: _Key) -> _Link:
        if key[0] != _SHARD:
            return self.main_link()
        client: Any = self.owner.client
        node = client.nodes_manager.get_node_from_slot(key_slot(key[1]))
        link = self.links.get(node.name)
        if link is None:
            link = self.links[node.name] = _Link(
                self.owner,
                node.name,
                lambda: _dedicated(node.connection_class, node.connection_kwargs),
            )
        return link

    async def ensure_cluster(self) -> None:
        client: Any = self.owner.client
        if not client.nodes_manager.slots_cache:
            await client.initialize()

    async def before_reconnect(self, link: _Link) -> None:
        """A link failed: on a Cluster, refresh the topology and move shard channels."""
        if not self.owner._cluster:
            return
        try:
            await self._refresh_cluster()
        except Exception as exc:
            self.owner._record_error(f"cluster topology refresh failed: {exc}")
            log.warning("pub/sub: cluster topology refresh failed: %s", exc)

    def server_unsubscribed(self, link: _Link, key: _Key) -> None:
        log.warning(
            "pub/sub: the server dropped %r on %s (slot moved?); rerouting",
            self.owner._logical(key[1]),
            link.name,
        )
        if self.owner._cluster:
            self._spawn(self.before_reconnect(link))
        else:  # standalone: subscribe again on the same link
            link._dirty.add(key)
            link._wake.set()

    async def _refresh_cluster(self) -> None:
        if self._cluster_lock is None:
            self._cluster_lock = asyncio.Lock()
        async with self._cluster_lock:
            client: Any = self.owner.client
            await client.nodes_manager.initialize()
            if not self.owner.sharded:
                return
            self._move_shard_topics()
            primaries = {n.name for n in client.get_primaries()}
            for name, link in list(self.links.items()):
                if name != "main" and not link.topics and name not in primaries:
                    del self.links[name]
                    self._spawn(link.stop())

    def _move_shard_topics(self) -> None:
        """Put every shard channel on the link of the node that now serves its slot."""
        now = asyncio.get_running_loop().time()
        for topic in list(self.owner._topics.values()):
            if topic.key[0] != _SHARD:
                continue
            target = self.link_for(topic.key)
            if target is topic.link:
                if topic.key not in target._sent:
                    target._dirty.add(topic.key)
                    target._wake.set()
                continue
            old = topic.link
            old.mark_lost(topic, now, old.last_alive or now)
            old.remove(topic)
            topic.link = target
            target.add(topic)
            if topic.lost_at is not None:
                target._recovering.add(topic)
            target.start()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def aclose(self) -> None:
        """Stop every link and background task (the broadcaster is closing)."""
        for link in list(self.links.values()):
            await link.stop()
        for task in list(self.background):
            task.cancel()
        self.links.clear()
