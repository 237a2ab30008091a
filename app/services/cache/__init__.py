"""Redis cache: ``CacheService`` and the ``@cached`` decorator.

``CacheService(redis)`` stores values under ``<prefix>:<namespace>:...`` with
the toolkit codec (JSON by default, typed decoding, compression above a
threshold), and works the same with clients made with ``decode_responses``
True or False::

    cache = CacheService(redis)
    await cache.set("user:1", {"id": 1}, ttl=60)
    await cache.get("user:1")              # -> {"id": 1}, or None on a miss
    await cache.get("user:1", MISSING)     # -> MISSING on a miss (a stored None stays None)
    await cache.get_or_set("user:1", load_user, ttl=60, stale_ttl=600, tags=["users"])
    await cache.invalidate_tags("users")

TTL semantics
    ``ttl`` is seconds (int/float) or a ``timedelta``; ``None`` means the
    service's ``default_ttl`` (1 hour unless given). Every entry expires
    unless the caller explicitly passes ``ttl=NO_EXPIRY``. With
    ``stale_ttl`` (>= ``ttl``) an entry is *fresh* for ``ttl`` and kept,
    *stale*, until ``stale_ttl``: ``get_or_set`` serves a stale entry at once
    and refreshes it in the background (stale-while-revalidate), and keeps
    serving it while the refresh fails (stale-if-error). ``get`` never
    returns a stale entry unless asked (``allow_stale=True``). Freshness is
    judged from the key's PTTL, i.e. Redis' clock, never the client's.

Key layout (``<root>`` is ``<prefix>:<namespace>:``; keys of one script share
a hash tag so everything runs on Redis Cluster)::

    <root>{<ns>.<shard>}:<key>            the entry (a codec envelope, or a header + envelope)
    <root>{<ns>.<shard>}:<key>|lock       lease of the caller computing the value
    <root>{<ns>.<shard>}:<key>|wait       how many callers wait for it
    <root>{<ns>.<shard>}:<key>|wake       wake-up list those callers BLPOP on
    <root>{<ns>.<shard>}|tag|<tag>        tag set: keys of this shard carrying <tag>

A key goes to one of ``shards`` shards by CRC32 (1 on standalone and
Sentinel, where slots do not matter; 16 on Cluster). User keys keep ``:``
readable; every other character outside ``[A-Za-z0-9_.~@+=,;!$&'()/-]`` is
%-escaped, so no input can reach another namespace, forge a hash tag or act
as a glob.

Tags: sets, not version counters
    A tagged write adds the key to one set per tag *in the same Lua call*
    that writes the value (atomic), in the value's shard so the call stays in
    one slot. A tag set's TTL is raised to the longest lifetime of any member
    (persistent if a member is; ``expire`` raises it too), so a set never
    expires before a key it tracks: no orphans. Each write samples 3 members
    and drops those whose value is gone, which bounds a set to about twice
    its live members. ``invalidate_tags`` pops the sets and unlinks their
    members: one atomic script per shard (so with one shard, the standalone
    default, one atomic step for the whole tag) of up to 5,000 keys; bigger
    tags drain in further calls so Redis is never blocked long.
    We chose sets over tag *version counters* (stored in the entry and
    compared on every read) because versions make every tagged hit pay a
    second lookup, in another slot on Cluster, and leave invalidated values
    occupying memory until their TTL, while sets keep every hit a single
    ``GET``. Overwriting a key with other tags leaves it in its old tag sets
    until pruned; invalidating such a tag removes the key (over-invalidation,
    never a stale read).

Local tier
    ``CacheService(redis, local=LocalCache(...))`` keeps recently read
    payloads in process, kept coherent by a pub/sub invalidation channel;
    ``LocalCache`` explains why pub/sub and not RESP3 client tracking, and
    how a missed message can never leave stale data.

Stampede protection (``get_or_set``)
    Concurrent callers of one process share one computation. Across
    processes one caller takes a lease (``SET NX PX``, extended while the
    factory runs) and the others register as waiters in the same atomic
    step, then block on ``BLPOP`` of the key's wake-up list: the writer
    pushes one token per waiter in the script that stores the value, so
    waiters wake when the value lands, not by polling. A waiter gives up
    after ``wait_timeout`` and computes itself; if the lease holder fails,
    its release wakes the waiters so one of them takes over at once.

Failure (``cache_failure_mode``, default ``open``)
    When Redis is unreachable, the core circuit breaker is open, or Redis
    answers a command with an error, reads miss, writes are skipped and
    ``get_or_set`` runs the factory (still coalesced per process; a stale
    local copy is served if the factory fails too). Every call goes through
    the service's ``app.core.guard.Guard``; a warning is logged when the
    situation changes (a breaker transition, another kind of error), at most
    once a minute, never per request. With ``failure_mode="closed"`` the
    methods raise ``RedisUnavailable`` instead. Bad options (a NaN TTL, a
    negative lease) raise ``ConfigurationError`` (a ``ValueError``).
"""

from app.services.cache._core import CacheStats
from app.services.cache._decorator import BoundCachedFunction, CachedFunction, cached
from app.services.cache._entries import MISSING
from app.services.cache._local import LocalCache, LocalEntry
from app.services.cache._policy import NO_EXPIRY, TTL, CachePolicy
from app.services.cache._service import CacheService, get_cache, set_default_cache

__all__ = [
    "MISSING",
    "NO_EXPIRY",
    "TTL",
    "BoundCachedFunction",
    "CachePolicy",
    "CacheService",
    "CacheStats",
    "CachedFunction",
    "LocalCache",
    "LocalEntry",
    "cached",
    "get_cache",
    "set_default_cache",
]
