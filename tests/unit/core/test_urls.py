"""Every REDIS_URL scheme parses into the right target; bad URLs say what is wrong."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis, RedisCluster

from app.core.config import Settings
from app.core.errors import ConfigurationError
from app.core.redis import build_client, mask_url, parse_redis_url


def test_redis_url() -> None:
    t = parse_redis_url("redis://user:p%40ss@cache.internal:6380/3?ssl_cert_reqs=none")
    assert t.kind == "standalone"
    assert t.nodes == (("cache.internal", 6380),)
    assert (t.db, t.username, t.password, t.tls) == (3, "user", "p@ss", False)
    assert t.options == {"ssl_cert_reqs": "none"}


def test_rediss_url_is_tls_with_default_port() -> None:
    t = parse_redis_url("rediss://cache")
    assert (t.kind, t.tls, t.nodes, t.db) == ("standalone", True, (("cache", 6379),), 0)


def test_unix_url() -> None:
    t = parse_redis_url("unix:///run/redis.sock?db=2")
    assert (t.kind, t.nodes, t.db) == ("standalone", (), 2)


def test_cluster_url_lists_every_node() -> None:
    t = parse_redis_url("redis+cluster://:secret@h1:7000,h2:7001,[::1]:7002")
    assert t.kind == "cluster"
    assert t.nodes == (("h1", 7000), ("h2", 7001), ("::1", 7002))
    assert t.password == "secret"


def test_sentinel_url_has_service_and_db() -> None:
    t = parse_redis_url("redis+sentinel://s1:26379,s2/mymaster/4?sentinel_password=x")
    assert t.kind == "sentinel"
    assert t.nodes == (("s1", 26379), ("s2", 26379))
    assert (t.service, t.db, t.options["sentinel_password"]) == ("mymaster", 4, "x")


def test_memory_url() -> None:
    assert parse_redis_url("memory://").kind == "memory"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://host", "unsupported Redis URL scheme"),
        ("redis+sentinel://s1:26379", "needs a service name"),
        ("redis+sentinel://s1/svc/notanumber", "database must be a number"),
        ("redis+cluster://h1:port", "bad port"),
        ("redis+cluster://", "names no host"),
        ("redis://:6379/0", "names no host"),
        ("redis://h/x", "database must be a number"),
        ("unix://", "needs a socket path"),
    ],
)
def test_bad_urls_are_refused_with_a_reason(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_redis_url(url)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://user:hunter2@h:6379/0", "redis://user:***@h:6379/0"),
        ("redis://:hunter2@h", "redis://:***@h"),
        ("redis://hunter2@h", "redis://***@h"),
        ("redis://h:6379", "redis://h:6379"),
        ("redis+cluster://u:pw@a:1,b:2", "redis+cluster://u:***@a:1,b:2"),
        ("redis://h/0?password=hunter2", "redis://h/0?password=***"),
        ("redis://h/0?db=1&PassWord=hunter2&x=1", "redis://h/0?db=1&PassWord=***&x=1"),
        ("redis://h/0?pass%77ord=hunter2", "redis://h/0?pass%77ord=***"),
        (
            "redis+sentinel://a:1/m?sentinel_password=hunter2",
            "redis+sentinel://a:1/m?sentinel_password=***",
        ),
        ("redis://u:hunter2@h/0?password=hunter2", "redis://u:***@h/0?password=***"),
        ("redis://h/0?db=2", "redis://h/0?db=2"),
    ],
)
def test_passwords_are_masked(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert "hunter2" not in mask_url(url)


async def test_build_client_picks_the_client_class() -> None:
    s = Settings()
    standalone = build_client(s, url="redis://127.0.0.1:1/0")
    cluster = build_client(s, url="redis+cluster://127.0.0.1:1,127.0.0.1:2")
    sentinel = build_client(s, url="redis+sentinel://127.0.0.1:1/svc/2")
    try:
        assert isinstance(standalone, Redis)
        assert isinstance(cluster, RedisCluster)
        assert isinstance(sentinel, Redis)
        assert sentinel.connection_pool.connection_kwargs["db"] == 2
        assert standalone.connection_pool.max_connections == s.redis_pool_size
    finally:
        await standalone.aclose()
        await cluster.aclose()
        await sentinel.aclose()
