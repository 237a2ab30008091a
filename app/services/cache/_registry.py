"""The default services of each client: one ``CacheService`` per namespace, kept on the client.

``get_cache`` and ``set_default_cache`` fill it; a service's ``aclose`` leaves
it. ``version`` is bumped on every change, so ``@cached`` can memoize the
service it resolved and notice when it must ask again.
"""

from __future__ import annotations

from typing import Any, Final, cast

__all__ = ["forget", "register", "services", "version"]

_ATTR: Final = "_toolkit_cache_services"

version = 0
"""Bumped whenever a default service is registered or unregistered (``@cached`` memoizes)."""


def services(client: Any, *, create: bool) -> dict[str, Any] | None:
    """The default services of *client* by namespace (made on first use when *create*)."""
    found: dict[str, Any] | None = getattr(client, _ATTR, None)
    if found is None and create:
        found = {}
        setattr(client, _ATTR, found)
    return found


def register(client: Any, namespace: str, service: object) -> None:
    """Make *service* the default of *namespace* on *client*."""
    global version
    cast(dict[str, Any], services(client, create=True))[namespace] = service
    version += 1


def forget(client: Any, namespace: str, service: object) -> None:
    """Unregister *service* if it is the default of *namespace* on *client*."""
    global version
    found = services(client, create=False)
    if found is not None and found.get(namespace) is service:
        del found[namespace]
        version += 1
