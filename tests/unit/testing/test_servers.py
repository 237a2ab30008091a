"""Test-server ports: each worker's block, and no port handed out twice before it is bound."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from app.testing.servers import free_cluster_port, free_port


@pytest.mark.parametrize("pick", [free_port, free_cluster_port], ids=["plain", "cluster"])
def test_ports_picked_before_any_server_binds_them_are_all_different(
    pick: Callable[[], int],
) -> None:
    """A Cluster picks its six ports before it starts a node: a repeat made a node fail to
    start. 64 picks in a row (a block of 250 would repeat one almost surely) never repeat."""
    ports = [pick() for _ in range(64)]
    assert len(set(ports)) == 64


def test_cluster_ports_leave_room_for_their_bus_port_below_the_ephemeral_range() -> None:
    for _ in range(20):
        port = free_cluster_port()
        assert 20000 <= port < 22500 and port + 10000 < 32768
