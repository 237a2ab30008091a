"""Names: the Redis keys of a logical stream, and stable default consumer names."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from app.core.keys import KeySpace, deprecated_prefix

__all__ = ["StreamKeys", "default_consumer_name", "stream_keys"]


@dataclass(frozen=True, slots=True)
class StreamKeys:
    """The Redis keys of one logical stream (one hash tag: one Cluster slot)."""

    name: str
    stream: str
    dead_letter: str


def stream_keys(name: str, *, namespace: str = "stream", prefix: str | None = None) -> StreamKeys:
    """Keys of stream *name*: ``<REDIS_KEY_PREFIX>:<namespace>:{<name>}`` and ``...:dlq``.

    *name* is escaped (any text is safe). ``prefix=`` is deprecated
    (``DeprecationWarning``): it overrides the root prefix instead of the namespace.
    """
    space = KeySpace.of(namespace, deprecated_prefix(prefix, "stream_keys", "prefix"))
    return StreamKeys(name, space.tagged(name), space.tagged(name, "dlq"))


_default_names: dict[tuple[str, str], int] = {}


def default_consumer_name(stream: str = "", group: str = "") -> str:
    """A stable consumer name: ``<hostname>-<pid>`` (``-2``, ``-3``... for more consumers of
    the same stream and group in this process).

    Stable names keep the PEL attributable (a restarted worker with a fixed hostname and
    pid, as in a container, finds its own pending entries again); the janitor
    (``remove_idle_consumers``) removes names that never come back.
    """
    base = f"{socket.gethostname()}-{os.getpid()}"
    if not (stream or group):
        return base
    n = _default_names.get((stream, group), 0) + 1
    _default_names[(stream, group)] = n
    return base if n == 1 else f"{base}-{n}"
