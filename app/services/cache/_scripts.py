"""The cache's Lua scripts (``lua/``, each headed by its KEYS/ARGV/returns contract)."""

from __future__ import annotations

from app.core.scripts import Script

__all__ = [
    "HIT",
    "LOCKED",
    "S_DELETE",
    "S_EXPIRE",
    "S_LOCK",
    "S_READ",
    "S_RELEASE",
    "S_SET",
    "S_TAGS",
    "S_TTL",
    "WAIT",
]

S_SET = Script.from_package("app.services.cache", "lua/cache_set.lua")
S_READ = Script.from_package("app.services.cache", "lua/cache_read.lua")
S_LOCK = Script.from_package("app.services.cache", "lua/cache_lock.lua")
S_RELEASE = Script.from_package("app.services.cache", "lua/cache_release.lua")
S_DELETE = Script.from_package("app.services.cache", "lua/cache_delete.lua")
S_EXPIRE = Script.from_package("app.services.cache", "lua/cache_expire.lua")
S_TAGS = Script.from_package("app.services.cache", "lua/cache_invalidate_tags.lua")
S_TTL = Script.from_package("app.services.cache", "lua/cache_ttl.lua")

HIT, LOCKED, WAIT = 0, 1, 2
"""cache_lock's replies: the value exists; the lease is ours; someone else computes."""
