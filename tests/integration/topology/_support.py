"""Moved: the topology helpers live in ``app.testing.clients`` (with ``topology_client``).

Re-exported here for imports written before the move; new tests import
``app.testing.clients``.
"""

from __future__ import annotations

from app.testing.clients import ON_TOPOLOGIES, ready, topology_url, twin

__all__ = ["ON_TOPOLOGIES", "ready", "topology_url", "twin"]
