"""The client address of a request, through the trusted-proxy rules.

``ClientIP(trusted_proxies)`` answers the TCP peer, or, when the peer is one
of *your* proxies, the first untrusted hop of ``X-Forwarded-For`` read right
to left. Shared by rate limiting (``app.middleware.rate_limit`` re-exports it)
and by the caller identity (``app.http.caller``) for anonymous callers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.requests import HTTPConnection
from starlette.types import Scope

from app.core.errors import ConfigurationError
from app.core.memo import BoundedMemo

__all__ = ["ClientIP", "parse_ip"]

_PEERS_MAX = 4096  # peers whose answer is remembered (all forgotten when full)


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address from a peer or forwarding hop (``v4:port``, ``[v6]:port``), or None."""
    text = text.strip().strip('"')
    if text.startswith("["):  # [v6]:port
        text = text[1 : text.find("]")] if "]" in text else text
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class ClientIP:
    """The client's IP address as ``"ip:<address>"``.

    Args:
        trusted_proxies: CIDRs of *your* reverse proxies / load balancers.
            With none (the default), the TCP peer is the client and
            ``X-Forwarded-For`` is ignored.
        header: the forwarding header (default ``X-Forwarded-For``).
        ipv6_prefix: IPv6 clients are keyed by this network prefix (default
            /64: one subscriber usually holds a whole /64).

    When the peer is a trusted proxy, the header's hops are read right to
    left, skipping trusted proxies; the first untrusted hop is the client.
    Entries left of it are whatever the client sent and are never read, so
    spoofing the header gains nothing. An unparseable hop stops the walk at
    the last trusted address.
    """

    __slots__ = ("_header", "_networks", "_peers", "_prefix")

    def __init__(
        self,
        trusted_proxies: Iterable[str] = (),
        *,
        header: str = "x-forwarded-for",
        ipv6_prefix: int = 64,
    ) -> None:
        self._networks = tuple(ipaddress.ip_network(c, strict=False) for c in trusted_proxies)
        self._header = header.lower().encode("latin-1")
        if not 1 <= ipv6_prefix <= 128:
            raise ConfigurationError("ipv6_prefix must be between 1 and 128")
        self._prefix = ipv6_prefix
        # peer -> its answer, for peers that are not trusted proxies (the answer then
        # depends on the peer alone): parsing and formatting an address costs more than
        # the rest of a lookup. Bounded, so many peers only churn it.
        self._peers: BoundedMemo[str, str] = BoundedMemo(_PEERS_MAX)

    def _trusted(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(address in network for network in self._networks)

    def _format(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
        if isinstance(address, ipaddress.IPv6Address) and self._prefix < 128:
            return str(ipaddress.IPv6Network((address, self._prefix), strict=False))
        return str(address)

    def address(self, scope: Scope) -> str | None:
        """The client address of an ASGI *scope*, or None when the server gave no peer."""
        client = scope.get("client")
        if not client:
            return None
        peer = str(client[0])
        known = self._peers.get(peer)
        if known is not None:
            return known
        address = parse_ip(peer)
        if address is None:
            return peer  # a unix socket or a test transport: its name is all there is
        if not self._networks or not self._trusted(address):
            return self._peers.put(peer, self._format(address))
        hops = [
            hop
            for name, value in scope.get("headers", ())
            if name == self._header
            for hop in value.decode("latin-1").split(",")
        ]
        for hop in reversed(hops):
            parsed = parse_ip(hop)
            if parsed is None:
                break
            address = parsed
            if not self._trusted(parsed):
                break
        return self._format(address)

    def __call__(self, conn: HTTPConnection) -> str | None:
        address = self.address(conn.scope)
        return None if address is None else "ip:" + address
