"""``REDIS_URL`` parsing and masking.

Schemes: ``redis://``, ``rediss://`` (TLS), ``unix://``,
``redis+cluster://[user:pass@]h1:p1,h2:p2[?opts]``,
``redis+sentinel://[user:pass@]h1:p1,h2:p2/service[/db][?opts]`` and
``memory://`` (in-process fakeredis with Lua, shared by every client of the
process). ``parse_redis_url`` turns one into a ``RedisTarget`` (or raises
``ConfigurationError`` naming what is wrong); ``mask_url`` makes one safe to log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, quote, unquote, unquote_plus, urlsplit, urlunsplit

from app.core.errors import ConfigurationError

__all__ = ["RedisTarget", "TargetKind", "mask_url", "parse_redis_url"]

TargetKind = Literal["standalone", "cluster", "sentinel", "memory"]


@dataclass(frozen=True)
class RedisTarget:
    """A parsed ``REDIS_URL``."""

    kind: TargetKind
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    options: dict[str, str] = field(default_factory=dict)


_STANDALONE = ("redis", "rediss", "unix")


def _split_nodes(
    netloc: str, default_port: int
) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    user = password = None
    if "@" in netloc:
        creds, netloc = netloc.rsplit("@", 1)
        user, _, pw = creds.partition(":")
        user, password = unquote(user) or None, (unquote(pw) if pw else None)
    nodes: list[tuple[str, int]] = []
    for chunk in netloc.split(","):
        chunk = chunk.strip()
        if not chunk:
            continue
        if chunk.startswith("["):  # [ipv6]:port
            host, _, rest = chunk[1:].partition("]")
            port_text = rest.lstrip(":")
        else:
            host, _, port_text = chunk.rpartition(":") if ":" in chunk else (chunk, "", "")
        try:
            port = int(port_text) if port_text else default_port
        except ValueError as exc:
            raise ConfigurationError(f"bad port in Redis node {chunk!r}") from exc
        if not host:
            raise ConfigurationError(f"missing host in Redis node {chunk!r}")
        nodes.append((host, port))
    if not nodes:
        raise ConfigurationError("the Redis URL names no host")
    return user, password, nodes


def parse_redis_url(url: str) -> RedisTarget:
    """Parse any supported URL; raises ``ConfigurationError`` naming what is wrong."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    options = dict(parse_qsl(parts.query))
    if scheme == "memory":
        return RedisTarget(kind="memory", url=url, options=options)
    if scheme in _STANDALONE:
        if scheme != "unix" and not parts.hostname:
            raise ConfigurationError(f"{mask_url(url)}: the Redis URL names no host")
        if scheme == "unix" and not parts.path:
            raise ConfigurationError(f"{mask_url(url)}: a unix:// URL needs a socket path")
        db_text = parts.path.lstrip("/") if scheme != "unix" else options.get("db", "0")
        try:
            db = int(db_text or 0)
        except ValueError as exc:
            raise ConfigurationError(f"{mask_url(url)}: database must be a number") from exc
        nodes: tuple[tuple[str, int], ...] = (
            () if scheme == "unix" else ((parts.hostname or "", parts.port or 6379),)
        )
        return RedisTarget(
            kind="standalone",
            url=url,
            nodes=nodes,
            db=db,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=scheme == "rediss",
            options=options,
        )
    if scheme in ("redis+cluster", "rediss+cluster"):
        user, password, node_list = _split_nodes(parts.netloc, 6379)
        return RedisTarget(
            kind="cluster",
            url=url,
            nodes=tuple(node_list),
            username=user,
            password=password,
            tls=scheme.startswith("rediss"),
            options=options,
        )
    if scheme in ("redis+sentinel", "rediss+sentinel"):
        user, password, node_list = _split_nodes(parts.netloc, 26379)
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ConfigurationError(
                f"{mask_url(url)}: a sentinel URL needs a service name: "
                "redis+sentinel://h1:p1,h2:p2/<service>/<db>"
            )
        try:
            db = int(path[1]) if len(path) > 1 else 0
        except ValueError as exc:
            raise ConfigurationError(f"{mask_url(url)}: database must be a number") from exc
        return RedisTarget(
            kind="sentinel",
            url=url,
            nodes=tuple(node_list),
            service=unquote(path[0]),
            db=db,
            username=user,
            password=password,
            tls=scheme.startswith("rediss"),
            options=options,
        )
    raise ConfigurationError(
        f"unsupported Redis URL scheme {parts.scheme!r}: use redis://, rediss://, unix://, "
        "redis+cluster://, redis+sentinel:// or memory://"
    )


_SECRET_QUERY_NAMES = ("password", "passwd", "secret", "token")


def mask_url(url: str) -> str:
    """The URL with every password replaced by ``***`` (safe to log).

    Masks the userinfo password (``redis://user:pw@h``, and a lone
    ``redis://pw@h``) and the value of any query parameter whose name, decoded
    and in any case, contains ``password``, ``passwd``, ``secret`` or
    ``token`` (``?password=``, ``?PASSWORD=``, ``?sentinel_password=``):
    redis-py reads a password from the query too.
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        creds, hosts = netloc.rsplit("@", 1)
        user, sep, _ = creds.partition(":")
        netloc = f"{user}:***@{hosts}" if sep else f"{quote(unquote(user))}@{hosts}"
        if not sep and user:  # a lone "password@" form (redis://secret@host) is a password too
            netloc = f"***@{hosts}"
    query = "&".join(_mask_query_pair(pair) for pair in parts.query.split("&"))
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _mask_query_pair(pair: str) -> str:
    name, sep, _ = pair.partition("=")
    decoded = unquote_plus(name).lower()
    if sep and any(word in decoded for word in _SECRET_QUERY_NAMES):
        return f"{name}=***"
    return pair
