"""The default services of each client: one ``CacheService`` per namespace, kept on the client.

``get_cache`` and ``set_default_cache`` fill it; a service's ``aclose`` leaves
it. ``version`` is bumped on every change, so ``@cached`` can memoize the
service it resolved and notice when it must ask again.
"""

from __future__ import annotations

from typing import Any, Final

from app.core.guard import PerClient

__all__ = ["forget", "register", "services", "version"]

_DEFAULTS: Final[PerClient[dict[str, Any]]] = PerClient(lambda client: {})
"""Per client: its default services by namespace (gone with the client)."""

version = 0
"""Bumped whenever a default service is registered or unregistered (``@cached`` memoizes)."""


def services(client: Any, *, create: bool) -> dict[str, Any] | None:
    """The default services of *client* by namespace (made on first use when *create*)."""
    return _DEFAULTS(client) if create else _DEFAULTS.get(client)


def register(client: Any, namespace: str, service: object) -> None:
    """Make *service* the default of *namespace* on *client*."""
    global version
    _DEFAULTS(client)[namespace] = service
    version += 1


def forget(client: Any, namespace: str, service: object) -> None:
    """Unregister *service* if it is the default of *namespace* on *client*."""
    global version
    found = _DEFAULTS.get(client)
    if found is not None and found.get(namespace) is service:
        del found[namespace]
        version += 1
